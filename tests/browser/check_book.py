"""Open every page of the built book in headless Chromium and check that it really rendered.

    python tests/browser/check_book.py [--book book] [--install]

Serves ``book/_build/html`` on 127.0.0.1 (python's http.server), opens each page listed in
``book/_toc.yml`` and, through the Chrome DevTools Protocol, asserts in the live page that

* every ``<img>`` finished loading with ``naturalWidth > 0`` (a broken figure has width 0),
* every table in the page body has rows, cells and a non-zero rendered height,
* the page has a heading,
* every equation was typeset by MathJax (served from the book itself, so this holds offline),
* every chapter (a page under ``executed/`` or ``shipped/``) shows its freshness banner (the
  commit and input key it ran from, ``esmerge.regen.sphinx_freshness``),

and saves a full-page screenshot per page under ``book/_build/screenshots/<scale>/`` (the scale
of the last build; CI keeps that folder as an artefact). The protocol runs
over ``--remote-debugging-pipe`` (file descriptors 3 and 4), so no port and no websocket library
are needed. ``--install`` installs Debian's ``chromium`` with apt-get when no browser is found.
Exits non-zero, listing every problem, if any page fails.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT = (1280, 900)
MAX_SHOT_HEIGHT = 6000  # px; long chapters are cut here rather than making huge PNGs
CHAPTER_DIRS = ("executed/", "shipped/")  # pages rendered from executed notebooks

# Runs in the page: waits for every image to settle, then reports images, tables and headings.
PAGE_PROBE = """
(async () => {
  const images = Array.from(document.images);
  images.forEach(img => { img.loading = 'eager'; });
  await Promise.all(images.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener('load', done); img.addEventListener('error', done); setTimeout(done, 10000);
  })));
  // MathJax typesets after load; wait for it so unrendered TeX is caught, not raced.
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await Promise.race([MathJax.startup.promise, new Promise(done => setTimeout(done, 10000))]);
  }
  const body = document.querySelector('main') || document.body;
  return {
    math: body.querySelectorAll('.math').length,
    banners: body.querySelectorAll('.esmerge-freshness').length,
    mathRendered: body.querySelectorAll('mjx-container').length,
    title: document.title,
    heading: (body.querySelector('h1') || {}).textContent || '',
    images: images.map(img => ({src: img.getAttribute('src'), naturalWidth: img.naturalWidth,
                                complete: img.complete})),
    tables: Array.from(body.querySelectorAll('table')).map(t => ({
      rows: t.rows.length, cells: t.querySelectorAll('td, th').length,
      height: t.getBoundingClientRect().height, text: (t.innerText || '').trim().slice(0, 60)})),
  };
})()
"""


def find_browser(install: bool) -> str:
    """Path of a Chromium-family browser; with ``install``, apt-get installs Debian's chromium."""
    for name in ([os.environ["CHROME"]] if os.environ.get("CHROME") else []) + list(BROWSERS):
        path = shutil.which(name)
        if path:
            return path
    if install:
        prefix = [] if os.geteuid() == 0 else (["sudo"] if shutil.which("sudo") else None)
        if prefix is None:
            sys.exit("no chromium found and not root (no sudo) to install it: apt-get install chromium")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(prefix + ["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(prefix + ["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
        return find_browser(install=False)
    sys.exit("no chromium/chrome found: install chromium (apt-get install chromium), set $CHROME, "
             "or pass --install")


def pages_from_toc(book: Path) -> list[str]:
    """HTML paths (relative to the build) of every page in ``_toc.yml``, root first."""
    toc = yaml.safe_load((book / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [entry["file"] for entry in part.get("chapters", [])]
    files += [entry["file"] for entry in toc.get("chapters", [])]
    return [f + ".html" for f in files]


class DevTools:
    """Minimal Chrome DevTools Protocol client over Chromium's ``--remote-debugging-pipe``."""

    def __init__(self, browser: str, profile: Path):
        # Chromium reads commands on fd 3 and writes replies on fd 4; lift our ends above 4 first so
        # the dup2 calls in the child cannot overwrite one another.
        to_child_r, self._to_child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in os.pipe())
        self._from_child_r, from_child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in os.pipe())

        def wire_fds():
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe",
                f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=wire_fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child_r], [], [], left)[0]:
                raise TimeoutError("no reply from the browser")
            chunk = os.read(self._from_child_r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"browser exited (code {self.proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["method"] == method and event.get("sessionId") == session:
                    self.events.remove(event)
                    return True
            try:
                message = self._read_message(deadline)
            except TimeoutError:
                return False
            if "method" in message:
                self.events.append(message)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_child_w)
        os.close(self._from_child_r)


