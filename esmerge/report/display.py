"""How the book shows a table or a figure: numbered, captioned, rounded, CIs as ``x [lo, hi]``.

Each chapter makes one ``Numbered(chapter)`` and shows every table with ``.table`` and every figure
with ``.figure``: "Table 7.2. ..." above a table (no index column, consistent rounding, wide tables
scrolling sideways), "Figure 7.3. ..." under a figure. The captions say what the object shows;
the numbers in them come from the caller's data.
"""
from __future__ import annotations

import html

import pandas as pd

from esmerge.evaluate.stats import format_ci

# CI column pairs the registers and tables use: the value column -> its (lower, upper) columns.
CI_PAIRS = {"ours": ("lo", "hi"), "retained": ("lo", "hi"), "accuracy": ("lo", "hi"),
            "auroc_diff": ("auroc_lo", "auroc_hi"), "specialist_gain": ("gain_lo", "gain_hi"),
            "diff": ("lo", "hi")}


def with_cis(frame: pd.DataFrame, digits: int = 1, pairs: dict[str, tuple[str, str]] | None = None) -> pd.DataFrame:
    """``frame`` with each value column that has both CI columns written ``x [lo, hi]`` (the CI columns
    dropped) and every other float rounded to ``digits``; NaN shows as an empty cell.

    >>> t = pd.DataFrame({"method": ["es"], "ours": [1.234], "lo": [0.5], "hi": [2.0], "n": [32]})
    >>> with_cis(t).to_dict("records")
    [{'method': 'es', 'ours': '1.2 [0.5, 2.0]', 'n': 32}]
    >>> with_cis(pd.DataFrame({"retained": [0.61234], "lo": [float("nan")], "hi": [0.7]}), 3).iloc[0, 0]
    '0.612'
    """
    out = frame.copy()
    for value, (lo, hi) in (pairs or CI_PAIRS).items():
        if value in out and lo in out and hi in out:
            out[value] = [ci_text(v, a, b, digits) for v, a, b in zip(out[value], out[lo], out[hi])]
            out = out.drop(columns=[lo, hi])
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]):
            out[column] = [_number(v, digits) for v in out[column]]
    return out


def _number(v, digits: int) -> str:
    return "" if pd.isna(v) else f"{v:.{digits}f}"


def ci_text(v, lo, hi, digits: int = 1, signed: bool = False, missing_ci: str = "") -> str:
    """``v [lo, hi]`` rounded to ``digits`` decimals (``+`` on positive numbers when ``signed``). A CI with a
    NaN end shows ``v`` alone, or ``v [missing_ci]`` when that is given; a NaN value shows as empty, a
    non-number as itself.

    >>> ci_text(0.60549, 0.59831, 0.61275, 3), ci_text(-0.0226, -0.0301, 0.0152, 3, signed=True)
    ('0.605 [0.598, 0.613]', '-0.023 [-0.030, +0.015]')
    >>> ci_text(0.5, float("nan"), 0.7, 3), ci_text(0.5, float("nan"), 0.7, 3, missing_ci="n/a")
    ('0.500', '0.500 [n/a]')
    """
    if not isinstance(v, (int, float)) or pd.isna(v):
        return "" if pd.isna(v) else str(v)
    if pd.isna(lo) or pd.isna(hi):
        return f"{v:{'+' if signed else ''}.{digits}f}" + (f" [{missing_ci}]" if missing_ci else "")
    return format_ci(v, lo, hi, digits, signed)


class Table:
    """A captioned table for the notebook's output: renders as HTML (Jupyter, the book) and as text."""

    def __init__(self, frame: pd.DataFrame, caption: str):
        self.frame, self.caption = frame, caption

    def _repr_html_(self) -> str:
        body = self.frame.to_html(index=False, escape=True, border=0, classes="esmerge-table")
        return (f'<div class="esmerge-table-wrap" style="overflow-x:auto"><p class="esmerge-caption">'
                f"<strong>{html.escape(self.caption.split('. ', 1)[0])}.</strong> "
                f"{html.escape(self.caption.split('. ', 1)[1] if '. ' in self.caption else '')}</p>{body}</div>")

    def __repr__(self) -> str:
        return f"{self.caption}\n{self.frame.to_string(index=False)}"


class Numbered:
    """Numbers one chapter's tables and figures in order of appearance.

    >>> book = Numbered(7)
    >>> t = book.table(pd.DataFrame({"a": [0.123]}), "Mean accuracy.", digits=2)
    >>> t.caption, t.frame.iloc[0, 0]
    ('Table 7.1. Mean accuracy.', '0.12')
    >>> book.figure_caption("Margins with CIs.")
    'Figure 7.1. Margins with CIs.'
    """

    def __init__(self, chapter: int):
        self.chapter, self.tables, self.figures = chapter, 0, 0

    def table(self, frame: pd.DataFrame, caption: str, digits: int = 1, columns: list[str] | None = None,
              pairs: dict[str, tuple[str, str]] | None = None) -> Table:
        """``frame`` (``columns`` of it, if given) with CIs joined and rounded (``with_cis``), captioned."""
        self.tables += 1
        shown = with_cis(_index_as_column(frame), digits, pairs)
        if columns:
            shown = shown[[c for c in columns if c in shown]]
        return Table(shown, f"Table {self.chapter}.{self.tables}. {caption}")

    def figure_caption(self, caption: str) -> str:
        """The next figure's caption text."""
        self.figures += 1
        return f"Figure {self.chapter}.{self.figures}. {caption}"

    def figure(self, fig, caption: str) -> None:
        """Show ``fig`` and its caption under it (in a notebook)."""
        import matplotlib.pyplot as plt
        from IPython.display import Markdown, display

        text = self.figure_caption(caption)
        plt.show()
        head, _, rest = text.partition(". ")
        display(Markdown(f"**{head}.** {rest}"))
        plt.close(fig)


def _index_as_column(frame: pd.DataFrame) -> pd.DataFrame:
    """A meaningful index (methods, modalities, ...) becomes the first column, named by the index (or
    blank); a plain 0..n-1 index is dropped.

    >>> _index_as_column(pd.DataFrame({"x": [1]}, index=["es"])).columns.tolist()
    ['', 'x']
    >>> _index_as_column(pd.DataFrame({"x": [1]})).columns.tolist()
    ['x']
    """
    if isinstance(frame.index, pd.RangeIndex):
        return frame
    names = [n if n is not None else "" for n in frame.index.names]
    return frame.rename_axis(names).reset_index()
