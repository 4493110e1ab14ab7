"""Open every page of the built book in headless Chromium and check that it really rendered and reads well.

    python tests/browser/check_book.py [--book book] [--install] [--legacy-shipped]

Serves ``book/_build/html`` on 127.0.0.1 (python's http.server), opens each page listed in
``book/_toc.yml`` through the Chrome DevTools Protocol at two viewports, a 1280 px desktop and a
390 px phone (``mobile`` emulation, so the page's viewport meta tag applies), and reports each
problem as ``<page>[ @<width>px]: [<rule>] <what>``. The rules:

``load``
    the page is listed in the toc, was built, navigates and fires its load event (both widths).
``heading``, ``image``, ``table``, ``math``
    the page has an ``<h1>``; every ``<img>`` loaded (``naturalWidth > 0``); every table in the
    page body has rows, cells and a non-zero height; every equation was typeset by MathJax (served
    from the book itself, so this holds offline). Checked at 1280 px.
``banner``
    every chapter (a page under ``executed/`` or ``shipped/``) shows exactly one freshness banner
    (the commit and input key it ran from, ``esmerge.regen.sphinx_freshness``).
``clipped`` (every page, at both widths)
    content a reader cannot reach. The main column is ``article.bd-article`` (else ``<main>``,
    else ``<body>``); an element in it counts when it is rendered and wider than 1 px, and either

    * its computed ``overflow-x`` is ``hidden`` or ``clip``, ``scrollWidth > clientWidth + 1``, and
      what its content draws (text and rendered descendants) reaches more than 1 px past its
      inner box: content cut off with no scrollbar. Content hidden on purpose (``clip``,
      ``clip-path``, ``visibility: hidden``: MathJax's assistive MathML, screen-reader text) is
      not counted, though ``scrollWidth`` counts it; or
    * it sticks out of the column: its box, or for ``overflow-x: visible`` what its content
      draws, reaches more than 1 px past the column's left or right edge, and no element between
      it and the column scrolls (``overflow-x: auto``/``scroll``) or clips (reported there).

    A wide table inside a horizontally scrollable wrapper is therefore fine, and so is a cell
    output (``.cell_output``, ``.output pre``) that wraps its lines or scrolls; one that does
    neither is reported. Only the outermost box sticking out is named (not each of its cells),
    and an element whose content sticks out only when none of its descendants is named already.
``unfolded-code`` (chapters)
    a code cell shows more than 5 lines of source. Counted: the lines (blank ones included, a
    trailing newline not) of every ``.cell_input pre`` that is rendered, i.e. not removed
    (``remove-input``/``remove-cell``) and not inside a closed ``<details>`` (MyST-NB's
    ``hide-input``/``hide-cell`` toggles, closed until the reader opens them).
``uncaptioned-figure`` (chapters)
    a figure without a caption. Figures are every ``<figure>`` in the column and every ``<img>``
    in a cell output (``.cell_output``/``.output``) not inside a ``<figure>``. A figure is
    captioned when (a) it is a ``<figure>`` with a ``<figcaption>`` holding text besides its
    "Fig. N" number (MyST-NB's ``mystnb.figure.caption`` cell metadata, ``{glue:figure}`` with a
    caption, the ``{figure}`` directive), or (b) the next rendered block after it (its next
    sibling element that shows text or an image; where it has none, its parent's, and so on up to
    the column) is not a heading or section and its text starts with ``Figure`` or ``Fig.``
    followed by a space or digit: a markdown paragraph right after the plotting cell, or a
    Markdown output of the same cell after the image. A plot followed by a heading, by another
    code cell, by another image, or by prose that does not start so, is uncaptioned.
``no-glue`` (the first page of the toc, when it is a chapter: the overview)
    no number glued into the text: the page needs at least one MyST-NB glue role output
    (``{glue:text}`` renders ``<span class="pasted-text">``, ``{glue}`` an inline
    ``<span class="output text_plain">`` outside any cell; ``.pasted-inline`` is counted too)
    whose text contains a digit.

``--legacy-shipped`` waives ``unfolded-code``, ``uncaptioned-figure`` and ``no-glue`` for pages
under ``shipped/`` (the shipped cpu book ran before these rules and is re-executed later): they
are still found, and printed loudly as waived, but do not fail the check. The default is strict.

A full-page screenshot per page and width (cut at 6000 px) goes to
``book/_build/screenshots/<scale>/<page>@1280.png`` and ``...@390.png`` (the scale of the last
build; CI keeps that folder as an artefact), with ``report.json`` (problems, waived problems,
counts per rule). The protocol runs over ``--remote-debugging-pipe`` (file descriptors 3 and 4),
so no port and no websocket library are needed. ``--install`` installs Debian's ``chromium`` with
apt-get when no browser is found. Exits non-zero, listing every problem, if any page fails.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import http.server
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# (width, height, mobile): a desktop window, and a phone (390 px: the common iPhone width).
VIEWPORTS = ((1280, 900, False), (390, 844, True))
VIEWPORT = VIEWPORTS[0][:2]  # the browser window; each page is then emulated at every width
MAX_SHOT_HEIGHT = 6000  # px; long chapters are cut here rather than making huge PNGs
CHAPTER_DIRS = ("executed/", "shipped/")  # pages rendered from executed notebooks
MAX_CODE_LINES = 5  # a chapter reads as a paper: longer code is folded (hide-input) or removed
# Rules that only apply to chapters, and that --legacy-shipped waives on shipped/ pages.
CHAPTER_RULES = ("unfolded-code", "uncaptioned-figure", "no-glue")
RULE_RE = re.compile(r"^\S+(?: @\d+px)?: \[([a-z-]+)\]")

# Runs in the page: waits for every image and MathJax to settle, then reports what page_problems judges.
PAGE_PROBE = r"""
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
  const column = document.querySelector('article.bd-article') || body;
  const rendered = el => el.getClientRects().length > 0;
  const style = el => getComputedStyle(el);
  const scrolls = cs => cs.overflowX === 'auto' || cs.overflowX === 'scroll';
  const clips = cs => cs.overflowX === 'hidden' || cs.overflowX === 'clip';
  const text = el => (el.innerText || el.textContent || '').trim().replace(/\s+/g, ' ');
  const describe = el => {
    const classes = Array.from(el.classList).slice(0, 3).map(c => '.' + c).join('');
    const snippet = text(el).slice(0, 50);
    return `<${el.tagName.toLowerCase()}${el.id ? '#' + el.id : ''}${classes}>` + (snippet ? ` "${snippet}"` : '');
  };

  // Clipped or out-of-column content. Hidden on purpose (clip/clip-path: MathJax's assistive MathML,
  // screen-reader-only text) is not content; scrollWidth counts it, so what shows is measured instead.
  const invisible = cs => cs.clip !== 'auto' || cs.clipPath !== 'none' || cs.visibility === 'hidden';
  const contentExtent = el => {  // [left, right] of what el's content draws, subtrees hidden on purpose left out
    let left = Infinity, right = -Infinity;
    const walk = node => {
      for (const child of node.childNodes) {
        let rect = null;
        if (child.nodeType === Node.TEXT_NODE) {
          if (!child.textContent.trim()) continue;
          const range = document.createRange();
          range.selectNodeContents(child);
          rect = range.getBoundingClientRect();
        } else if (child.nodeType === Node.ELEMENT_NODE) {
          if (!rendered(child)) continue;
          const cs = style(child);
          if (invisible(cs)) continue;
          rect = child.getBoundingClientRect();
          if (!scrolls(cs) && !clips(cs)) walk(child);  // a nested scroller or clipper answers for its own content
        }
        if (rect && rect.width > 0) { left = Math.min(left, rect.left); right = Math.max(right, rect.right); }
      }
    };
    walk(el);
    return [left, right];
  };
  const col = column.getBoundingClientRect();
  const clipped = [];
  const sticking = [];
  for (const el of [column, ...column.querySelectorAll('*')]) {
    if (!rendered(el)) continue;
    const r = el.getBoundingClientRect();
    if (r.width <= 1 || r.height <= 1) continue;  // screen-reader-only text and the like
    const cs = style(el);
    if (clips(cs) && el.scrollWidth > el.clientWidth + 1 && !invisible(cs)) {
      const [left, right] = contentExtent(el);
      const inner = r.left + el.clientLeft;
      if (right > inner + el.clientWidth + 1 || left < inner - 1) {
        clipped.push({what: describe(el), scrollWidth: Math.round(right - Math.min(left, inner)),
                      clientWidth: el.clientWidth, overflowX: cs.overflowX});
      }
      continue;
    }
    if (el === column) continue;
    const boxOut = r.right > col.right + 1 || r.left < col.left - 1;
    const contentOut = cs.overflowX === 'visible' && r.left + el.scrollWidth > col.right + 1
                       && contentExtent(el)[1] > col.right + 1;
    if (!boxOut && !contentOut) continue;
    let reached = invisible(cs);
    for (let a = el.parentElement; a && a !== column && !reached; a = a.parentElement) {
      const acs = style(a);
      reached = scrolls(acs) || clips(acs) || invisible(acs);
    }
    if (!reached) sticking.push({el, boxOut, right: Math.round(Math.max(r.right, r.left + el.scrollWidth))});
  }
  const boxed = new Set(sticking.filter(s => s.boxOut).map(s => s.el));
  const overflowing = sticking.filter(s => s.boxOut
      ? !boxed.has(s.el.parentElement)
      : !sticking.some(o => o.el !== s.el && s.el.contains(o.el))
  ).map(s => ({what: describe(s.el), right: s.right, columnRight: Math.round(col.right),
               columnLeft: Math.round(col.left)}));

  // Code cells whose source shows.
  const code = Array.from(column.querySelectorAll('.cell_input')).map((input, index) => {
    const pres = Array.from(input.querySelectorAll('pre'))
      .filter(pre => rendered(pre) && !pre.closest('details:not([open])'));
    const lines = pres.reduce((n, pre) => n + pre.textContent.replace(/\n+$/, '').split('\n').length, 0);
    const first = pres.length ? pres[0].textContent.split('\n').find(l => l.trim()) || '' : '';
    return {index, lines, first: first.trim().slice(0, 60)};
  }).filter(c => c.lines > 0);

  // Figures and their captions.
  const CAPTION = /^(Figure|Fig\.)[\s\d]/;
  const nextBlock = el => {
    for (let node = el; node && node !== column; node = node.parentElement) {
      for (let sib = node.nextElementSibling; sib; sib = sib.nextElementSibling) {
        if (!rendered(sib)) continue;
        if (text(sib) || sib.tagName === 'IMG' || sib.querySelector('img')) return sib;
      }
    }
    return null;
  };
  const figures = [
    ...column.querySelectorAll('figure'),
    ...Array.from(column.querySelectorAll('.cell_output img, .output img')).filter(img => !img.closest('figure')),
  ].map(fig => {
    let caption = '';
    const figcaption = fig.tagName === 'FIGURE' ? fig.querySelector('figcaption') : null;
    if (figcaption) {
      const copy = figcaption.cloneNode(true);
      copy.querySelectorAll('.caption-number').forEach(n => n.remove());
      caption = (copy.textContent || '').trim();
    }
    let next = null;
    if (!caption) {
      next = nextBlock(fig);
      const heading = next && /^(H[1-6]|SECTION)$/.test(next.tagName);
      if (next && !heading && CAPTION.test(text(next))) caption = text(next);
    }
    const img = fig.tagName === 'IMG' ? fig : fig.querySelector('img');
    return {what: describe(fig) + (img ? ` ${(img.getAttribute('src') || '').split('/').pop()}` : ''),
            caption: caption.slice(0, 80), next: next ? describe(next) : 'nothing'};
  });

  // Values glued into the text by MyST-NB.
  const glued = Array.from(column.querySelectorAll('.pasted-text, .pasted-inline, span.output.text_plain'))
    .filter(el => !el.closest('.cell_output')).map(el => text(el));

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
    clipped, overflowing, code, figures, glued,
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


