"""The architecture as a test: every ztsnr_nb import (lazy ones inside functions too) goes to a module of the same or a
lower notebook number, there are no cycles, and the torch-free modules stay torch-free."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'ztsnr_nb'
SRC_RE = re.compile(r'File to edit: \.\./(?:\.\./)*nbs/(\d+)_[\w.]*\.ipynb')


def modules() -> dict[str, tuple[int, Path]]:
    "Module name -> (notebook number, path) for every exported module."
    out = {}
    for p in PKG.rglob('*.py'):
        m = SRC_RE.search(p.read_text(encoding='utf-8')[:600])
        if not m: continue
        name = '.'.join(p.relative_to(ROOT).with_suffix('').parts)
        out[name] = (int(m.group(1)), p)
    return out


def imports_of(name: str, path: Path, known) -> set[str]:
    "ztsnr_nb modules imported anywhere in `path` (absolute or relative, top level or inside functions)."
    pkg = name.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import): targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = pkg.split('.')[:len(pkg.split('.')) - node.level + 1]
                base = '.'.join(parts + ([base] if base else []))
            targets = [base] + [f'{base}.{a.name}' for a in node.names]
        else: continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_every_module_comes_from_a_numbered_notebook():
    mods = modules()
    py = {'.'.join(p.relative_to(ROOT).with_suffix('').parts) for p in PKG.rglob('*.py')
          if p.name not in ('__init__.py', '_modidx.py')}
    assert py <= set(mods), f"modules without a numbered source notebook: {sorted(py - set(mods))}"


def test_nothing_imports_upward():
    mods = modules()
    bad = [f"{a} ({na:02d}) imports {b} ({mods[b][0]:02d})"
           for a, (na, p) in mods.items() for b in imports_of(a, p, mods) if mods[b][0] > na]
    assert not bad, 'imports of higher-numbered notebooks (upward):\n' + '\n'.join(bad)


def test_no_import_cycles():
    mods = modules()
    graph = {a: imports_of(a, p, mods) for a, (_, p) in mods.items()}
    state, stack = {}, []
    def visit(n):
        state[n] = 1; stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1: raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(m):] + [m]))
            if m not in state: visit(m)
        state[n] = 2; stack.pop()
    for n in graph:
        if n not in state: visit(n)


@pytest.mark.parametrize('module', ['ztsnr_nb.policies', 'ztsnr_nb.training.config', 'ztsnr_nb.cli'])
def test_light_modules_do_not_import_torch(module):
    code = f"import sys, {module}; heavy = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules]; print(heavy)"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == '[]', (r.stdout, r.stderr[-2000:])


def test_help_print_config_and_check_load_no_torch(tmp_path):
    "`--help`, `--print-config` and `--check` answer without importing torch (what makes them instant)."
    cfg = tmp_path / 'c.toml'
    code = ("import sys, runpy\nsys.argv = ['ztsnr_nb_train'] + sys.argv[1:]\nfrom ztsnr_nb.cli import main\n"
            "try: rc = main(sys.argv[1:])\nexcept SystemExit as e: rc = e.code\n"
            "print('HEAVY', [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules], rc)")
    r = subprocess.run([sys.executable, '-c', code, '--print-config'], capture_output=True, text=True, timeout=60, cwd=ROOT)
    cfg.write_text(r.stdout.rsplit('HEAVY', 1)[0])
    for args in (['--help'], ['--print-config'], [str(cfg), '--check'], [str(cfg), '--check', '--set', 'loss.terminal_weight=ones']):
        r = subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert "HEAVY [] " in r.stdout, (args, r.stdout[-500:], r.stderr[-1000:])
