"""The docs site in a real browser: build it offline, serve it on 127.0.0.1, open every page in headless Chromium.

    pytest tests/test_docs_browser.py            # builds the site from nbs/ into a temp folder first (~1 min)
    ZTSNR_DOCS_SITE=_docs pytest tests/test_docs_browser.py   # check an already built site (python .ci/make_docs.py)
    ZTSNR_DOCS_NBS=/tmp/nbs-copy pytest ...      # build from another notebook folder

Needs the `docs` extra (`pip install -e ".[docs]"`) and Debian's `chromium`, which the test installs with apt-get
when it is missing and it runs as root (skipped otherwise). Chromium is driven over the DevTools protocol on a
pipe (`--remote-debugging-pipe`): the standard library is enough, no driver, no websocket package.

Each page fails the test on: a console error or uncaught exception, a request that fails or answers >= 400, any
request that leaves 127.0.0.1 (the site must work offline: no CDN), an internal link to a missing page or anchor,
an image that did not load, a formula that MathJax did not render (or rendered as an error), TeX left as raw text
in prose. The search page must find results offline. One PNG per page goes to artifacts/docs-browser/ (or
$ZTSNR_ARTIFACTS).
"""
from __future__ import annotations

import fcntl, functools, html.parser, importlib.util, json, os, shutil, subprocess, sys, tempfile, threading, time
import base64, urllib.error, urllib.parse, urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get('ZTSNR_ARTIFACTS', ROOT / 'artifacts')) / 'docs-browser'
CHROME_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync',
                '--disable-dev-shm-usage', '--hide-scrollbars', '--mute-audio', '--window-size=1280,1000']
SHOT_MAX_H = 2600          # px of each page captured (top of the page, full width)
PAGE_TIMEOUT = 45


