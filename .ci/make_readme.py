#!/usr/bin/env python3
"""Offline README generator: nbs/index.ipynb -> README.md (nbdev's readme convention without Quarto).

Usage: python .ci/make_readme.py          # write README.md
       python .ci/make_readme.py --check  # exit 1 if README.md is out of date
Markdown cells are copied; code cells are shown as python blocks with their text outputs, except cells
marked `#| hide`. nbdev directives (`#| ...`) are stripped.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
nb = json.loads((root / 'nbs' / 'index.ipynb').read_text(encoding='utf-8'))

def src(cell): return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']

parts = ['<!-- WARNING: generated from nbs/index.ipynb by `python .ci/make_readme.py`; edit the notebook, not this file. -->\n']
for cell in nb['cells']:
    text = src(cell)
    lines = text.splitlines()
    directives = [l for l in lines if l.startswith('#|')]
    if any(d.replace(' ', '') in ('#|hide', '#|exporti') for d in directives): continue
    body = '\n'.join(l for l in lines if not l.startswith('#|')).strip('\n')
    if cell['cell_type'] == 'markdown':
        parts.append(body + '\n')
    elif cell['cell_type'] == 'code' and body:
        parts.append(f'```python\n{body}\n```\n')
        for out in cell.get('outputs', []):
            t = out.get('text') or out.get('data', {}).get('text/plain')
            if t: parts.append('```\n' + (''.join(t) if isinstance(t, list) else t).rstrip('\n') + '\n```\n')
readme = '\n'.join(parts)
target = root / 'README.md'
if '--check' in sys.argv:
    if not target.exists() or target.read_text(encoding='utf-8') != readme:
        sys.exit('README.md is out of date with nbs/index.ipynb: run `python .ci/make_readme.py` and commit it')
    print('README.md is in sync with nbs/index.ipynb')
else:
    target.write_text(readme, encoding='utf-8')
    print(f'wrote {target}')
