#!/usr/bin/env python3
"""Make every notebook runnable top to bottom in Colab / a plain Jupyter kernel, idempotently.

    python .ci/nb_prelude.py                 # update nbs/*.ipynb in place (then run nbdev_clean; nbdev_export if a
                                             # console-script guard was fixed, since that cell is exported)
    python .ci/nb_prelude.py --check         # exit 1 listing the notebooks that running it would change
    python .ci/nb_prelude.py --nbs DIR ...   # another folder (or give notebook paths)

What each notebook gets (running it again changes nothing):
1. An "Open in Colab" badge at the end of its first markdown cell (the `# title` / `> summary` cell), pointing at
   the notebook in the repository named by settings.ini (git_url, branch, nbs_path). A stale badge is replaced.
2. A `#| hide` setup cell that installs the package in a fresh kernel (Colab): `ztsnr_nb[notebook]` from the
   repository when `ztsnr_nb` cannot be imported, or only the missing notebook extras; a no-op where they exist
   (developers' editable installs, nbdev_test, CI).
3. A `#| hide` switch cell `RUN_SLOW = False`. It registers an IPython input transformer: a cell whose directives
   include `#| slow` prints "skipped" instead of running unless RUN_SLOW is true (set it in the cell, or
   ZTSNR_RUN_SLOW=1 in the environment). The slow cells themselves are not rewritten, so `nbdev_test` works as
   before: it skips them by itself (`tst_flags = slow`), and under `nbdev_test --flags slow` the switch turns itself
   on (it reads nbdev_test's argv, which its worker processes inherit). nbdev_docs' notebook processing, which
   executes every cell containing an import, gets the switch off, so it never trains a model. Tools that execute
   notebooks *with* their slow cells (e.g. /work/tools/run_nb.py, to commit outputs) set ZTSNR_RUN_SLOW=1.
   Both cells go right after the `#| default_exp` cell (so it stays the first code cell), or first when there is none.
4. Console-script cells (`if __name__ == '__main__': sys.exit(main())`) get `#| eval: false` and the guard
   `and '__file__' in globals()`, so they do nothing in a kernel (whose argv is `-f kernel.json`).
"""
from __future__ import annotations

import argparse, json, re, shlex, sys
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BADGE_IMG = 'https://colab.research.google.com/assets/colab-badge.svg'
_BADGE_LINE = re.compile(r'^.*\]\(https://colab\.research\.google\.com/(?:github|drive)/[^)]*\).*$|^.*colab-badge\.svg.*$', re.M)
INSTALL_MARK = '# ztsnr_nb prelude (.ci/nb_prelude.py): install'
SWITCH_MARK = '# ztsnr_nb prelude (.ci/nb_prelude.py): slow-cell switch'
_MAIN_GUARD = re.compile(r"^(\s*)if\s+__name__\s*==\s*(['\"])__main__\2\s*:\s*(sys\.exit\(\s*main\(.*\)\s*\))\s*$", re.M)


def settings(root: Path = ROOT) -> dict:
    cfg = ConfigParser(delimiters=['='])
    cfg.read(root / 'settings.ini', encoding='utf-8')
    return dict(cfg['DEFAULT'])


def src(cell) -> str: return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


def lines(text: str) -> list[str]: return text.splitlines(keepends=True)


def colab_url(cfg: dict, name: str) -> str:
    m = re.match(r'https?://github\.com/([^/]+)/([^/.]+)', cfg.get('git_url', ''))
    if not m: raise SystemExit(f"nb_prelude: settings.ini git_url={cfg.get('git_url')!r} is not a github.com URL; fix git_url")
    return (f'https://colab.research.google.com/github/{m.group(1)}/{m.group(2)}/blob/'
            f"{cfg.get('branch', 'main')}/{cfg.get('nbs_path', 'nbs')}/{name}")


def badge(cfg: dict, name: str) -> str: return f'[![Open In Colab]({BADGE_IMG})]({colab_url(cfg, name)})'


