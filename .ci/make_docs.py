#!/usr/bin/env python3
"""Build the docs site offline: nbs/*.ipynb -> a static HTML site (Sphinx + myst-nb + furo, MathJax from a package).

    python .ci/make_docs.py                       # site in settings.ini's doc_path (_docs/), open _docs/index.html
    python .ci/make_docs.py --nbs DIR --out DIR   # other notebooks / output folder (the tests build from copies)
    python .ci/make_docs.py --strict              # exit 1 on any Sphinx warning as well

Needs `pip install -e ".[docs]"` (sphinx, myst-nb, furo, sphinx-mathjax-offline); no network, no Quarto, no kernel.

What it does (nothing in nbs/ is modified):
1. Pages: nbs/index.ipynb first, then every other nbs/*.ipynb sorted by file name (= reading order). Each becomes a
   page named as nbdev names it (`01_schedule.ipynb` -> `schedule.html`), so URLs match `nbdev_docs`' Quarto site
   and `_modidx.py`'s doc links. Links between notebooks (`[x](01_schedule.ipynb)`) are rewritten to those names.
2. Notebook processing in the spirit of nbdev's processors, without executing anything: `#| hide` and
   `#| include: false` cells are dropped, `#| echo: false` hides a cell's source, `#| output: false` its outputs,
   directive lines are stripped, ANSI colours and widget views are removed from outputs (their text stays), remote
   images become local (the Colab badge) or links. The committed outputs (plots!) are what the page shows; a build
   never needs a kernel, so nbdev_proc_nbs' `NameError` (it executes export cells out of context) cannot happen.
3. API docs: after every `#| export` cell, the signature and docstring of each public function/class/`@patch`ed
   method it defines (rendered with nbdev's `show_doc`, objects taken from the installed module, not from executing
   the notebook), and one API page per module from `<lib>/_modidx.py`, cross-linked both ways.
4. Sphinx builds the site: sidebar in reading order, the index page from index.ipynb, MathJax served from
   _static/mathjax, Sphinx's offline search (search.html).
"""
from __future__ import annotations

import argparse, ast, copy, functools, importlib, importlib.util, inspect, json, os, re, shutil, subprocess, sys, time, warnings
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / 'docs'
COLAB_BADGE_URL = 'https://colab.research.google.com/assets/colab-badge.svg'
KERNEL_META = {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
               'language_info': {'name': 'python', 'pygments_lexer': 'ipython3'}}
_ANSI = re.compile(r'\x1b\[[0-9;?]*[ -/]*[@-~]')
_DIRECTIVE = re.compile(r'^\s*#\s*\|\s?(.*)$')
_MD_IMAGE = re.compile(r'!\[([^\]]*)\]\((https?://[^)\s]+)(?:\s+"[^"]*")?\)')
_HTML_IMAGE = re.compile(r'<img\b[^>]*\bsrc="(https?://[^"]+)"[^>]*>', re.I)


def settings(root: Path = ROOT) -> dict:
    cfg = ConfigParser(delimiters=['='])
    cfg.read(root / 'settings.ini', encoding='utf-8')
    return dict(cfg['DEFAULT'])


def notebooks(nbs: Path) -> list[Path]:
    "Page order: index.ipynb first, then every other notebook sorted by file name (hidden and `_` files skipped)."
    found = sorted(p for p in nbs.glob('*.ipynb') if not p.name.startswith(('.', '_')))
    return sorted(found, key=lambda p: (p.name != 'index.ipynb', p.name))


def page_name(nb: Path | str) -> str:
    "The page (docname) nbdev gives a notebook: `index` for index.ipynb, else the name without its number prefix."
    stem = Path(nb).stem
    return 'index' if stem == 'index' else re.sub(r'^\d+[a-zA-Z0-9]*_', '', stem.lower())


def page_names(nbs: list[Path]) -> dict[str, str]:
    "Notebook file name -> unique page name (a clash falls back to the full stem)."
    out, used = {}, set()
    for p in nbs:
        n = page_name(p)
        if n in used: n = p.stem.lower()
        used.add(n); out[p.name] = n
    return out


def src(cell) -> str:
    return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


def directives(text: str) -> tuple[dict[str, str], str]:
    "nbdev/Quarto directives at the top of a code cell (`#| name: value` or `#| name args`) and the remaining code."
    lines, found = text.splitlines(), {}
    i = 0
    while i < len(lines) and (m := _DIRECTIVE.match(lines[i])):
        body = m.group(1).strip()
        if body:
            name, _, val = body.partition(':') if ':' in body.split()[0] else body.partition(' ')
            found[name.strip()] = val.strip()
        i += 1
    return found, '\n'.join(lines[i:])