def problem(where: str, rule: str, what: str) -> str:
    return f"{where}: [{rule}] {what}"


def layout_problems(page: str, report: dict, width: int) -> list[str]:
    """What depends on the width (the ``clipped`` rule), from what ``PAGE_PROBE`` saw at ``width``."""
    where = f"{page} @{width}px"
    problems = [problem(where, "clipped", f"{item['what']} cut off: {item['scrollWidth']} px of content in "
                                          f"{item['clientWidth']} px, overflow-x {item['overflowX']}: no scrollbar")
                for item in report["clipped"]]
    problems += [problem(where, "clipped", f"{item['what']} sticks out of the main column (to x={item['right']} px, "
                                           f"column {item['columnLeft']}-{item['columnRight']} px) with no "
                                           "scrollable wrapper")
                 for item in report["overflowing"]]
    return problems


def page_problems(page: str, report: dict, overview: bool = False) -> list[str]:
    """Everything wrong with one page that does not depend on the width, from what ``PAGE_PROBE`` saw.

    ``overview``: the page is the toc's first (the ``no-glue`` rule).
    """
    problems = []

    def add(rule: str, what: str):
        problems.append(problem(page, rule, what))

    if not report["heading"].strip():
        add("heading", "no <h1> heading")
    for img in report["images"]:
        if not img["complete"] or img["naturalWidth"] == 0:
            add("image", f"image {img['src']} did not load (naturalWidth {img['naturalWidth']})")
    chapter = page.startswith(CHAPTER_DIRS)
    if chapter and report.get("banners", 0) != 1:
        add("banner", f"{report.get('banners', 0)} freshness banners (a chapter shows exactly one)")
    if report["math"] and not report["mathRendered"]:
        add("math", f"{report['math']} equations left as raw TeX (MathJax did not typeset)")
    for i, table in enumerate(report["tables"]):
        if table["rows"] == 0 or table["cells"] == 0 or table["height"] <= 0:
            add("table", f"table {i} not rendered ({table})")
    if not chapter:
        return problems
    for cell in report["code"]:
        if cell["lines"] > MAX_CODE_LINES:
            add("unfolded-code", f"code cell {cell['index']} shows {cell['lines']} lines (at most {MAX_CODE_LINES} "
                                 f"unfolded; tag it hide-input): {cell['first']!r}")
    for fig in report["figures"]:
        if not fig["caption"]:
            add("uncaptioned-figure", f"figure {fig['what']} has no caption (no <figcaption>, and the next block, "
                                      f"{fig['next']}, does not start with 'Figure')")
    if overview and not any(re.search(r"\d", value) for value in report["glued"]):
        add("no-glue", f"the overview glues no number into its text ({len(report['glued'])} glued values, "
                       "none with a digit: use the {glue:text} role)")
    return problems


