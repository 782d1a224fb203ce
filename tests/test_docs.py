"""The documentation site builds with ``mkdocs build --strict`` and works in a real browser.

* The site is built once per session (``--strict``: a broken internal link, a page outside the
  navigation, an unresolved docstring reference or a docstring mkdocstrings cannot parse fails it),
  served on localhost from a thread, and every page is opened in headless Chromium (Debian's
  ``/usr/bin/chromium`` driven by Playwright's Python package; no browser is downloaded). A console
  error, a page error, a failed same-origin request, an image that did not load (``naturalWidth``
  0) or an internal link to a page that does not exist fails the test. Screenshots of the home
  page and of one tutorial page are written to ``$LDD_DOCS_SCREENSHOT_DIR`` (default: the system's
  temporary directory) for a person to look at.
* The configuration reference is generated from the typed configs: a field added to a method's
  class shows up in the generated page with no other edit, and every field of every method class
  named in ``conf/method/`` is on the built page.

Skipped only when MkDocs is not installed (``pip install -e ".[dev]"`` installs it); CI's
``.ci/run`` installs Debian's chromium.
"""
from __future__ import annotations

import functools
import html
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, load_script

pytest.importorskip("mkdocs", reason="MkDocs is not installed: pip install -e '.[dev]' installs the docs tools")

pytestmark = pytest.mark.slow  # the strict build renders the whole API (~40 s on 2 cores), then ~60 pages

CHROMIUM = os.environ.get("LDD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOTS = Path(os.environ.get("LDD_DOCS_SCREENSHOT_DIR", tempfile.gettempdir()))


def _hook():
    return load_script("docs/_hooks/ldd_docs.py")


# ----------------------------------------------------------------------------------------------------
# the build


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "WARNING" in ln or "ERROR" in ln]
    assert r.returncode == 0, f"mkdocs build --strict failed ({seconds:.0f} s):\n" + "\n".join(
        problems or (r.stdout + r.stderr).splitlines()[-40:])
    print(f"\nmkdocs build --strict: {seconds:.1f} s, {len(list(out.rglob('index.html')))} pages")
    return out


def test_site_has_every_section(site):
    pages = {p.parent.relative_to(site).as_posix() for p in site.rglob("index.html")}
    for must in ("getting-started", "tutorials/image-distillation", "tutorials/statistics-matching",
                 "tutorials/selection-dq", "tutorials/graph-condensation", "tutorials/qat-vit",
                 "tutorials/point-video", "how-to/own-image-folder", "how-to/own-graph",
                 "how-to/evaluate-released", "how-to/sweep-compare", "how-to/resume", "how-to/multi-gpu-slurm",
                 "how-to/add-method", "how-to/add-dataset", "reference/config/method", "reference/config/eval",
                 "reference/api/results", "reference/api/methods"):
        assert must in pages, f"no page {must}/ in the built site"
    for d in (ROOT / "experiments").iterdir():
        if (d / "README.md").is_file():
            assert f"results/{d.name}" in pages, f"experiments/{d.name}/README.md has no results page"
            for pic in d.glob("*.png"):
                assert (site / "results" / d.name / pic.name).is_file(), f"{pic} was not published"
    # the API page renders the docstring of a public class, fields included
    api = (site / "reference/api/results/index.html").read_text()
    assert "DistilledSet" in api and "soft-label logits" in api


# ----------------------------------------------------------------------------------------------------
# the config reference is generated from the typed configs


def test_a_new_typed_field_appears_in_the_config_reference(monkeypatch):
    import lightning_dd.methods.images.trajectory_matching as tm
    from lightning_dd.core.config import PositiveInt

    hook = _hook()
    before = hook.config_pages()["reference/config/method.md"]
    assert "method.docs_probe_steps" not in before

    class WithProbe(tm.TrajectoryMatchingMethod):
        """Trajectory matching with one more typed field (the docs test's probe)."""

        docs_probe_steps: PositiveInt = 7

    monkeypatch.setattr(tm, "TrajectoryMatchingMethod", WithProbe)  # what conf/method/datm.yaml's _target_ names
    page = hook.config_pages()["reference/config/method.md"]
    rows = [ln for ln in page.splitlines() if ln.startswith("| `method.docs_probe_steps`")]
    assert len(rows) == 2, rows  # method=datm and method=mtt both build the class
    assert all("int (> 0)" in r and "`7`" in r for r in rows), rows


def test_a_new_yaml_key_and_comment_appear_in_the_config_reference(tmp_path):
    hook = _hook()
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    with open(conf / "logger" / "default.yaml", "a") as f:
        f.write("docs_probe_every: 3     # the docs test's probe key\n")
    page = hook.config_pages(conf)["reference/config/logger.md"]
    assert re.search(r"\| `logger.docs_probe_every` \| .*`3` \| the docs test's probe key \|", page), page