def _load_make_docs():
    spec = importlib.util.spec_from_file_location('make_docs', ROOT / '.ci' / 'make_docs.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def find_chromium() -> str | None:
    for name in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable'):
        if (p := shutil.which(name)): return p
    return None


def ensure_chromium() -> str:
    "Debian's chromium, installed with apt-get when missing (root only; otherwise the test is skipped)."
    if (p := find_chromium()): return p
    if os.geteuid() != 0 or not shutil.which('apt-get'):
        pytest.skip('chromium is not installed and apt-get cannot run here: `apt-get install -y chromium chromium-driver`')
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    subprocess.run(['apt-get', 'update', '-qq'], env=env, check=False, capture_output=True, timeout=600)
    r = subprocess.run(['apt-get', 'install', '-y', '-q', 'chromium', 'chromium-driver', 'fonts-dejavu-core'],
                       env=env, capture_output=True, text=True, timeout=900)
    if (p := find_chromium()) is None: pytest.fail(f'apt-get install chromium failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}')
    return p


# ------------------------------------------------------------------------------------- DevTools protocol on a pipe

class CDP:
    "Minimal Chrome DevTools Protocol client over `--remote-debugging-pipe` (fd 3: commands in, fd 4: messages out)."

    def __init__(self, chrome: str, user_data_dir: str):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # move the child's ends to fds >= 10, then a tiny exec shim places them at 3 and 4 (no preexec_fn: threads)
        a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10); b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.close(to_chrome_r); os.close(from_chrome_w)
        shim = (f'import os, sys; os.dup2({a}, 3); os.dup2({b}, 4); os.close({a}); os.close({b}); '
                'os.execv(sys.argv[1], sys.argv[1:])')
        cmd = [sys.executable, '-c', shim, chrome, *CHROME_FLAGS,
               '--remote-debugging-pipe', f'--user-data-dir={user_data_dir}', 'about:blank']
        self.log = open(Path(user_data_dir).parent / 'chromium.log', 'wb')
        self.proc = subprocess.Popen(cmd, pass_fds=(a, b), stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        os.close(a); os.close(b)
        self._id, self._lock, self._cv = 0, threading.Lock(), threading.Condition()
        self._results: dict[int, dict] = {}
        self.events: list[dict] = []
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        buf = b''
        while True:
            try: chunk = os.read(self._r, 1 << 16)
            except OSError: chunk = b''
            if not chunk: break
            buf += chunk
            while b'\0' in buf:
                raw, buf = buf.split(b'\0', 1)
                msg = json.loads(raw)
                with self._cv:
                    if 'id' in msg: self._results[msg['id']] = msg
                    else: self.events.append(msg)
                    self._cv.notify_all()
        with self._cv: self._cv.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        with self._lock:
            self._id += 1; i = self._id
            msg = {'id': i, 'method': method, 'params': params or {}}
            if session: msg['sessionId'] = session
            os.write(self._w, json.dumps(msg).encode() + b'\0')
        end = time.time() + timeout
        with self._cv:
            while i not in self._results:
                if self.proc.poll() is not None: raise RuntimeError(f'chromium exited ({self.proc.returncode}) during {method}')
                left = end - time.time()
                if left <= 0: raise TimeoutError(f'CDP {method} timed out after {timeout} s')
                self._cv.wait(min(left, 0.5))
            res = self._results.pop(i)
        if 'error' in res: raise RuntimeError(f'CDP {method}: {res["error"]}')
        return res.get('result', {})

    def wait_event(self, method: str, session: str, since: int, timeout: float) -> dict:
        end = time.time() + timeout
        with self._cv:
            while True:
                for e in self.events[since:]:
                    if e.get('method') == method and e.get('sessionId') == session: return e
                left = end - time.time()
                if left <= 0: raise TimeoutError(f'no {method} within {timeout} s')
                self._cv.wait(min(left, 0.5))

    def close(self):
        try: self.send('Browser.close', timeout=5)
        except Exception: pass
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        for fd in (self._w, self._r):
            try: os.close(fd)
            except OSError: pass
        self.log.close()


# -------------------------------------------------------------------------------------------------------- page checks

CHECK_JS = r"""
(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  if (window.MathJax) {
    for (let i = 0; i < 200 && !(MathJax.startup && MathJax.startup.promise); i++) await sleep(50);
    if (MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  }
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.currentSrc || i.src);
  const maths = [...document.querySelectorAll('.math')];
  const unrendered = maths.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80));
  const errors = [...document.querySelectorAll('mjx-merror, mjx-container [data-mjx-error]')].map(
      e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 120));
  const skip = 'pre, code, script, style, textarea, mjx-container, .highlight, .math, .cell_output, .output';
  const raw = [], tex = /\$[^$\n]*\\[A-Za-z]+[^$\n]*\$|\\\(|\\\[|\\begin\{/;
  const walker = document.createTreeWalker(document.querySelector('article') || document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const n = walker.currentNode;
    if (n.parentElement && !n.parentElement.closest(skip) && tex.test(n.textContent)) raw.push(n.textContent.slice(0, 120));
  }
  const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
  return {title: document.title, h1: (document.querySelector('h1') || {}).textContent || '',
          images: imgs.length, broken, maths: maths.length, rendered: document.querySelectorAll('mjx-container').length,
          unrendered, errors, raw, links, height: document.documentElement.scrollHeight,
          text: (document.querySelector('article') || document.body).innerText.length};
})()
"""


class _IdCollector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(); self.ids = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ('id', 'name') and v: self.ids.add(v)


class Site:
    "The built site served on 127.0.0.1 by a thread; cached fetches of its pages for link checks."

    def __init__(self, folder: Path):
        self.folder = folder
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), handler)
        self.base = f'http://127.0.0.1:{self.httpd.server_address[1]}/'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self._ids: dict[str, set | int] = {}

    def ids(self, url: str):
        "Set of element ids of a local page, or an HTTP status int when it cannot be fetched."
        if url not in self._ids:
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    body = r.read()
                    if 'html' in r.headers.get('Content-Type', ''):
                        p = _IdCollector(); p.feed(body.decode('utf-8', 'replace')); self._ids[url] = p.ids
                    else: self._ids[url] = set()
            except urllib.error.HTTPError as e: self._ids[url] = e.code
            except Exception: self._ids[url] = 0
        return self._ids[url]

    def close(self): self.httpd.shutdown(); self.httpd.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *a): pass