def is_false(v: str | None) -> bool: return v is not None and v.strip().lower() in ('false', 'no', '0')


def label(*parts: str) -> str:
    return re.sub(r'[^a-z0-9_.-]+', '-', '-'.join(parts).lower()).strip('-')


# ---------------------------------------------------------------------------------------------------- API docs

def defined_names(code: str) -> list[str]:
    "Public names an export cell defines: functions, classes, and `@patch`ed methods as `Class.name`."
    try: tree = ast.parse(code)
    except SyntaxError: return []
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name.startswith('_'): continue
            patched = None
            for d in getattr(node, 'decorator_list', []):
                f = d.func if isinstance(d, ast.Call) else d
                fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, 'id', None)
                if fname == 'patch' and node.args.args and isinstance(node.args.args[0].annotation, ast.Name):
                    patched = node.args.args[0].annotation.id
                elif fname == 'patch_to' and isinstance(d, ast.Call) and d.args and isinstance(d.args[0], ast.Name):
                    patched = d.args[0].id
            if patched and patched.startswith('_'): continue
            names.append(f'{patched}.{node.name}' if patched else node.name)
    return names


_import_errors: dict[str, Exception] = {}


def resolve(module: str, qualname: str):
    if module in _import_errors: raise _import_errors[module]
    try: obj = importlib.import_module(module)
    except Exception as e:
        _import_errors[module] = e
        print(f'make_docs: warning: cannot import {module} (its API docs are left out): {type(e).__name__}: {e}',
              file=sys.stderr)
        raise
    for part in qualname.split('.'):
        if inspect.isclass(obj):    # see descriptors as they are: property, classmethod (bound: no `cls` shown)
            static = inspect.getattr_static(obj, part)
            obj = getattr(obj, part) if isinstance(static, (classmethod, staticmethod)) else static
            if isinstance(static, (classmethod, staticmethod)): obj = _Kind(obj, type(static).__name__)
        else: obj = getattr(obj, part)
    return obj


class _Kind:
    "A class member plus the kind of descriptor it came from (shown in the docs)."
    def __init__(self, obj, kind): self.obj, self.kind = obj, kind


def source_link(obj, cfg: dict) -> str | None:
    "GitHub link to the definition in the exported module (an external link, not followed offline)."
    try:
        o = inspect.unwrap(_unwrap_descriptor(obj)[0])
        path = Path(inspect.getsourcefile(o)).resolve()
        line = inspect.getsourcelines(o)[1]
        rel = path.relative_to(ROOT).as_posix()
    except Exception: return None
    git = cfg.get('git_url', '').rstrip('/')
    return f"{git}/blob/{cfg.get('branch', 'main')}/{rel}#L{line}" if git else None


def _unwrap_descriptor(obj):
    "The function behind a property / cached_property / classmethod / staticmethod, and what kind of member it is."
    if isinstance(obj, _Kind): return obj.obj, obj.kind
    if isinstance(obj, property): return obj.fget, 'property'
    if isinstance(obj, functools.cached_property): return obj.func, 'property'
    if isinstance(obj, (classmethod, staticmethod)): return obj.__func__, type(obj).__name__
    return obj, None


def doc_markdown(obj, qualname: str) -> str:
    "Signature + docstring (+ docments table) as nbdev's `show_doc` renders them, without its heading and source link."
    obj, kind = _unwrap_descriptor(obj)
    md = doc_markdown_(obj, qualname)
    return f'*{kind}*\n\n{md}' if kind else md


def doc_markdown_(obj, qualname: str) -> str:
    md = None
    try:
        from nbdev.showdoc import BasicMarkdownRenderer, show_doc
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            md = show_doc(obj, name=qualname, renderer=BasicMarkdownRenderer)._repr_markdown_()
    except Exception:
        md = None
    if md:
        lines = md.splitlines()
        keep = [l for l in lines if not l.startswith('[source](') and l.strip() != '---' and not l.startswith('### ')]
        md = '\n'.join(keep).strip('\n')
        if not inspect.getdoc(obj):     # nbdev falls back to a generic docstring ("Call self as a function.")
            md = re.sub(r'\n*\*Call self as a function\.\*', '', md)
        if inspect.isclass(obj): md = re.sub(r'^(```python\n)def ', r'\1class ', md, count=1)
        return md
    try: sig = f'{qualname.split(".")[-1]}{inspect.signature(obj)}'
    except (TypeError, ValueError): sig = qualname.split('.')[-1]
    doc = inspect.getdoc(obj) or ''
    return f'```python\n{"class" if inspect.isclass(obj) else "def"} {sig}\n```\n\n' + (f'*{doc}*' if doc else '')


