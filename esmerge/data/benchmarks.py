"""The paper's 13 interaction benchmarks, described once (§5.1, App. A.1, A.4, Tables 9-10, Fig. 7).

``BENCHMARKS`` is the one table: for each benchmark its paper group (the averages of Tables 1-3),
its task kind (which prompt of Tables 9-10 and which retrieval rule of App. A.4 it uses), the
prompt with its two answer labels, the dataset name in ``paper_results.csv``, its upstream files
and the ``esmerge.data.sources`` reader of their rows. Everything else (``evaluate``, the methods'
training data, the notebooks) reads it.

>>> spec("CYP2D6-substrate").group, spec("CYP2D6-substrate").kind, spec("CYP2D6-substrate").labels
('CYP Sub.', 'cyp-sub', ('Not a substrate', 'Substrate'))
>>> spec("CYP2D6-substrate").paper_dataset, GROUPS["Mol-Cell"]
('CYP2D6 Sub.', ('DrugComb', 'GDSC2'))

Also here: ``load_benchmark`` (clean, deduplicated rows), ``check_rows`` (refuse rows that cannot be
scored, before any model work) and ``label_balance`` (Fig. 7). The evaluation, in-context and
protocol pools drawn from these rows are in ``esmerge.data.benchmark_pools``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import pandas as pd

from esmerge.data import sources
from esmerge.data.files import CYP_FASTA
from esmerge.errors import InputError, UsageError


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt template of Tables 9-10. ``labels[y]`` is the answer string for class ``y``."""

    system: str
    instruction: str
    labels: tuple[str, str]
    fields: tuple[str, ...]  # entity fields of one example, in order


_DRUG_SYSTEM = ("You are an expert specialized in drug discovery and molecular biology. "
                "You will be given a protein and a molecule. Your task is to determine whether a given molecule ")
# Keyed by task kind; the kind also selects the retrieval rule (``evaluate.retrieval``).
TASKS = {
    "mol-prot": TaskPrompt(
        _DRUG_SYSTEM + "interacts with a specific protein.",
        "Determine whether the given molecule interacts with the protein by following the examples.",
        ("Does not interact", "Interacts"), ("protein", "molecule")),
    "cyp-inh": TaskPrompt(
        _DRUG_SYSTEM + "inhibits a specific protein.",
        "Determine whether the given molecule inhibits the protein by following the examples.",
        ("Does not inhibit", "Inhibit"), ("protein", "molecule")),
    "cyp-sub": TaskPrompt(
        _DRUG_SYSTEM + "is a substrate of a specific protein.",
        "Determine whether the given molecule is a substrate of the protein by following the examples.",
        ("Not a substrate", "Substrate"), ("protein", "molecule")),
    "gdsc": TaskPrompt(
        "You are an expert specialized in cancer pharmacogenomics and drug response prediction. "
        "You will be given an anticancer molecule and a cancer cell represented as a list of gene names "
        "ordered by expression, where the most highly expressed genes appear first in descending order. "
        "Your task is to predict whether the molecule will biologically suppress the cancer cell. "
        "If the molecule is expected to suppress/inhibit cancer cell growth or viability, label it "
        "Sensitive, otherwise label it Resistant.",
        "Determine whether the given cell is sensitive or resistant to the given molecule based on the "
        "ranked gene-expression list.",
        ("Resistant", "Sensitive"), ("cell", "molecule")),
    "drugcomb": TaskPrompt(
        "You are an expert specialized in cancer pharmacogenomics and anticancer drug-combination response "
        "prediction. You will be given two anticancer molecules and a cancer cell represented as a ranked "
        "list of gene names (highest expression first). Your task is to predict the binary interaction "
        "outcome in terms of anticancer effect in that cell line.\nLabels:\n"
        "Synergistic - the combination produces a stronger anticancer effect than expected,\n"
        "Antagonistic - the combination produces a weaker anticancer effect than expected.",
        "Predict whether the drug pair is Synergistic or Antagonistic in the given cell line.",
        ("Antagonistic", "Synergistic"), ("cell", "molecule", "molecule2")),
}