def rule_of(problem: str) -> str:
    """The rule a problem line names (``[clipped]`` and so on)."""
    match = RULE_RE.match(problem)
    return match.group(1) if match else "other"


def waivable(problem: str, pages: tuple[str, ...] = ("shipped/",)) -> bool:
    """A chapter-only rule's problem on a page under one of ``pages``: what ``--legacy-shipped``
    (shipped/ pages) and ``--legacy-chapters`` (every chapter) waive."""
    return problem.startswith(pages) and rule_of(problem) in CHAPTER_RULES


def shot_name(page: str, width: int) -> str:
    return page.removesuffix(".html").replace("/", "__") + f"@{width}.png"


def check_book(book: Path, browser: str, shots: Path, legacy_shipped: bool = False,
               legacy_chapters: bool = False) -> list[str]:
    """Problems of every page of the built book (empty when all pass); screenshots and report.json in ``shots``.

    With ``legacy_shipped``, the chapter rules' problems on shipped/ pages are printed as waived and
    left out of the returned list.
    """
    html = book / "_build" / "html"
    if not (html / "index.html").exists():
        return [f"no built book at {html}: run `esmerge regenerate --book-only` first"]
    pages = pages_from_toc(book)
    shots.mkdir(parents=True, exist_ok=True)
    for stale in shots.glob("*.png"):  # the folder shows this run only (pages may have left the toc)
        stale.unlink()
    server, base = serve(html)
    problems: list[str] = []
    summary: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="esmerge-chromium-") as profile:
        tools = DevTools(browser, Path(profile))
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            tools.send("Page.enable", session=session)
            for n, (width, height, mobile) in enumerate(VIEWPORTS):
                tools.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                                  "deviceScaleFactor": 1, "mobile": mobile}, session)
                for page in pages:
                    where = f"{page} @{width}px"
                    if not (html / page).exists():
                        if n == 0:
                            problems.append(f"{page}: [load] listed in _toc.yml but not built")
                        continue
                    tools.events.clear()
                    nav = tools.send("Page.navigate", {"url": base + page}, session)
                    if nav.get("errorText"):
                        problems.append(f"{where}: [load] navigation failed: {nav['errorText']}")
                        continue
                    if not tools.wait_event("Page.loadEventFired", session, timeout=60):
                        problems.append(f"{where}: [load] load event never fired")
                    result = tools.send("Runtime.evaluate", {"expression": PAGE_PROBE, "awaitPromise": True,
                                                             "returnByValue": True}, session, timeout=90)
                    report = result["result"]["value"]
                    problems += layout_problems(page, report, width)
                    if n == 0:
                        problems += page_problems(page, report, overview=page == pages[0])
                    full = tools.send("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"]
                    shot = tools.send("Page.captureScreenshot", {
                        "format": "png", "captureBeyondViewport": True,
                        "clip": {"x": 0, "y": 0, "width": width, "height": min(full, MAX_SHOT_HEIGHT), "scale": 1},
                    }, session)
                    png = shots / shot_name(page, width)
                    png.write_bytes(base64.b64decode(shot["data"]))
                    entry = summary.setdefault(page, {"heading": report["heading"].strip(), "screenshots": []})
                    entry["screenshots"].append(png.name)
                    if n == 0:
                        entry.update(images=len(report["images"]), tables=len(report["tables"]),
                                     figures=len(report["figures"]), code_cells=len(report["code"]),
                                     glued=len(report["glued"]))
                        print(f"  {page}: {len(report['images'])} images, {len(report['tables'])} tables, "
                              f"{report['mathRendered']}/{report['math']} equations typeset -> {png}")
        finally:
            tools.close()
            server.shutdown()
    scope = CHAPTER_DIRS if legacy_chapters else ("shipped/",) if legacy_shipped else ()
    waived = [p for p in problems if scope and waivable(p, scope)]
    problems = [p for p in problems if p not in waived]
    (shots / "report.json").write_text(json.dumps({
        "pages": summary, "problems": problems, "waived": waived,
        "per_rule": dict(Counter(map(rule_of, problems))), "waived_per_rule": dict(Counter(map(rule_of, waived))),
    }, indent=2))
    if waived:
        bar = "!" * 100
        flag = "--legacy-chapters" if legacy_chapters else "--legacy-shipped"
        print(f"\n{bar}\n!! {flag}: {len(waived)} problems of the chapter rules ({', '.join(CHAPTER_RULES)}) "
              f"on {'/'.join(scope)} pages are WAIVED,\n!! not failed: those chapters predate these rules. Re-execute "
              "and ship them, then drop the flag.\n!!   " + "\n!!   ".join(waived) + f"\n{bar}\n", file=sys.stderr)
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
    p.add_argument("--legacy-shipped", action="store_true",
                   help=f"waive the chapter rules ({', '.join(CHAPTER_RULES)}) on shipped/ pages, loudly: "
                        "for the shipped cpu book until it is re-executed")
    p.add_argument("--legacy-chapters", action="store_true",
                   help="waive the chapter rules on every chapter page (executed/ and shipped/), loudly: while the "
                        "notebooks predate them")
    args = p.parse_args(argv)
    start = time.perf_counter()
    browser = find_browser(args.install)
    shots = args.shots or screenshots_dir(args.book)
    problems = check_book(args.book, browser, shots, legacy_shipped=args.legacy_shipped,
                          legacy_chapters=args.legacy_chapters)
    if problems:
        counts = ", ".join(f"{rule} {n}" for rule, n in sorted(Counter(map(rule_of, problems)).items()))
        print(f"browser check FAILED ({counts}):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    waived = (" (the chapter rules WAIVED on every chapter: --legacy-chapters, see above)" if args.legacy_chapters
              else " (the chapter rules WAIVED on shipped/ pages: --legacy-shipped, see above)" if args.legacy_shipped
              else "")
    print(f"browser check passed in {time.perf_counter() - start:.1f} s{waived} (screenshots in {shots})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