def doc_block(module, qualname, cfg, own_label, other_label, other_text) -> str | None:
    try: obj = resolve(module, qualname)
    except Exception as e:
        if module not in _import_errors:
            print(f'make_docs: warning: cannot document {module}.{qualname}: {type(e).__name__}: {e}', file=sys.stderr)
        return None
    links = []
    if other_label: links.append(f'{{ref}}`{other_text} <{other_label}>`')
    if (s := source_link(obj, cfg)): links.append(f'[source]({s})')
    parts = [f'({own_label})=', f'### `{qualname}`', '', ':::{container} ztsnr-doc', doc_markdown(obj, qualname), '']
    if links: parts += [' · '.join(links), '']
    return '\n'.join(parts + [':::'])


def api_symbols(cfg: dict) -> dict[str, list[str]]:
    "module -> public qualnames from `<lib>/_modidx.py` (nbdev's index of exported symbols)."
    p = ROOT / cfg.get('lib_path', cfg.get('lib_name', '')) / '_modidx.py'
    if not p.exists(): return {}
    ns: dict = {}
    exec(compile(p.read_text(encoding='utf-8'), str(p), 'exec'), ns)
    out = {}
    for mod, syms in ns['d'].get('syms', {}).items():
        names = [k[len(mod) + 1:] for k in syms if k.startswith(mod + '.')]
        out[mod] = [n for n in names if not any(part.startswith('_') for part in n.split('.'))]
    return out


# ---------------------------------------------------------------------------------------------------- notebooks

def clean_output(out: dict) -> dict | None:
    out = copy.deepcopy(out)
    if out.get('output_type') == 'stream':
        out['text'] = _ANSI.sub('', ''.join(out.get('text', '')))
        return out if out['text'] else None
    if out.get('output_type') == 'error':
        out['traceback'] = [_ANSI.sub('', l) for l in out.get('traceback', [])]
        return out
    data = out.get('data')
    if data is not None:
        data.pop('application/vnd.jupyter.widget-view+json', None)
        if 'text/plain' in data: data['text/plain'] = _ANSI.sub('', ''.join(data['text/plain']))
        if not data: return None
    return out


def rewrite_markdown(text: str, pages: dict[str, str], badge: str) -> str:
    "Links to other notebooks -> their pages; remote images -> the local Colab badge or a plain link (offline)."
    def nb_link(m):
        name, frag = m.group(2), m.group(3) or ''
        return f'{m.group(1)}({pages[name]}.ipynb{frag})' if name in pages else m.group(0)
    text = re.sub(r'(\]\s*)\((?:\./)?([\w.-]+\.ipynb)(#[^)\s]*)?\)', nb_link, text)
    def stem_link(m):       # `01_schedule` in prose (outside code blocks) -> a link to that notebook's page
        name = m.group(1) + '.ipynb'
        return f'[`{m.group(0)[1:-1]}`]({pages[name]}.ipynb)' if name in pages else m.group(0)
    parts = re.split(r'(```.*?```|~~~.*?~~~)', text, flags=re.S)
    text = ''.join(p if i % 2 else re.sub(r'(?<![\[\w`])`(\d+[a-zA-Z0-9]*_[\w-]+)(?:\.ipynb)?`(?![\]`(])', stem_link, p)
                   for i, p in enumerate(parts))
    def md_img(m):
        if m.group(2) == COLAB_BADGE_URL: return f'![{m.group(1) or "Open in Colab"}]({badge})'
        return f'[{m.group(1) or "image"}]({m.group(2)})'
    text = _MD_IMAGE.sub(md_img, text)
    def html_img(m):
        if m.group(1) == COLAB_BADGE_URL: return m.group(0).replace(COLAB_BADGE_URL, badge)
        return f'<a href="{m.group(1)}">image</a>'
    return _HTML_IMAGE.sub(html_img, text)


def md_cell(text: str) -> dict: return {'cell_type': 'markdown', 'metadata': {}, 'source': text}


