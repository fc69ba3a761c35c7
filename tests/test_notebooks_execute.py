"""Every notebook runs top to bottom in a plain Jupyter kernel, as a reader's "Run all" in Jupyter or Colab would.

    ZTSNR_RUN_NOTEBOOKS=1 pytest tests/test_notebooks_execute.py          # all notebooks (several minutes)
    ZTSNR_RUN_NOTEBOOKS=smoke pytest tests/test_notebooks_execute.py      # CI smoke: index + the notebooks with
                                                                        # console-script or `#| slow` cells
    ZTSNR_RUN_NOTEBOOKS=1 pytest tests/test_notebooks_execute.py -k schedule
    ZTSNR_NBS_DIR=/tmp/copy ZTSNR_NB_APPLY_PRELUDE=1 ...                 # other notebooks; add .ci/nb_prelude.py's
                                                                        # cells to the in-memory copy first

Skipped unless ZTSNR_RUN_NOTEBOOKS is 1 or smoke (all notebooks take ~10 min on 2 cores). Needs
nbclient + ipykernel (`pip install -e ".[dev,notebook]"`).

Each notebook is read, executed in memory with nbclient in a fresh `python3` ipykernel (cwd = the notebook's
folder, like Jupyter and nbdev_test), and never written back. Slow cells are off: the kernel has neither
ZTSNR_RUN_SLOW nor IN_TEST, so the notebook's own `RUN_SLOW = False` switch (the prelude cell) skips its
`#| slow` cells, exactly as in Colab. `#| eval: false` cells are not run, as nbdev does. The test fails on any
cell error (SystemExit included) and when a notebook takes longer than ZTSNR_NB_BUDGET_S (default 60 s,
kernel start excluded).
"""
from __future__ import annotations

import importlib.util, json, os, re, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = Path(os.environ.get('ZTSNR_NBS_DIR', ROOT / 'nbs'))
BUDGET = float(os.environ.get('ZTSNR_NB_BUDGET_S', '60'))
_ANSI = re.compile(r'\x1b\[[0-9;?]*[ -/]*[@-~]')
_EVAL_FALSE = re.compile(r'^\s*#\s*\|\s*eval\s*:\s*false\b', re.M | re.I)

MODE = os.environ.get('ZTSNR_RUN_NOTEBOOKS', '')
pytestmark = pytest.mark.skipif(MODE not in ('1', 'smoke'),
                                reason='notebook execution is opt-in: ZTSNR_RUN_NOTEBOOKS=1 pytest tests/test_notebooks_execute.py')
_GUARDED = re.compile(r'sys\.exit\(main\(|^\s*#\s*\|\s*slow\b', re.M)


def _notebooks():
    found = sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith(('.', '_')))
    found = sorted(found, key=lambda p: (p.name != 'index.ipynb', p.name))
    if MODE == 'smoke':     # the kernel-specific guards: the console-script cells and the RUN_SLOW switch
        found = [p for p in found if p.name == 'index.ipynb' or _GUARDED.search(p.read_text(encoding='utf-8'))]
    return found


def _prelude():
    spec = importlib.util.spec_from_file_location('nb_prelude', ROOT / '.ci' / 'nb_prelude.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def _src(cell) -> str: return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


@pytest.mark.parametrize('path', _notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    nbformat = pytest.importorskip('nbformat')
    nbclient = pytest.importorskip('nbclient')
    if importlib.util.find_spec('ipykernel') is None: pytest.skip('ipykernel missing: pip install -e ".[notebook]"')
    raw = json.loads(path.read_text(encoding='utf-8'))
    if os.environ.get('ZTSNR_NB_APPLY_PRELUDE') == '1':
        pre = _prelude(); raw, _ = pre.apply(raw, path.name, pre.settings())
    for c in raw['cells']:                       # `#| eval: false` cells are shown, not run (nbdev's rule)
        if c['cell_type'] == 'code' and _EVAL_FALSE.search(_src(c)):
            c['cell_type'] = 'raw'; c.pop('outputs', None); c.pop('execution_count', None)
    nb = nbformat.reads(json.dumps(raw), as_version=4)
    for k in ('IN_TEST', 'ZTSNR_RUN_SLOW'): monkeypatch.delenv(k, raising=False)
    for k, v in {'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1'), 'HF_HUB_OFFLINE': '1',
                 'TRANSFORMERS_OFFLINE': '1', 'PYDEVD_DISABLE_FILE_VALIDATION': '1'}.items():
        monkeypatch.setenv(k, v)
    client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=int(BUDGET * 3), startup_timeout=120,
                                     shutdown_kernel='immediate', allow_errors=False,
                                     resources={'metadata': {'path': str(path.parent)}})
    times, error = [], None
    t_start = time.time()
    with client.setup_kernel():
        t0 = time.time()
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != 'code': continue
            tc = time.time()
            try: client.execute_cell(cell, i)
            except nbclient.exceptions.CellExecutionError as e:
                error = (i, cell, e); break
            except nbclient.exceptions.CellTimeoutError as e:
                error = (i, cell, e); break
            finally: times.append((time.time() - tc, i))
        run_s = time.time() - t0
    total = time.time() - t_start
    slowest = ', '.join(f'cell {i}: {t:.1f} s' for t, i in sorted(times, reverse=True)[:3])
    print(f'{path.name}: {run_s:.1f} s executing ({total:.1f} s with kernel start/stop); slowest {slowest}')
    if error:
        i, cell, e = error
        head = '\n'.join(cell.source.splitlines()[:6])
        msg = _ANSI.sub('', str(e))[-2500:]
        pytest.fail(f'{path.name}: cell {i} failed\n--- cell source (head) ---\n{head}\n--- error ---\n{msg}')
    assert run_s < BUDGET, f'{path.name} took {run_s:.0f} s (> {BUDGET:.0f} s); slowest {slowest}: mark those `#| slow`'
