"""Sphinx extension: each chapter's freshness banner, under its title, from ``_freshness.json``.

``esmerge.regen.pages`` writes ``book/_freshness.json`` (``{docname: {"status": ..., "segments": [[kind,
text], ...]}}``, see ``esmerge.regen.freshness.banner_segments``) before every build. The banner is
added to the rendered page only: the executed notebook on disk (the one the launch buttons open)
is left as it ran. A chapter whose banner changed is read again, even if its notebook did not.
"""
from __future__ import annotations

import json
from pathlib import Path

from docutils import nodes

DATA = "_freshness.json"


def _banners(app) -> dict:
    path = Path(app.srcdir) / DATA
    return json.loads(path.read_text()) if path.exists() else {}


def banner_node(banner: dict) -> nodes.Element:
    """An admonition titled by the status (styled ``note`` when fresh, ``warning`` when not) holding the banner."""
    fresh = banner["status"] == "fresh"
    title = "Executed from the code as it is now" if fresh else f"Stale: {banner['status']} since this ran"
    box = nodes.admonition(classes=["esmerge-freshness", "esmerge-" + banner["status"].replace(" ", "-"),
                                    "note" if fresh else "warning"])
    box += nodes.title(title, title)
    para = nodes.paragraph()
    for kind, text in banner["segments"]:
        if kind == "code":
            para += nodes.literal(text, text)
        elif kind == "strong":
            para += nodes.strong(text, text)
        else:
            para += nodes.Text(text)
    box += para
    return box


def _on_builder_inited(app) -> None:
    app.env.esmerge_banners_wanted = _banners(app)


def _on_outdated(app, env, added, changed, removed):
    """Docs whose banner differs from the one their stored doctree has: read them again."""
    wanted = getattr(env, "esmerge_banners_wanted", {})
    shown = getattr(env, "esmerge_banners_shown", {})
    return [doc for doc in env.found_docs if wanted.get(doc) != shown.get(doc) and doc not in added | changed]


def _on_doctree_read(app, doctree) -> None:
    docname = app.env.docname
    banner = getattr(app.env, "esmerge_banners_wanted", {}).get(docname)
    if not hasattr(app.env, "esmerge_banners_shown"):
        app.env.esmerge_banners_shown = {}
    app.env.esmerge_banners_shown[docname] = banner
    if banner is None:
        return
    section = doctree.next_node(nodes.section)
    if section is None:
        doctree.insert(0, banner_node(banner))
        return
    title = section.next_node(nodes.title)
    section.insert(section.index(title) + 1 if title is not None and title.parent is section else 0,
                   banner_node(banner))


def _on_merge(app, env, docnames, other) -> None:
    env.esmerge_banners_shown = {**getattr(env, "esmerge_banners_shown", {}),
                                 **getattr(other, "esmerge_banners_shown", {})}


def _on_purge(app, env, docname) -> None:
    getattr(env, "esmerge_banners_shown", {}).pop(docname, None)


def setup(app):
    app.connect("builder-inited", _on_builder_inited)
    app.connect("env-get-outdated", _on_outdated)
    app.connect("env-purge-doc", _on_purge)
    app.connect("env-merge-info", _on_merge)
    app.connect("doctree-read", _on_doctree_read)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