def process_notebook(path: Path, pages: dict[str, str], cfg: dict, api: dict[str, list[str]],
                     nb_labels: set[str], badge: str) -> tuple[dict, str | None]:
    nb = json.loads(path.read_text(encoding='utf-8'))
    page, lib = pages[path.name], cfg.get('lib_name', '')
    module, cells = None, []
    for cell in nb.get('cells', []):
        text = src(cell)
        if cell['cell_type'] == 'markdown':
            if text.strip():
                cells.append(md_cell(rewrite_markdown(text, pages, badge)))
                if cell.get('attachments'): cells[-1]['attachments'] = cell['attachments']
            continue
        if cell['cell_type'] != 'code': continue
        d, body = directives(text)
        if 'default_exp' in d: module = f"{lib}.{d['default_exp'].split()[0]}"
        if 'hide' in d or is_false(d.get('include')): continue
        tags = []
        if is_false(d.get('echo')): tags.append('remove-input')
        if is_false(d.get('output')): tags.append('remove-output')
        outputs = [o for o in (clean_output(o) for o in cell.get('outputs', [])) if o]
        if body.strip() or outputs:
            cells.append({'cell_type': 'code', 'execution_count': None, 'metadata': {'tags': tags} if tags else {},
                          'source': body.strip('\n'), 'outputs': outputs})
        export = next((d[k] for k in ('export', 'exports') if k in d), None)
        if export is not None and module:
            target = f'{lib}.{export.split()[0]}' if export.strip() else module
            public = set(api.get(target, []))
            for q in defined_names(body):
                own = label('nb', page, q)
                block = doc_block(target, q, cfg, own, label('api', target, q) if q in public else None, 'API')
                if block: cells.append(md_cell(block)); nb_labels.add(own)
    meta = {k: v for k, v in nb.get('metadata', {}).items() if k not in ('widgets', 'jupytext')}
    meta.update(KERNEL_META)
    return {'cells': cells, 'metadata': meta, 'nbformat': 4, 'nbformat_minor': 5}, module


_IMAGE_MIMES = ('image/png', 'image/jpeg', 'image/svg+xml', 'image/gif')


def expectations(nb: dict) -> dict:
    "What the page must show, for the browser test: image outputs and whether the prose has $-math."
    images = sum(any(m in o.get('data', {}) for m in _IMAGE_MIMES) for c in nb['cells'] for o in c.get('outputs', []))
    prose = '\n'.join(re.sub(r'```.*?```|`[^`\n]*`', '', src(c), flags=re.S) for c in nb['cells']
                      if c['cell_type'] == 'markdown' and not src(c).lstrip().startswith(('(', '```{toctree}')))
    return {'images': images, 'math': bool(re.search(r'\$[^$\n]+\$', prose))}


def first_title(nb: dict, default: str) -> str:
    for c in nb['cells']:
        if c['cell_type'] == 'markdown' and (m := re.search(r'^#\s+(.+?)\s*$', src(c), re.M)): return m.group(1)
    return default


def api_pages(out: Path, api: dict[str, list[str]], mod_page: dict[str, str], titles: dict[str, str], cfg: dict,
              nb_labels: set[str], order: list[str]) -> list[str]:
    "One MyST page per module with every public symbol; api/index lists them. Returns the docnames in order."
    (out / 'api').mkdir(parents=True, exist_ok=True)
    mods = sorted(api, key=lambda m: (order.index(mod_page[m]) if m in mod_page else len(order), m))
    docs, rows = [], []
    for mod in mods:
        if not api[mod]: continue
        page = mod_page.get(mod)
        nb_ref = f'{{doc}}`{titles[page]} <../{page}>`' if page else 'no notebook'
        blocks = []
        for q in api[mod]:
            # link to the symbol's entry in its notebook, else to its class's entry (methods defined in the class body)
            parts = q.split('.')
            cands = [label('nb', page, '.'.join(parts[:k])) for k in range(len(parts), 0, -1)] if page else []
            nbl = next((c for c in cands if c in nb_labels), None)
            b = doc_block(mod, q, cfg, label('api', mod, q), nbl, 'in the notebook')
            if b: blocks.append(b)
        if not blocks: continue
        text = [f'# `{mod}`', '', f'API of `{mod}`, exported from {nb_ref}.', ''] + blocks
        (out / 'api' / f'{mod}.md').write_text('\n\n'.join(text) + '\n', encoding='utf-8')
        docs.append(f'api/{mod}')
        rows.append(f'| {{doc}}`{mod} <{mod}>` | {nb_ref} | {len(blocks)} |')
    idx = ['# API reference', '', 'Every exported, public function and class, with its signature and docstring, '
           'grouped by module. Each entry links to the notebook that explains it.', '',
           '| module | notebook | symbols |', '|---|---|---|', *rows, '',
           '```{toctree}', ':hidden:', '', *[d.split('/', 1)[1] for d in docs], '```', '']
    (out / 'api' / 'index.md').write_text('\n'.join(idx), encoding='utf-8')
    return ['api/index'] + docs


