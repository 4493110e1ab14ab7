"""The table `esmerge methods [NAME]` prints: each method, what it needs besides the adapters, and its
parameters' type, default and range, from the registry's one declaration of each method."""
from __future__ import annotations

import textwrap

from esmerge import methods

NEEDS_LEGEND = ("needs: - = the adapters alone; probe = probe texts (--probe with --adapter, else the scale's "
                "probes); data = the scale's prompts (adamerging: evaluation prompts, avg-ft: training prompts), "
                "so not with --adapter; labels = the training set's task labels (avg-ft). "
                "`esmerge methods describe NAME`: every parameter's meaning and presets.")


def method_needs(name: str) -> str:
    """What a method needs besides the adapters (its registry entry's ``needs``), ``-`` for nothing."""
    return ", ".join(methods.get(name).needs) or "-"


def methods_listing(name: str | None = None, width: int = 100) -> list[str]:
    """The lines of `esmerge methods [NAME]`: method, what it needs, and its parameters' type, default and range;
    one method alone also gets each parameter's doc, wrapped. No line is longer than ``width``."""
    rows = methods.describe(name)
    head = ("method", "needs", "parameter", "type", "default", "range")
    table = [(r["method"], method_needs(r["method"]), r["parameter"] or "(none)", r["type"], str(r["default"]),
              r["range"]) for r in rows]
    widths = [max(len(str(row[i])) for row in [head, *table]) for i in range(len(head))]
    lines, last = [], None

    def line(cells) -> str:
        text = "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths)).rstrip()
        return text if len(text) <= width else text[:width - 3] + "..."

    lines.append(line(head))
    for row, source in zip(table, rows):
        shown = row if row[0] != last else ("", "", *row[2:])
        last = row[0]
        lines.append(line(shown))
        if name and source["doc"] and source["parameter"]:
            indent = " " * (widths[0] + widths[1] + 4 + 2)
            lines += textwrap.wrap(source["doc"], width, initial_indent=indent, subsequent_indent=indent)
    return lines
