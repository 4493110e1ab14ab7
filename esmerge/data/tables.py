"""The data chapter's tables: the manifest, the corpora and benchmarks as loaded, and the pools.

Each function returns the DataFrame that ``notebooks/01_data.py`` shows and saves, computed from
``esmerge.data.files`` (manifest, verification), ``esmerge.data.sources`` (corpora) and ``esmerge.data.benchmarks``.
"""
from __future__ import annotations

import pandas as pd

from esmerge.data import files, sources
from esmerge.data.benchmark_pools import split_pools
from esmerge.data.benchmarks import BENCHMARKS


def manifest_table() -> pd.DataFrame:
    """Every manifest file: ``file, bytes, status`` (``files.verify``), ``licence, use, source``."""
    statuses = {s.path: s for s in files.verify()}
    return pd.DataFrame([{"file": path, "bytes": e.bytes, "status": statuses[path].status, "licence": e.licence,
                          "use": ", ".join(e.tasks), "source": e.repo} for path, e in files.manifest().items()])


def citations_table() -> pd.DataFrame:
    """One ``source, citation`` row per upstream repository, in manifest order."""
    return (pd.DataFrame([{"source": e.repo, "citation": e.citation} for e in files.manifest().values()])
            .drop_duplicates("source").reset_index(drop=True))


def load_corpora() -> dict[str, pd.DataFrame]:
    """The specialists' training corpora by display name (each split the specialists use)."""
    return {
        "ChEBI-20 test": sources.load_chebi20("test"),
        "ChEBI-20 validation": sources.load_chebi20("validation"),
        "Swiss-Prot GO test": sources.load_swissprot_go("test"),
        "Swiss-Prot GO val": sources.load_swissprot_go("val"),
        "PBMC 68k": sources.load_pbmc68k(),
        "CCLE cell lines": sources.load_ccle_cells(),
    }


def _dropped_text(frame: pd.DataFrame) -> str:
    return "; ".join(f"{n} {why}" for why, n in frame.attrs["dropped"].items()) or "none"


def corpus_table(corpora: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """``corpus, rows read, rows kept, dropped`` (reasons with counts) of loaded frames."""
    return pd.DataFrame([{"corpus": name, "rows read": df.attrs["n_read"], "rows kept": len(df),
                          "dropped": _dropped_text(df)} for name, df in corpora.items()])


def corpus_examples(corpora: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The first row of each corpus as ``corpus, input, text`` (long inputs shortened)."""
    chebi, go, pbmc, ccle = (corpora[k] for k in ("ChEBI-20 test", "Swiss-Prot GO test", "PBMC 68k", "CCLE cell lines"))
    return pd.DataFrame([
        {"corpus": "ChEBI-20", "input": chebi["smiles"].iloc[0], "text": chebi["description"].iloc[0]},
        {"corpus": "Swiss-Prot GO", "input": go["sequence"].iloc[0][:60] + "...", "text": go["description"].iloc[0]},
        {"corpus": "PBMC 68k", "input": ", ".join(pbmc["genes"].iloc[0][:10]) + ", ...",
         "text": pbmc["cell_type"].iloc[0]},
        {"corpus": "CCLE", "input": ", ".join(ccle["genes"].iloc[0][:10]) + ", ...",
         "text": "{site}, {histology}".format(**ccle.iloc[0])},
    ])


def benchmark_counts(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per benchmark (``load_benchmark`` frames): group, rows read/kept/dropped and its answer labels."""
    return pd.DataFrame([
        {"benchmark": name, "group": BENCHMARKS[name].group, "rows read": df.attrs["n_read"],
         "rows kept": len(df), "rows dropped": df.attrs["n_read"] - len(df),
         "labels (1 / 0)": f"{BENCHMARKS[name].positive} / {BENCHMARKS[name].negative}"}
        for name, df in frames.items()])


def dropped_rows(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """``benchmark, reason, rows``: one row per drop reason of each loaded benchmark."""
    return pd.DataFrame([{"benchmark": name, "reason": why, "rows": n}
                         for name, df in frames.items() for why, n in df.attrs["dropped"].items()],
                        columns=["benchmark", "reason", "rows"])


def pool_balance(frames: dict[str, pd.DataFrame], n_eval: int, n_context: int, seed: int = 0) -> pd.DataFrame:
    """The positive fraction of each benchmark and of its ``split_pools`` pools.

    A benchmark smaller than ``n_eval + n_context`` gets both pools scaled down to fit.
    """
    rows = []
    for name, df in frames.items():
        scale_down = min(1.0, len(df) / (n_eval + n_context))
        ev, ctx = split_pools(df, int(n_eval * scale_down), int(n_context * scale_down), seed=seed)
        rows.append({"benchmark": name, "n_eval": len(ev), "n_context": len(ctx),
                     "positive fraction (all)": round(df["y"].mean(), 3),
                     "positive fraction (eval)": round(ev["y"].mean(), 3),
                     "positive fraction (context)": round(ctx["y"].mean(), 3)})
    return pd.DataFrame(rows)