@dataclass(frozen=True)
class BenchmarkSpec:
    """One evaluation benchmark."""

    name: str
    group: str  # the paper's task group: Mol-Prot | Mol-Cell | CYP Inh. | CYP Sub.
    kind: str  # key of TASKS: mol-prot | drugcomb | gdsc | cyp-inh | cyp-sub
    paper_dataset: str  # its name in paper_results.csv
    files: tuple[str, ...]  # manifest paths it is built from
    loader: Callable = field(repr=False)  # sources.raw_*: (spec, dropped) -> (rows, n_read)
    enzyme: str | None = None  # CYP tasks: the fixed target in derived/cyp_human.fasta

    @property
    def prompt(self) -> TaskPrompt:
        return TASKS[self.kind]

    @property
    def labels(self) -> tuple[str, str]:
        """``(answer for y=0, answer for y=1)`` as in Tables 9-10."""
        return self.prompt.labels

    @property
    def negative(self) -> str:
        return self.labels[0]

    @property
    def positive(self) -> str:
        return self.labels[1]


_CYP_INH = ("CYP1A2", "CYP2C19", "CYP2C9", "CYP2D6", "CYP3A4")
_CYP_SUB = ("CYP2C9", "CYP2D6", "CYP3A4")
_CELLS = (sources.CCLE_GMT, sources.CCLE_ANNOTATION)
_TGSA = (sources.TGSA_IC50, sources.TGSA_CELLS, sources.TGSA_DRUGS, sources.TGSA_SMILES)

BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s for s in [
        BenchmarkSpec("BindingDB", "Mol-Prot", "mol-prot", "BindingDB",
                      ("drugban/datasets/bindingdb/random/val.csv",), sources.raw_dti),
        BenchmarkSpec("BIOSNAP", "Mol-Prot", "mol-prot", "BIOSNAP",
                      ("drugban/datasets/biosnap/random/test.csv",), sources.raw_dti),
        BenchmarkSpec("Human", "Mol-Prot", "mol-prot", "Human",
                      ("drugban/datasets/human/random/test.csv",), sources.raw_dti),
        BenchmarkSpec("DrugComb", "Mol-Cell", "drugcomb", "DrugComb", (sources.DRUGCOMB, *_CELLS),
                      sources.raw_drugcomb),
        BenchmarkSpec("GDSC2", "Mol-Cell", "gdsc", "GDSC2", (*_TGSA, *_CELLS), sources.raw_gdsc2),
        *[BenchmarkSpec(e, "CYP Inh.", "cyp-inh", f"{e} Inh.", (f"tdc-cyp/data/{e.lower()}_veith.tab", CYP_FASTA),
                        sources.raw_cyp, e) for e in _CYP_INH],
        *[BenchmarkSpec(f"{e}-substrate", "CYP Sub.", "cyp-sub", f"{e} Sub.",
                        (f"tdc-cyp/data/{e.lower()}_substrate_carbonmangels.tab", CYP_FASTA), sources.raw_cyp, e)
          for e in _CYP_SUB],
    ]
}
BENCHMARK_NAMES = tuple(BENCHMARKS)
# The paper's groups, in the order of its tables, each with its benchmarks in table order.
GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(n for n, s in BENCHMARKS.items() if s.group == group)
    for group in dict.fromkeys(s.group for s in BENCHMARKS.values())}
BENCHMARK_COLUMNS = ["molecule", "molecule2", "protein", "cell_id", "cell_genes", "y"]


def spec(name: str) -> BenchmarkSpec:
    """The ``BenchmarkSpec`` of ``name``; a ``UsageError`` listing the choices otherwise."""
    try:
        return BENCHMARKS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}") from None