def serve(html: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(html)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def page_problems(page: str, report: dict) -> list[str]:
    """Everything wrong with one page, from what ``PAGE_PROBE`` saw."""
    problems = []
    if not report["heading"].strip():
        problems.append(f"{page}: no <h1> heading")
    for img in report["images"]:
        if not img["complete"] or img["naturalWidth"] == 0:
            problems.append(f"{page}: image {img['src']} did not load (naturalWidth {img['naturalWidth']})")
    if page.startswith(CHAPTER_DIRS) and report.get("banners", 0) != 1:
        problems.append(f"{page}: {report.get('banners', 0)} freshness banners (a chapter shows exactly one)")
    if report["math"] and not report["mathRendered"]:
        problems.append(f"{page}: {report['math']} equations left as raw TeX (MathJax did not typeset)")
    for i, table in enumerate(report["tables"]):
        if table["rows"] == 0 or table["cells"] == 0 or table["height"] <= 0:
            problems.append(f"{page}: table {i} not rendered ({table})")
    return problems


def check_book(book: Path, browser: str, shots: Path) -> list[str]:
    html = book / "_build" / "html"
    if not (html / "index.html").exists():
        return [f"no built book at {html}: run `esmerge regenerate --book-only` first"]
    pages = pages_from_toc(book)
    shots.mkdir(parents=True, exist_ok=True)
    server, base = serve(html)
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="esmerge-chromium-") as profile:
        tools = DevTools(browser, Path(profile))
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            tools.send("Page.enable", session=session)
            tools.send("Emulation.setDeviceMetricsOverride", {"width": VIEWPORT[0], "height": VIEWPORT[1],
                                                              "deviceScaleFactor": 1, "mobile": False}, session)
            summary = {}
            for page in pages:
                if not (html / page).exists():
                    problems.append(f"{page}: listed in _toc.yml but not built")
                    continue
                tools.events.clear()
                nav = tools.send("Page.navigate", {"url": base + page}, session)
                if nav.get("errorText"):
                    problems.append(f"{page}: navigation failed: {nav['errorText']}")
                    continue
                if not tools.wait_event("Page.loadEventFired", session, timeout=60):
                    problems.append(f"{page}: load event never fired")
                result = tools.send("Runtime.evaluate", {"expression": PAGE_PROBE, "awaitPromise": True,
                                                         "returnByValue": True}, session, timeout=90)
                report = result["result"]["value"]
                problems += page_problems(page, report)
                height = tools.send("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"]
                shot = tools.send("Page.captureScreenshot", {
                    "format": "png", "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": VIEWPORT[0], "height": min(height, MAX_SHOT_HEIGHT), "scale": 1},
                }, session)
                png = shots / (page.removesuffix(".html").replace("/", "__") + ".png")
                png.write_bytes(base64.b64decode(shot["data"]))
                summary[page] = {"heading": report["heading"].strip(), "images": len(report["images"]),
                                 "tables": len(report["tables"]), "screenshot": png.name}
                print(f"  {page}: {len(report['images'])} images, {len(report['tables'])} tables, "
                      f"{report['mathRendered']}/{report['math']} equations typeset -> {png}")
            (shots / "report.json").write_text(json.dumps({"pages": summary, "problems": problems}, indent=2))
        finally:
            tools.close()
            server.shutdown()
    return problems


def screenshots_dir(book: Path) -> Path:
    """``_build/screenshots/<scale>`` for the scale of the last build (``_build/.esmerge_scale``)."""
    marker = book / "_build" / ".esmerge_scale"
    base = book / "_build" / "screenshots"
    return base / marker.read_text().strip() if marker.exists() else base


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--book", type=Path, default=REPO_ROOT / "book")
    p.add_argument("--install", action="store_true", help="apt-get install chromium if no browser is found")
    p.add_argument("--shots", type=Path, help="screenshot folder (default: book/_build/screenshots/<scale>)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    browser = find_browser(args.install)
    shots = args.shots or screenshots_dir(args.book)
    problems = check_book(args.book, browser, shots)
    if problems:
        print("browser check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"browser check passed in {time.perf_counter() - start:.1f} s (screenshots in {shots})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