def check_page(cdp: CDP, session: str, site: Site, url: str, shot: Path) -> tuple[list[str], dict]:
    problems: list[str] = []
    since = len(cdp.events)
    cdp.send('Page.navigate', {'url': url}, session)
    cdp.wait_event('Page.loadEventFired', session, since, PAGE_TIMEOUT)
    info = cdp.send('Runtime.evaluate', {'expression': CHECK_JS, 'awaitPromise': True, 'returnByValue': True},
                    session, timeout=PAGE_TIMEOUT)
    if 'exceptionDetails' in info: problems.append(f'check script failed: {info["exceptionDetails"]}')
    r = info.get('result', {}).get('value') or {}
    time.sleep(0.3)                                        # let late console messages and requests arrive
    m = cdp.send('Page.getLayoutMetrics', {}, session)
    h = min(SHOT_MAX_H, int(m.get('cssContentSize', m.get('contentSize', {})).get('height', 1000)))
    png = cdp.send('Page.captureScreenshot', {'format': 'png', 'captureBeyondViewport': True,
                                              'clip': {'x': 0, 'y': 0, 'width': 1280, 'height': max(h, 200), 'scale': 1}},
                   session, timeout=PAGE_TIMEOUT)
    shot.write_bytes(base64.b64decode(png['data']))
    with cdp._cv: evs = [e for e in cdp.events[since:] if e.get('sessionId') == session]
    reqs = {}
    for e in evs:
        meth, p = e['method'], e.get('params', {})
        if meth == 'Runtime.consoleAPICalled' and p.get('type') in ('error', 'assert'):
            problems.append('console error: ' + ' '.join(str(a.get('value', a.get('description', ''))) for a in p.get('args', [])))
        elif meth == 'Runtime.exceptionThrown':
            d = p.get('exceptionDetails', {})
            problems.append(f'uncaught exception: {d.get("exception", {}).get("description", d.get("text"))}')
        elif meth == 'Log.entryAdded' and p.get('entry', {}).get('level') == 'error':
            problems.append(f'console error: {p["entry"].get("text")} {p["entry"].get("url", "")}'.strip())
        elif meth == 'Network.requestWillBeSent':
            u = p['request']['url']; reqs[p['requestId']] = u
            if not u.startswith((site.base, 'data:', 'blob:', 'about:')): problems.append(f'request leaves the site (offline?): {u}')
        elif meth == 'Network.responseReceived' and p['response'].get('status', 200) >= 400:
            problems.append(f'HTTP {p["response"]["status"]} for {p["response"]["url"]}')
        elif meth == 'Network.loadingFailed' and not p.get('canceled'):
            problems.append(f'request failed ({p.get("errorText")}): {reqs.get(p["requestId"], p["requestId"])}')
    for b in r.get('broken', []): problems.append(f'image did not load: {b}')
    for u in r.get('unrendered', []): problems.append(f'formula not rendered by MathJax: {u!r}')
    for x in r.get('errors', []): problems.append(f'formula rendered as an error: {x!r}')
    for x in r.get('raw', []): problems.append(f'raw TeX in the text (math not parsed): {x!r}')
    if r.get('maths', 0) and r.get('rendered', 0) < r.get('maths', 0):
        problems.append(f'{r["maths"]} formulas, only {r["rendered"]} rendered')
    if not r.get('h1') and not url.split('?')[0].endswith('/search.html'): problems.append('page has no <h1> title')
    for link in sorted(set(r.get('links', []))):
        if not link.startswith(site.base): continue
        page, frag = urllib.parse.urldefrag(link)
        ids = site.ids(page)
        if isinstance(ids, int): problems.append(f'broken internal link: {link} (HTTP {ids or "error"})')
        elif frag and urllib.parse.unquote(frag) not in ids: problems.append(f'broken internal link: {link} (no #{frag} there)')
    return problems, r


@pytest.fixture(scope='module')
def site_dir(tmp_path_factory):
    if (given := os.environ.get('ZTSNR_DOCS_SITE')):
        p = Path(given).resolve()
        assert (p / 'index.html').exists(), f'ZTSNR_DOCS_SITE={given} has no index.html: run python .ci/make_docs.py'
        return p
    for mod in ('sphinx', 'myst_nb', 'furo'):
        if importlib.util.find_spec(mod) is None: pytest.skip(f'{mod} missing: pip install -e ".[docs]"')
    tmp = tmp_path_factory.mktemp('docs')
    nbs = os.environ.get('ZTSNR_DOCS_NBS', str(ROOT / 'nbs'))
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / '.ci' / 'make_docs.py'), '--nbs', nbs, '--out', str(tmp / 'site'),
                        '--work', str(tmp / 'work')], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1')))
    print(r.stdout[-3000:], r.stderr[-3000:], f'(built in {time.time() - t0:.0f} s)')
    assert r.returncode == 0, f'make_docs failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}'
    return tmp / 'site'