def benchmark_kind(name: str) -> str:
    """The task kind of ``name``: which prompt (``TASKS``) and retrieval rule it uses."""
    return spec(name).kind


# ----------------------------------------------------------------------------------------------
# Loading (clean, deduplicated rows)
# ----------------------------------------------------------------------------------------------

def instance_keys(df: pd.DataFrame) -> pd.Series:
    """One string per row naming its entities (drug order within a pair ignored), ``df``'s index.

    >>> df = pd.DataFrame({"molecule": ["A", "B"], "molecule2": ["B", "A"], "protein": None, "cell_id": "c"})
    >>> instance_keys(df).nunique()
    1
    """
    pair = [tuple(sorted(p)) if isinstance(p[1], str) else (p[0],) for p in zip(df["molecule"], df["molecule2"])]
    return pd.Series(["\x1f".join(map(str, (*p, prot, cell)))
                      for p, prot, cell in zip(pair, df["protein"], df["cell_id"])], index=df.index)


def _deduplicate(df: pd.DataFrame, dropped: dict[str, int]) -> pd.DataFrame:
    """One row per instance: repeated instances with one label collapse to one row; instances seen
    with both labels are dropped. Keeps eval and context pools free of the same instance."""
    key = instance_keys(df)
    n_labels = df.groupby(key)["y"].transform("nunique")
    df = sources.drop_rows(df, n_labels == 1, "instance seen with both labels", dropped)
    return sources.drop_rows(df, ~key[df.index].duplicated(), "duplicate instance", dropped)


@lru_cache(maxsize=None)
def _benchmark(name: str) -> pd.DataFrame:
    s = BENCHMARKS[name]
    dropped: dict[str, int] = {}
    df, n_read = s.loader(s, dropped)
    df = df.copy()
    for column in BENCHMARK_COLUMNS:
        if column not in df:
            df[column] = None
    df = sources.drop_rows(df, df["y"].isin([0, 1]), "missing or non-binary label", dropped)
    df = df.astype({"y": int})
    df = _deduplicate(df, dropped)
    return sources.summarise(f"benchmark {name}", df[BENCHMARK_COLUMNS].reset_index(drop=True), n_read, dropped)


def load_benchmark(name: str) -> pd.DataFrame:
    """All usable instances of benchmark ``name`` (a key of ``BENCHMARKS``).

    Columns: ``molecule`` (SMILES), ``molecule2`` (DrugComb's second drug, else None), ``protein``
    (sequence; the fixed enzyme for CYP tasks, else None for cell tasks), ``cell_id`` (CCLE name)
    and ``cell_genes`` (its top-50 Enrichr CCLE genes) for DrugComb/GDSC2 (else None), and ``y``
    (0/1; ``spec(name).labels[y]`` is its answer string). Invalid SMILES or sequences, unknown
    cell lines, labels other than 0/1, duplicates and conflicting labels are dropped;
    ``df.attrs["dropped"]`` counts them and the rules are in ``data_manifest/processing.md``. A
    text label in a file is refused (``sources.binary_labels``). Pools are drawn with
    ``benchmark_pools.split_pools``.
    """
    spec(name)
    df = _benchmark(name)
    out = df.copy()
    out["cell_genes"] = out["cell_genes"].map(lambda g: list(g) if isinstance(g, list) else None)
    out.attrs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in df.attrs.items()}
    out.attrs["benchmark"] = name
    return out


