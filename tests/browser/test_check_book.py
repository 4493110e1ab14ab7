"""The browser check itself: it passes a page that rendered and fails one that did not.

Hand-written HTML (no Sphinx) keeps this fast; skipped when no Chromium-family browser exists
(``make test`` installs one before running the check on the real book).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import check_book  # noqa: E402

BROWSER = next((shutil.which(name) for name in check_book.BROWSERS if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium/chrome on PATH")


def make_book(root: Path, pages: dict[str, str]) -> Path:
    """A built-book layout: ``_toc.yml`` listing ``pages`` and their HTML under ``_build/html``."""
    html = root / "_build" / "html"
    html.mkdir(parents=True)
    plt.imsave(html / "good.png", np.arange(12.0).reshape(3, 4))
    (html / "bad.png").write_bytes(b"this is not an image")
    (html / "index.html").write_text('<meta http-equiv="refresh" content="0; url=a.html">')
    names = list(pages)
    toc = [f"root: {names[0]}"]
    if names[1:]:
        toc += ["parts:", "  - chapters:"] + [f"      - file: {n}" for n in names[1:]]
    (root / "_toc.yml").write_text("format: jb-book\n" + "\n".join(toc) + "\n")
    for name, body in pages.items():
        (html / f"{name}.html").parent.mkdir(parents=True, exist_ok=True)
        (html / f"{name}.html").write_text(f"<html><body><main>{body}</main></body></html>")
    return root


def test_rendered_page_passes_and_is_screenshotted(tmp_path):
    book = make_book(tmp_path, {"a": '<h1>A</h1><img src="good.png"><table><tr><td>1</td></tr></table>'})
    shots = tmp_path / "shots"
    assert check_book.check_book(book, BROWSER, shots) == []
    png = (shots / "a.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_broken_image_empty_table_and_missing_heading_are_reported(tmp_path):
    book = make_book(tmp_path, {
        "a": '<h1>A</h1><img src="good.png">',
        "b": '<h1>B</h1><img src="bad.png"><img src="missing.png"><table></table>',
        "c": "<p>no heading here</p>",
    })
    problems = check_book.check_book(book, BROWSER, tmp_path / "shots")
    assert problems == [
        "b.html: image bad.png did not load (naturalWidth 0)",
        "b.html: image missing.png did not load (naturalWidth 0)",
        "b.html: table 0 not rendered ({'rows': 0, 'cells': 0, 'height': 0, 'text': ''})",
        "c.html: no <h1> heading",
    ]


def test_chapter_without_its_freshness_banner_is_reported(tmp_path):
    banner = '<div class="admonition esmerge-freshness"><p>Executed at scale cpu</p></div>'
    book = make_book(tmp_path, {
        "shipped/cpu/01_data": f"<h1>Data</h1>{banner}",
        "shipped/cpu/02_specialists": "<h1>Specialists</h1>",
        "findings": "<h1>Findings</h1>",  # a page, not a chapter: no banner needed
    })
    assert check_book.check_book(book, BROWSER, tmp_path / "shots") == [
        "shipped/cpu/02_specialists.html: 0 freshness banners (a chapter shows exactly one)"]


def test_screenshots_go_to_the_scale_of_the_last_build(tmp_path):
    assert check_book.screenshots_dir(tmp_path) == tmp_path / "_build" / "screenshots"
    (tmp_path / "_build").mkdir()
    (tmp_path / "_build" / ".esmerge_scale").write_text("cpu")
    assert check_book.screenshots_dir(tmp_path) == tmp_path / "_build" / "screenshots" / "cpu"