def test_docs_site_in_browser(site_dir, tmp_path):
    chrome = ensure_chromium()
    summary = json.loads((site_dir / '_pages.json').read_text())
    # every notebook has its page, and every page of the site is opened
    for nb, page in summary['pages'].items():
        assert (site_dir / f'{page}.html').exists(), f'{nb} has no page {page}.html'
    assert next(iter(summary['pages'])) == 'index.ipynb', 'index.ipynb must be the first page'
    pages = sorted(p.relative_to(site_dir).as_posix() for p in site_dir.rglob('*.html')
                   if not p.relative_to(site_dir).parts[0].startswith('_'))
    order = ['index.html'] + [f'{p}.html' for p in summary['pages'].values() if p != 'index']
    pages = order + [p for p in pages if p not in order]
    if ARTIFACTS.exists(): shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    (ARTIFACTS.parent / '.gitignore').write_text('*\n')       # screenshots are artifacts, never committed
    site = Site(site_dir)
    udd = tmp_path / 'chrome-profile'; udd.mkdir()
    cdp = CDP(chrome, str(udd))
    failures, report, t0 = {}, [], time.time()
    try:
        target = cdp.send('Target.createTarget', {'url': 'about:blank'})['targetId']
        session = cdp.send('Target.attachToTarget', {'targetId': target, 'flatten': True})['sessionId']
        for dom in ('Page', 'Runtime', 'Log', 'Network'): cdp.send(f'{dom}.enable', {}, session)
        cdp.send('Emulation.setDeviceMetricsOverride', {'width': 1280, 'height': 1000, 'deviceScaleFactor': 1,
                                                         'mobile': False}, session)
        for i, page in enumerate(pages):
            shot = ARTIFACTS / f'{i:02d}_{page.replace("/", "_").removesuffix(".html")}.png'
            probs, r = check_page(cdp, session, site, site.base + page, shot)
            exp = summary.get('expect', {}).get(page.removesuffix('.html'))
            if exp and r.get('images', 0) < exp['images']:
                probs.append(f'{exp["images"]} image outputs in the notebook, {r.get("images", 0)} images on the page')
            if exp and exp['math'] and not r.get('rendered'): probs.append('the notebook has $-math, the page no formula')
            report.append(f'{page}: {r.get("maths", 0)} formulas, {r.get("images", 0)} images, '
                          f'{len(r.get("links", []))} links, {len(probs)} problems')
            if probs: failures[page] = probs
        # offline search: Sphinx's search page must find a word every page of this project uses
        probs, r = check_page(cdp, session, site, site.base + 'search.html?q=noise', ARTIFACTS / 'zz_search.png')
        n = cdp.send('Runtime.evaluate', {'expression': "new Promise(res => { let k = 0; const t = setInterval(() => {"
                     " const n = document.querySelectorAll('#search-results li').length;"
                     " if (n || ++k > 100) { clearInterval(t); res(n); } }, 100); })",
                     'awaitPromise': True, 'returnByValue': True}, session, timeout=30)['result']['value']
        if not n: probs.append('search for "noise" found nothing')
        if probs: failures['search.html?q=noise'] = probs
        report.append(f'search.html?q=noise: {n} results')
    finally:
        cdp.close(); site.close()
    (ARTIFACTS / 'report.txt').write_text('\n'.join(report + ['', json.dumps(failures, indent=1)]) + '\n')
    print('\n'.join(report), f'\n{len(pages)} pages in {time.time() - t0:.0f} s; screenshots in {ARTIFACTS}')
    assert not failures, 'docs pages with problems:\n' + '\n'.join(
        f'{p}:\n  ' + '\n  '.join(v[:15]) + (f'\n  ... {len(v) - 15} more' if len(v) > 15 else '') for p, v in failures.items())