def check_rows(name: str, df: pd.DataFrame, what: str = "rows") -> None:
    """Refuse rows of benchmark ``name`` that cannot be scored, with one line naming the row.

    Checked: the columns its prompt needs are present; every label is 0 or 1 (not NaN, not 2);
    no row appears twice (same index or same entities); molecules are valid SMILES; a mol-prot
    protein is an amino-acid sequence; a cell task's cell has a gene list (an unknown cell line
    has none). ``InputError`` otherwise.

    >>> rows = pd.DataFrame({"molecule": ["CCO", "CCN"], "protein": ["MKT", "MKT"], "y": [1, 2]})
    >>> check_rows("CYP1A2", rows, "eval pool")
    Traceback (most recent call last):
    ...
    esmerge.errors.InputError: CYP1A2 eval pool, row 1: label 2 is not 0 or 1; give every row y = 0 or 1
    """
    s = spec(name)
    needed = ["y"] + ["cell_genes" if f == "cell" else f for f in s.prompt.fields if f != "protein"]
    if s.kind == "mol-prot":
        needed.append("protein")
    missing = [c for c in needed if c not in df]
    if missing:
        raise InputError(f"{name} {what}: no column {', '.join(missing)}; {name} rows need {', '.join(needed)}")

    def refuse(row, problem: str, fix: str):
        raise InputError(f"{name} {what}, row {row}: {problem}; {fix}")

    for row, y in df["y"].items():
        if pd.isna(y):
            refuse(row, "label is NaN", "give every row y = 0 or 1")
        number = isinstance(y, (int, float, np.integer, np.floating)) and not isinstance(y, (bool, np.bool_))
        if not number or y not in (0, 1):
            refuse(row, f"label {y.item() if hasattr(y, 'item') else y!r} is not 0 or 1", "give every row y = 0 or 1")
    repeated = df.index[df.index.duplicated()]
    if len(repeated):
        refuse(repeated[0], "appears twice", "each example must be in the pool once")
    keyed = df.assign(**{c: df[c] if c in df else None for c in ("molecule2", "protein", "cell_id")})
    keys = instance_keys(keyed)
    if keys.duplicated().any():
        refuse(keys.index[keys.duplicated()][0], "repeats the entities of an earlier row",
               "each example must be in the pool once")
    for column in ("molecule", "molecule2") if s.kind == "drugcomb" else ("molecule",):
        bad = df.index[~df[column].map(sources.valid_smiles)]
        if len(bad):
            refuse(bad[0], f"{column} {df.at[bad[0], column]!r} is not a valid SMILES", "drop or fix the row")
    if s.kind == "mol-prot":
        bad = df.index[~df["protein"].map(sources.valid_protein)]
        if len(bad):
            refuse(bad[0], "protein is not an amino-acid sequence", "drop or fix the row")
    if "cell_genes" in needed:
        bad = df.index[~df["cell_genes"].map(lambda g: isinstance(g, (list, tuple, np.ndarray)) and len(g) > 0)]
        if len(bad):
            cell = df.at[bad[0], "cell_id"] if "cell_id" in df else None
            refuse(bad[0], f"cell line {cell!r} has no gene list (unknown cell line)", "drop the row or add its genes")


# ----------------------------------------------------------------------------------------------
# Label balance and modalities
# ----------------------------------------------------------------------------------------------

def label_balance(names: list[str] | None = None) -> pd.DataFrame:
    """Positive/negative counts per benchmark (the analogue of paper Fig. 7).

    Returns columns ``benchmark``, ``group``, ``n_pos``, ``n_neg``, ``n_dropped``.
    """
    rows = []
    for name in names or list(BENCHMARKS):
        df = load_benchmark(name)
        rows.append((name, BENCHMARKS[name].group, int((df["y"] == 1).sum()), int((df["y"] == 0).sum()),
                     sum(df.attrs["dropped"].values())))
    return pd.DataFrame(rows, columns=["benchmark", "group", "n_pos", "n_neg", "n_dropped"])


def benchmark_modalities(benchmark: str) -> list[str]:
    """Modalities an interaction benchmark contains (from its Table 9/10 prompt fields), e.g. molecule+protein."""
    fields = TASKS[benchmark_kind(benchmark)].fields
    out = []
    for name in fields:
        modality = "molecule" if name.startswith("molecule") else name
        if modality not in out:
            out.append(modality)
    return out