def prepare(nbs: Path, src_dir: Path, cfg: dict) -> dict:
    "Write the Sphinx sources for every notebook into src_dir; returns a summary for the tests."
    if src_dir.exists(): shutil.rmtree(src_dir)
    src_dir.mkdir(parents=True)
    shutil.copy(CONF_DIR / '_static' / 'colab-badge.svg', src_dir / 'colab-badge.svg')
    paths = notebooks(nbs)
    if not paths or paths[0].name != 'index.ipynb':
        raise SystemExit(f'make_docs: {nbs} has no index.ipynb (the home page); notebooks found: {[p.name for p in paths]}')
    pages = page_names(paths)
    api = api_symbols(cfg)
    nb_labels: set[str] = set()
    mod_page, titles, order = {}, {}, []
    processed = {}
    for p in paths:
        page = pages[p.name]
        nb, module = process_notebook(p, pages, cfg, api, nb_labels, 'colab-badge.svg')
        processed[page] = nb
        titles[page] = first_title(nb, p.stem).replace('`', '')
        order.append(page)
        if module: mod_page.setdefault(module, page)
    api_docs = api_pages(src_dir, api, mod_page, titles, cfg, nb_labels, order)
    toc = ['```{toctree}', ':hidden:', ':caption: Notebooks', ':maxdepth: 1', '', *order[1:], '```', '',
           '```{toctree}', ':hidden:', ':caption: Reference', ':maxdepth: 1', '', *api_docs[:1], '```']
    processed['index']['cells'].append(md_cell('\n'.join(toc)))
    for page, nb in processed.items():
        (src_dir / f'{page}.ipynb').write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding='utf-8')
    return {'pages': {p.name: pages[p.name] for p in paths}, 'modules': mod_page, 'api': api_docs,
            'expect': {page: expectations(nb) for page, nb in processed.items()}}


def build(nbs: Path, out: Path, work: Path, strict: bool = False, quiet: bool = False) -> int:
    cfg = settings()
    t0 = time.time()
    src_dir = work / 'docs_src'
    summary = prepare(nbs, src_dir, cfg)
    if out.exists(): shutil.rmtree(out)
    warn_file = work / 'docs_warnings.txt'
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-c', str(CONF_DIR), '-d', str(work / 'docs_doctrees'),
           '-E', '-q', '-w', str(warn_file), '--keep-going', str(src_dir), str(out)]
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    r = subprocess.run(cmd, env=env)
    warns = [l for l in warn_file.read_text(encoding='utf-8').splitlines() if l.strip()] if warn_file.exists() else []
    (out / '_pages.json').write_text(json.dumps(summary, indent=1), encoding='utf-8') if out.exists() else None
    if r.returncode != 0 or not (out / 'index.html').exists():
        print(f'make_docs: sphinx failed (exit {r.returncode}); warnings in {warn_file}', file=sys.stderr)
        return 1
    if warns and not quiet:
        print(f'make_docs: {len(warns)} Sphinx warning(s) (full list in {warn_file}):', file=sys.stderr)
        for w in warns[:30]: print('  ' + w, file=sys.stderr)
    print(f'make_docs: {len(summary["pages"])} notebook pages + {len(summary["api"])} API pages -> {out}/index.html '
          f'in {time.time() - t0:.0f} s')
    return 1 if strict and warns else 0


def main(argv=None) -> int:
    cfg = settings()
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--nbs', type=Path, default=ROOT / cfg.get('nbs_path', 'nbs'), help='notebook folder (default: nbs/)')
    ap.add_argument('--out', type=Path, default=ROOT / cfg.get('doc_path', '_docs'), help='site folder (default: _docs/)')
    ap.add_argument('--work', type=Path, default=ROOT / '_proc', help='intermediate files (default: _proc/)')
    ap.add_argument('--strict', action='store_true', help='also fail on Sphinx warnings')
    ap.add_argument('--quiet', action='store_true', help='do not list the warnings')
    a = ap.parse_args(argv)
    for mod in ('sphinx', 'myst_nb', 'furo'):
        if importlib.util.find_spec(mod) is None:
            sys.exit(f'make_docs: {mod} is not installed: run pip install -e ".[docs]"')
    os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    sys.path.insert(0, str(ROOT))
    return build(a.nbs.resolve(), a.out.resolve(), a.work.resolve(), a.strict, a.quiet)


if __name__ == '__main__':
    sys.exit(main())
