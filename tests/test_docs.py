"""The docs website, as a reader gets it: built from a copy of the project with `nbdev-docs`, served on 127.0.0.1,
and every page opened in headless Chromium. Screenshots of each page go to `_docs_check/` (git-ignored), or to
the folder in `SFT_NB_DOCS_SHOTS`.

Quarto comes from PATH, or from the offline provisioning script beside the project
(`../shared/tools/quarto/setup.sh`); Chromium from the Debian packages `chromium` and `chromium-driver`. Without
them the test skips with its reason; with `CI=true` it never skips.
"""
import functools, html.parser, http.server, json, os, re, shutil, subprocess, sys, threading
from pathlib import Path
from urllib.parse import urljoin, urlparse, unquote
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get('SFT_NB_DOCS_SHOTS', ROOT/'_docs_check'))
TRACEBACK = 'Traceback (most recent call last)'
GENERATED = ('nbdev.yml', '_quarto.yml', 'sidebar.yml')  # nbdev rewrites these when they differ from pyproject


def _unavailable(reason):
    if os.environ.get('CI') == 'true':
        pytest.fail(f"{reason} (CI=true: the docs check never skips)")
    pytest.skip(reason)


def find_quarto() -> str|None:
    "Quarto on PATH, else the one the offline provisioning script installs (and prints)"
    found = shutil.which('quarto')
    if found:
        return found
    setup = ROOT.parent/'shared'/'tools'/'quarto'/'setup.sh'
    if not setup.exists():
        return None
    r = subprocess.run(['bash', str(setup)], capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    return lines[-1] if r.returncode == 0 and lines else None


def _copy_project(dst:Path):
    for name in ('pyproject.toml', 'README.md', 'LICENSE'):
        if (ROOT/name).exists():
            shutil.copy(ROOT/name, dst)
    ignore = shutil.ignore_patterns('_site', '.quarto', '*.ipynb_checkpoints', '__pycache__', '.check-*')
    shutil.copytree(ROOT/'nbs', dst/'nbs', ignore=ignore)
    shutil.copytree(ROOT/'sft_nb', dst/'sft_nb', ignore=ignore)


@pytest.fixture(scope='module')
def site(tmp_path_factory) -> Path:
    "Build the site from a copy, so the checkout is never touched (or check the one in `SFT_NB_DOCS_SITE`)"
    if os.environ.get('SFT_NB_DOCS_SITE'):
        return Path(os.environ['SFT_NB_DOCS_SITE'])
    quarto = find_quarto()
    if quarto is None:
        _unavailable("Quarto is not on PATH and ../shared/tools/quarto/setup.sh is not there to provision it")
    dst = tmp_path_factory.mktemp('docs')
    _copy_project(dst)
    env = {**os.environ, 'PATH': f"{Path(quarto).parent}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                                  f"{os.environ.get('PATH', '')}",
           'HF_HUB_OFFLINE': '1', 'TQDM_DISABLE': '1'}
    r = subprocess.run([sys.executable, '-c', 'from nbdev.quarto import nbdev_docs; nbdev_docs()'],
                       cwd=dst, env=env, capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, f"nbdev-docs failed:\n{r.stdout[-3000:]}\n{r.stderr[-8000:]}"
    changed = [name for name in GENERATED if (dst/'nbs'/name).read_text() != (ROOT/'nbs'/name).read_text()]
    assert not changed, f"building the docs rewrote {changed}: commit what nbdev generates"
    return dst/'_docs'


@pytest.fixture(scope='module')
def server(site):
    "Serve the built site on 127.0.0.1, as a browser would load it"
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def browser():
    "Headless Chromium driven by Selenium"
    chromium = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
    driver_path = shutil.which('chromedriver')
    if chromium is None or driver_path is None:
        _unavailable("no Chromium: install the Debian packages chromium and chromium-driver")
    try:
        from selenium import webdriver
    except ImportError:
        _unavailable("selenium is not installed (it is in the dev extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                 '--window-size=1280,1600'):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


class _Links(html.parser.HTMLParser):
    "The ids and the link targets of one page"
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get('id'):
            self.ids.add(attrs['id'])
        if tag == 'a' and attrs.get('href'):
            self.hrefs.append(attrs['href'])


def pages(site:Path) -> list[Path]:
    "Every HTML page of the site, without Quarto's own libraries"
    return sorted(p for p in site.rglob('*.html') if 'site_libs' not in p.parts)


def _parse(path:Path) -> _Links:
    links = _Links()
    links.feed(path.read_text(errors='replace'))
    return links


def site_url() -> str:
    "Where the site is published: nbdev writes its own API links with this prefix"
    import yaml
    return yaml.safe_load((ROOT/'nbs'/'nbdev.yml').read_text())['website']['site-url'].rstrip('/') + '/'


def broken_links(site:Path) -> list[str]:
    "Internal links (relative, or absolute to the published site) whose page or `#anchor` is missing"
    parsed = {p: _parse(p) for p in pages(site)}
    published = site_url()
    broken = []
    for page, links in parsed.items():
        for href in links.hrefs:
            url = urlparse(href)
            if href.startswith(published):
                url = urlparse(href[len(published):])
                target = (site/unquote(url.path or 'index.html')).resolve()
            elif url.scheme or url.netloc or href.startswith(('mailto:', 'javascript:')):
                continue
            else:
                target = page if not url.path else (page.parent/unquote(url.path)).resolve()
            if target.is_dir():
                target = target/'index.html'
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: {href} (no such page)")
                continue
            ids = parsed[target].ids if target in parsed else _parse(target).ids
            if url.fragment and target.suffix == '.html' and unquote(url.fragment) not in ids:
                broken.append(f"{page.relative_to(site)}: {href} (no #{url.fragment} there)")
    return broken


def documented_symbols() -> dict[str, list[str]]:
    "Each page's public functions and classes, from nbdev's index: page -> names"
    from sft_nb._modidx import d
    wanted = {}
    for module, symbols in d['syms'].items():
        for symbol, (link, _) in symbols.items():
            name = symbol[len(module) + 1:]
            if '.' in name or name.startswith('_'):
                continue
            page = link.partition('#')[0]
            wanted.setdefault(page, []).append(name)
    return wanted


def sidebar_pages() -> list[str]:
    "The notebooks nbs/sidebar.yml lists, in order"
    import yaml
    found = []
    def walk(items):
        for item in items:
            if isinstance(item, dict):
                walk(item.get('contents', []))
            else:
                found.append(item)
    walk(yaml.safe_load((ROOT/'nbs'/'sidebar.yml').read_text())['website']['sidebar']['contents'])
    return found


def test_sidebar_lists_every_notebook_once():
    "The sidebar is written by hand (Getting started / Tutorials / API), so a new notebook must be added to it"
    nbs = ROOT/'nbs'
    notebooks = sorted(str(p.relative_to(nbs)) for p in nbs.rglob('*.ipynb')
                       if not any(part.startswith(('_', '.')) for part in p.relative_to(nbs).parts))
    listed = sidebar_pages()
    assert sorted(listed) == notebooks, f"missing: {set(notebooks) - set(listed)}, extra: {set(listed) - set(notebooks)}"


def test_benchmark_table_is_the_measured_one():
    "README's (and so the home page's) benchmark table is bench/table.py's rendering of bench/results/*.json"
    for path in ('README.md', 'nbs/index.ipynb'):
        r = subprocess.run([sys.executable, 'bench/table.py', '--check', path], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_every_link_and_anchor_resolves(site):
    broken = broken_links(site)
    assert not broken, '\n'.join(broken)


def has_signature(page_html:str, name:str) -> bool:
    "Whether `show_doc(name)` rendered on the page: a heading with the name, then its signature"
    heading = rf'<h[34][^>]*>\s*(?:<code>)?{re.escape(name)}(?:</code>)?\s*</h[34]>'
    signature = rf'\s*<div class="sourceCode"[^>]*>.{{0,600}}?{re.escape(name)}</span>\s*\(|{re.escape(name)}\s*\('
    return re.search(heading + r'(?:(?!</section>).){0,1500}?' + f'(?:{signature})', page_html, re.S) is not None


def test_every_public_function_has_its_signature(site):
    missing = []
    for page, names in documented_symbols().items():
        path = site/page
        if not path.exists():
            missing.append(f"{page}: no such page")
            continue
        page_html = path.read_text(errors='replace')
        missing += [f"{page}: {name}" for name in names if not has_signature(page_html, name)]
    assert not missing, f"no show_doc signature for: {missing}"


def _check_page(driver, base:str, page:str) -> list[str]:
    "Open one page and list what a reader would find wrong with it"
    driver.get(urljoin(base, page))
    problems = []
    if not driver.find_elements('css selector', '#quarto-sidebar'):
        problems.append('no sidebar')
    if not driver.find_elements('css selector', '#quarto-header nav.navbar'):
        problems.append('no navbar')
    if TRACEBACK in driver.find_element('tag name', 'body').text:
        problems.append('a Python traceback')
    external = driver.execute_script(
        "return [...document.querySelectorAll('script[src], link[rel=stylesheet]')]"
        ".map(e => e.src || e.href).filter(u => !u.startsWith(location.origin))")
    problems += [f"loads {url} from another host (the site must work offline)" for url in external]
    if driver.find_elements('css selector', 'main .math'):
        if not driver.find_elements('css selector', 'main .math .katex'):
            problems.append('formulas not rendered by KaTeX')
    for img in driver.find_elements('css selector', 'main img'):
        if not driver.execute_script('return arguments[0].complete && arguments[0].naturalWidth > 0', img):
            problems.append(f"image not loaded: {img.get_attribute('src')}")
    height = driver.execute_script('return document.documentElement.scrollHeight')
    driver.set_window_size(1280, min(max(height, 800), 16000))  # the whole page, results included
    shot = SHOTS/(page.replace('/', '__').removesuffix('.html') + '.png')
    driver.save_screenshot(str(shot))
    driver.set_window_size(1280, 1600)
    return problems


def test_every_page_in_a_browser(site, server, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    problems = {}
    for path in pages(site):
        page = str(path.relative_to(site))
        found = _check_page(browser, server, page)
        if found:
            problems[page] = found
    assert not problems, json.dumps(problems, indent=1)


def test_results_are_on_the_pages(site, server, browser):
    "The trainer tutorial's loss curve has loaded, and the data page highlights the trained tokens"
    browser.get(urljoin(server, 'trainer.html'))
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('main img')].filter(i => i.complete && i.naturalWidth > 0).length")
    assert loaded >= 1, "trainer.html shows no loaded image (the loss curve)"
    browser.get(urljoin(server, 'data.html'))
    marks = browser.find_elements('css selector', 'main mark')
    assert any(m.is_displayed() and m.size['width'] > 0 for m in marks), "data.html highlights no trained tokens"


def test_tutorials_show_their_results(site, server, browser):
    "The chat tutorial shows its highlighted row, its answers table and its loss curve; the QLoRA twin its results"
    browser.get(urljoin(server, 'tutorials/chat_sft.html'))
    main = browser.find_element('css selector', 'main')
    assert any(m.is_displayed() for m in main.find_elements('css selector', 'mark')), "no highlighted tokens"
    headers = [th.text for th in main.find_elements('css selector', 'table th')]
    assert {'question', 'before', 'after', 'expected'} <= set(headers), headers
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('main img')].filter(i => i.complete && i.naturalWidth > 0).length")
    assert loaded >= 1, "chat_sft.html shows no loaded image (the loss curves)"
    assert 'right before training: 0/36' in main.text
    browser.get(urljoin(server, 'tutorials/qlora.html'))
    text = browser.find_element('css selector', 'main').text
    assert 'held-out questions right: 0/36 before' in text and 'NF4, nested GiB' in text
