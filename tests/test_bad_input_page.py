"""book/bad_input.md quotes esmerge's refusals: every message on it must still be one the code can raise.

A message on the page is a template, ``{...}`` standing for a value. Its fixed parts must appear,
in order, in one string literal (an f-string or a ``str.format`` template) of a module under
``esmerge/`` that raises an ``EsmergeError`` subclass; so rewording a refusal in the code without
updating the page fails here.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from esmerge.regen.pages import toc_entries

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "book" / "bad_input.md"
HOLE = "\x00"  # where a value goes in a message template read from the code
PLACEHOLDER = re.compile(r"\{[^{}\"]*\}")  # {name}, {out/checkpoint/state.pt}; not {"text": ...}


def quoted_messages(text: str) -> list[str]:
    """The message column (a code span) of every table row of the page, pipes unescaped."""
    messages = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == 3 and all(cells), f"a row needs three filled cells: {line}"
        if cells[1] == "What esmerge prints":  # a table's header
            continue
        span = re.fullmatch(r"(`+)(.+?)\1", cells[1])
        assert span, f"the message is not one code span: {cells[1]}"
        messages.append(span.group(2).replace("\\|", "|"))
    return messages


def _class_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _literals(tree: ast.Module) -> list[str]:
    """Every string literal of a module with its value fields replaced by ``HOLE``."""
    parts_of_fstrings, out = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            pieces = []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    parts_of_fstrings.add(id(value))
                    pieces.append(value.value)
                else:
                    pieces.append(HOLE)
            out.append("".join(pieces))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts_of_fstrings:
            # "... ({}); ..." templates for str.format; a docstring's doctest may wrap a message over lines
            out.append(" ".join(PLACEHOLDER.sub(HOLE, node.value).split()))
    return out


def refusal_literals(package: Path) -> list[str]:
    """String literals of the modules under ``package`` that raise an ``EsmergeError`` subclass, or catch one
    to print it (the CLI's entry point, which also prints its own warnings)."""
    trees = {path: ast.parse(path.read_text()) for path in sorted(package.rglob("*.py"))}
    family, grown = {"EsmergeError"}, True
    while grown:  # subclasses of subclasses, across modules
        grown = False
        for tree in trees.values():
            for node in ast.walk(tree):
                if (isinstance(node, ast.ClassDef) and node.name not in family
                        and any(_class_name(base) in family for base in node.bases)):
                    family.add(node.name)
                    grown = True
    literals = []
    for tree in trees.values():
        raises = any(isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                     and _class_name(node.exc.func) in family for node in ast.walk(tree))
        catches = any(isinstance(node, ast.ExceptHandler) and node.type is not None
                      and any(_class_name(t) in family for t in getattr(node.type, "elts", [node.type]))
                      for node in ast.walk(tree))
        if raises or catches:
            literals += _literals(tree)
    return literals


def template_pattern(message: str) -> re.Pattern:
    """The fixed parts of a page message, in order, anything between them (the CLI's prefix dropped)."""
    message = re.sub(r"^(esmerge [a-z]+|error): ", "", message)
    fixed = [part.strip() for part in PLACEHOLDER.split(message)]
    return re.compile(".*?".join(re.escape(part) for part in fixed), re.DOTALL)


def unmatched(messages: list[str], literals: list[str]) -> list[str]:
    return [m for m in messages if not any(template_pattern(m).search(lit) for lit in literals)]


def test_every_message_on_the_page_is_still_raised_by_esmerge():
    messages = quoted_messages(PAGE.read_text())
    assert len(messages) >= 40  # the page's tables were read (42 rows when written)
    assert unmatched(messages, refusal_literals(ROOT / "esmerge")) == []


def test_the_check_catches_a_reworded_message():
    literals = refusal_literals(ROOT / "esmerge")
    good = "esmerge regenerate: --jobs must be at least 1"
    assert unmatched([good], literals) == []
    assert unmatched(["esmerge regenerate: --jobs must be at least 2"], literals) == [
        "esmerge regenerate: --jobs must be at least 2"]
    # A value field in the code is a placeholder on the page, not any text: the fixed words still count.
    assert unmatched(["esmerge merge: {method}: unknown hyper-parameter {name}; known: {names}"], literals) == []
    assert unmatched(["esmerge merge: {method}: unknown parameter {name}; known: {names}"], literals) != []


def test_literals_of_a_module_without_a_refusal_do_not_count(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "errors.py").write_text("class EsmergeError(Exception):\n    pass\n\n\nclass InputError(EsmergeError):\n"
                                       "    pass\n")
    (package / "quiet.py").write_text('MESSAGE = "a quiet message"\n')
    (package / "loud.py").write_text('from pkg.errors import InputError\n\n\ndef f(path):\n'
                                     '    raise InputError(f"{path}: a loud message, " f"{1 + 1} times")\n')
    literals = refusal_literals(package)
    assert unmatched(["{file}: a loud message, {n} times"], literals) == []
    assert unmatched(["a quiet message"], literals) == ["a quiet message"]


def test_the_page_follows_rerun_in_the_book(tmp_path):
    for name in ("rerun.md", "bad_input.md", "api.md", "glossary.md"):
        (tmp_path / name).write_text("# page\n")
    _, pages = toc_entries(tmp_path, "smoke")
    assert pages.index("bad_input") == pages.index("rerun") + 1
