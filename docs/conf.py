# Sphinx configuration for the offline docs site (built by `python .ci/make_docs.py`, not by running sphinx by hand).
# The page sources are generated from nbs/*.ipynb into _proc/docs_src/ by make_docs.py; this folder only holds the
# configuration and static files, so nothing here ships in the package.
import os
from configparser import ConfigParser
from pathlib import Path

_root = Path(__file__).resolve().parent.parent
_cfg = ConfigParser(delimiters=['='])
_cfg.read(_root / 'settings.ini', encoding='utf-8')
_s = _cfg['DEFAULT']

project = _s.get('title', _s.get('lib_name', 'docs'))
author = _s.get('author', '')
copyright = _s.get('copyright', '')
release = version = _s.get('version', '')

extensions = [
    'myst_nb',                  # notebooks (committed outputs, never executed here) and MyST markdown pages
    'sphinx-mathjax-offline',   # MathJax 3 shipped inside a PyPI package, copied into _static/mathjax: no CDN
]
root_doc = 'index'
exclude_patterns = ['_build', '**/.ipynb_checkpoints', 'jupyter_execute']

# MyST: $...$ / $$...$$ math as nbdev notebooks write it, ::: fences, HTML images, heading anchors for links.
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'html_image']
myst_dmath_double_inline = True
myst_heading_anchors = 3
# myst-nb: render the outputs stored in the notebooks; never start a kernel during a docs build.
nb_execution_mode = 'off'
nb_merge_streams = True
nb_output_stderr = 'show'
nb_ipywidgets_js = {}           # no require.js / widget manager from a CDN (widget outputs are dropped by make_docs)
nb_render_markdown_format = 'myst'

suppress_warnings = ['myst.header', 'mystnb.unknown_mime_type']

html_theme = 'furo'
html_title = f'{project} {release}'
html_static_path = ['_static']
html_favicon = '_static/favicon.svg'     # also stops browsers from asking for a missing /favicon.ico
html_css_files = ['ztsnr_docs.css']
html_copy_source = False
html_show_sourcelink = False
html_last_updated_fmt = None
html_theme_options = {'navigation_with_keys': True}
# Same look with or without network: furo and Sphinx's search ship all their assets, MathJax comes from the
# sphinx-mathjax-offline package (mathjax_path = mathjax/tex-chtml.js under _static).