def _import_name(req: str) -> tuple[str, str]:
    "('ipywidgets>=8', ...) -> (import name, requirement spec)."
    dist = re.split(r'[\s<>=!~;\[]', req, 1)[0]
    return {'pillow': 'PIL', 'pyyaml': 'yaml', 'scikit-learn': 'sklearn'}.get(dist.lower(), dist.replace('-', '_')), req


def install_cell_source(cfg: dict) -> str:
    lib = cfg.get('lib_name', 'ztsnr_nb')
    git = cfg.get('git_url', '').rstrip('/')
    # what the notebooks import; the kernel/executor packages of the extra are there wherever the notebook runs
    extras = [_import_name(r) for r in shlex.split(cfg.get('notebook_requirements', ''))]
    extras = [(m, r) for m, r in extras if m not in ('ipykernel', 'nbclient', 'jupyter', 'notebook', 'jupyterlab')]
    return '\n'.join([
        '#| hide',
        INSTALL_MARK,
        f'# In Colab or a fresh kernel this installs {lib} with its notebook extras; where they are installed it does nothing.',
        'import importlib, importlib.util, subprocess, sys',
        f'_missing = [spec for mod, spec in {extras!r} if importlib.util.find_spec(mod) is None]',
        f"if importlib.util.find_spec({lib!r}) is None: _missing = [{f'{lib}[notebook] @ git+{git}'!r}]",
        "if _missing:",
        "    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', *_missing], check=True)",
        '    importlib.invalidate_caches()',
    ])


SWITCH_SOURCE = '\n'.join([
    '#| hide',
    SWITCH_MARK,
    '# Cells marked `#| slow` take minutes on a CPU: they print "skipped" unless RUN_SLOW is True (or ZTSNR_RUN_SLOW=1).',
    'RUN_SLOW = False',
    'import os, re, sys',
    "# `nbdev_test --flags slow` runs them too (nbdev_test itself skips them otherwise; nbdev_docs never runs them)",
    "RUN_SLOW = RUN_SLOW or os.environ.get('ZTSNR_RUN_SLOW') == '1' or bool(",
    "    'nbdev_test' in sys.argv[0] and re.search(r'--flags[ =][^-]*\\bslow\\b', ' '.join(sys.argv)))",
    'def _skip_slow_cells(lines):',
    '    "IPython input transformer: a `#| slow` cell is replaced by a note unless RUN_SLOW is true."',
    "    head = []",
    "    for l in (l.strip() for l in lines if l.strip()):",
    "        if not re.match(r'#\\s*\\|', l): break",
    "        head.append(l)",
    "    slow = any(re.match(r'#\\s*\\|\\s*slow\\b', l) for l in head)",
    "    if slow and not get_ipython().user_ns.get('RUN_SLOW'):",
    "        return [\"print('skipped: a slow cell (set RUN_SLOW = True at the top to run it)')\\n\"]",
    '    return lines',
    "if 'get_ipython' in globals():",
    '    _post = get_ipython().input_transformers_post',
    "    _post[:] = [t for t in _post if getattr(t, '__name__', '') != '_skip_slow_cells'] + [_skip_slow_cells]",
])


def new_cell(source: str, cell_id: str) -> dict:
    return {'cell_type': 'code', 'execution_count': None, 'id': cell_id, 'metadata': {}, 'outputs': [],
            'source': lines(source)}


def _find(cells, mark):
    return next((i for i, c in enumerate(cells) if c['cell_type'] == 'code' and mark in src(c)), None)


def _directive_only(cell) -> bool:
    return cell['cell_type'] == 'code' and all(l.lstrip().startswith('#|') or not l.strip() for l in src(cell).splitlines())