def test_every_field_of_every_method_class_is_on_the_built_page(site):
    hook = _hook()
    text = html.unescape((site / "reference/config/method/index.html").read_text())
    for f in sorted((ROOT / "conf" / "method").glob("*.yaml")):
        cls = hook.locate(hook.load_option(ROOT / "conf", "method", f.stem)["_target_"])
        for name, field in cls.model_fields.items():
            assert f"method.{name}" in text, f"{f.name}: method.{name} is not on the method reference page"
    from lightning_dd.evaluate.images import ImageEvalConfig

    text = html.unescape((site / "reference/config/eval/index.html").read_text())
    assert all(f"eval.{name}" in text for name in ImageEvalConfig.model_fields)
    assert "'dsa' | 'crop_flip' | 'none'" in text  # allowed values of eval.augment


# ----------------------------------------------------------------------------------------------------
# every page in a real browser


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a navigation cancels loads
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def served(site):
    handler = functools.partial(_Quiet, directory=str(site))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _need_browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        pytest.fail("Playwright's Python package is missing: pip install -e '.[dev]' installs it")


def browse(base: str, pages: list[str], profile: Path, screenshots: dict[str, Path] | None = None) -> list[str]:
    """Open ``base + page`` for every page in headless Chromium; the problems found: console and
    page errors, failed or >= 400 same-origin requests, images with ``naturalWidth`` 0, internal
    links (fragment dropped) that do not answer 200. ``screenshots``: page -> PNG path."""
    from playwright.sync_api import sync_playwright

    origin = base.rstrip("/")
    problems: list[str] = []
    links: dict[str, str] = {}
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                    args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        current = {"url": ""}
        page.on("console", lambda m: m.type == "error" and problems.append(f"{current['url']}: console error: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"{current['url']}: page error: {e}"))
        page.on("requestfailed", lambda r: r.url.startswith(origin) and problems.append(
            f"{current['url']}: request failed: {r.url} ({r.failure})"))
        page.on("response", lambda r: r.url.startswith(origin) and r.status >= 400 and problems.append(
            f"{current['url']}: HTTP {r.status} for {r.url}"))
        for rel in pages:
            url = base + rel
            current["url"] = url
            page.goto(url, wait_until="load")
            page.wait_for_load_state("networkidle")
            broken = page.evaluate("""() => Array.from(document.images)
                .filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'))""")
            problems += [f"{url}: image did not load: {src}" for src in broken]
            for href in page.evaluate("() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"):
                target = urllib.parse.urldefrag(href).url
                if target.startswith(origin):
                    links.setdefault(target, url)
            if screenshots and rel in screenshots:
                page.screenshot(path=str(screenshots[rel]), full_page=rel != "")
        ctx.close()
    problems += [f"dead internal link: {target} (linked from {where})" for target, where in sorted(links.items())
                 if _status(target) != 200]
    return problems


def test_the_browser_check_finds_what_it_looks_for(tmp_path):
    """A tiny site with a console error, a missing image and a dead link: each is reported."""
    _need_browser()
    root = tmp_path / "mini"
    root.mkdir()
    (root / "index.html").write_text('<html><body><a href="ok.html">ok</a> <a href="gone.html">gone</a>'
                                     '<img src="missing.png"><script>console.error("boom")</script></body></html>')
    (root / "ok.html").write_text("<html><body>fine</body></html>")
    handler = functools.partial(_Quiet, directory=str(root))
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        problems = browse(base, ["", "ok.html"], tmp_path / "profile")
    finally:
        server.shutdown()
        server.server_close()
    text = "\n".join(problems)
    assert "console error: boom" in text, text
    assert "image did not load: missing.png" in text, text
    assert "dead internal link: " + base + "gone.html" in text, text
    assert not any("ok.html" in p for p in problems if "dead" in p), text


def test_every_page_in_headless_chromium(site, served, tmp_path):
    _need_browser()
    pages = sorted(p.parent.relative_to(site).as_posix() for p in site.rglob("index.html"))
    pages = ["" if p == "." else p + "/" for p in pages]
    shots = {"": SCREENSHOTS / "ldd_docs_home.png", "tutorials/selection-dq/": SCREENSHOTS / "ldd_docs_tutorial.png"}
    t0 = time.perf_counter()
    problems = browse(served, pages, tmp_path / "profile", shots)
    print(f"\n{len(pages)} pages in Chromium, {time.perf_counter() - t0:.1f} s; screenshots: "
          f"{shots[''] }, {shots['tutorials/selection-dq/']}")
    assert len(pages) > 40
    assert all(p.is_file() for p in shots.values())
    assert not problems, "\n".join(problems)