def apply(nb: dict, name: str, cfg: dict) -> tuple[dict, list[str]]:
    "The notebook with its prelude in place, and what changed (empty when it already had everything)."
    cells, changes = nb['cells'], []
    # 1. Colab badge in the first markdown cell
    md = next((i for i, c in enumerate(cells) if c['cell_type'] == 'markdown'), None)
    want = badge(cfg, name)
    if md is None:
        cells.insert(0, {'cell_type': 'markdown', 'id': 'colab-badge', 'metadata': {}, 'source': lines(want)})
        changes.append('added a markdown cell with the Colab badge')
    else:
        text = src(cells[md])
        found = _BADGE_LINE.findall(text)
        if found != [want]:
            body = _BADGE_LINE.sub('', text).rstrip('\n')
            body = re.sub(r'\n{3,}', '\n\n', body)
            cells[md]['source'] = lines(f'{body}\n\n{want}' if body else want)
            changes.append('Colab badge ' + ('updated' if found else 'added'))
    # 2./3. setup cells, right after a directive-only first code cell (`#| default_exp ...`) or first
    for mark, source, cid, what in ((INSTALL_MARK, install_cell_source(cfg), 'colab-install', 'install cell'),
                                    (SWITCH_MARK, SWITCH_SOURCE, 'run-slow-switch', 'RUN_SLOW switch cell')):
        i = _find(cells, mark)
        if i is not None:
            if src(cells[i]) != source:
                cells[i]['source'] = lines(source); changes.append(f'{what} updated')
            continue
        codes = [k for k, c in enumerate(cells) if c['cell_type'] == 'code']
        if (j := _find(cells, INSTALL_MARK)) is not None: pos = j + 1
        elif codes and _directive_only(cells[codes[0]]): pos = codes[0] + 1
        elif codes: pos = codes[0]
        else: pos = len(cells)
        cells.insert(pos, new_cell(source, cid)); changes.append(f'{what} added')
    # 4. console-script cells: no SystemExit in a kernel
    for c in cells:
        if c['cell_type'] != 'code': continue
        text = src(c)
        if not _MAIN_GUARD.search(text): continue
        new = _MAIN_GUARD.sub(lambda m: f"{m.group(1)}if __name__ == '__main__' and '__file__' in globals(): {m.group(3)}", text)
        if not re.search(r'^\s*#\s*\|\s*eval\s*:\s*false', new, re.M): new = '#| eval: false\n' + new
        if new != text:
            c['source'] = lines(new); changes.append('console-script cell guarded (run nbdev_export)')
    return nb, changes


def problems_only(nb: dict) -> list[str]:
    "Checks that need no rewrite: guarded console scripts."
    out = []
    for k, c in enumerate(nb['cells']):
        t = src(c) if c['cell_type'] == 'code' else ''
        if 'sys.exit(main(' in t and "'__file__' in globals()" not in t and '"__file__" in globals()' not in t:
            out.append(f'cell {k}: `sys.exit(main())` without the `\'__file__\' in globals()` guard')
    return out


def dump(nb: dict) -> str: return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + '\n'


def main(argv=None) -> int:
    cfg = settings()
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('paths', nargs='*', type=Path, help='notebooks (default: every *.ipynb in --nbs)')
    ap.add_argument('--nbs', type=Path, default=ROOT / cfg.get('nbs_path', 'nbs'))
    ap.add_argument('--check', action='store_true', help='change nothing; exit 1 if a notebook lacks its prelude')
    a = ap.parse_args(argv)
    paths = a.paths or sorted(p for p in a.nbs.glob('*.ipynb') if not p.name.startswith(('.', '_')))
    if not paths: print(f'nb_prelude: no notebooks in {a.nbs}', file=sys.stderr); return 1
    bad = 0
    for p in paths:
        old = p.read_text(encoding='utf-8')
        nb, changes = apply(json.loads(old), p.name, cfg)
        if a.check:
            probs = changes + problems_only(nb)
            if probs: bad += 1; print(f'{p.name}: ' + '; '.join(probs))
        elif changes:
            p.write_text(dump(nb), encoding='utf-8'); print(f'{p.name}: ' + '; '.join(changes))
    if a.check:
        if bad: print(f'nb_prelude --check: {bad} of {len(paths)} notebooks need `python .ci/nb_prelude.py`'); return 1
        print(f'nb_prelude --check: all {len(paths)} notebooks have their Colab badge, install cell and RUN_SLOW switch')
    return 0


if __name__ == '__main__':
    sys.exit(main())
