"""The paper's representation claims (Figs. 1, 2, 8; Table 7), checked on the chapters' saved tables.

``mechanism_claims`` reads the tables the probe, layer-wise and element-wise chapters save; it uses
one seed and no per-example answers, so its verdicts are descriptive (no CIs, no Holm family). It is
kept apart from ``claims``, whose accuracy registers compare per-example answers with paired
bootstraps; both carry the same caveat columns (``CAVEAT_COLUMNS``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from esmerge.evaluate.caveats import CAVEAT_COLUMNS, DEFAULT_CAVEATS, SELECTION_TEST, caveats_for, seeds_text
from esmerge.signals.diagnostics import specialisation_verdict


def mechanism_claims(last_block_shift: pd.DataFrame, own_vs_other: pd.DataFrame,
                     projection_stability: pd.DataFrame, merged_distances: pd.DataFrame, *,
                     n: int | Mapping[str, int] | None = None, seeds: Sequence[int] = (0,),
                     caveats: Sequence[str] | None = None) -> pd.DataFrame:
    """The paper's claims about representations (Figs. 1, 2, 8 and Table 7), checked on the tables
    the probe, layer-wise and element-wise chapters save.

    Inputs (one seed, so verdicts are descriptive, without CIs):

    * ``last_block_shift``: rows specialists, columns token modalities; mean last-block distance
      between base and specialist tokens (``03_probe``). Fig. 1: each specialist moves its own
      modality's tokens furthest.
    * ``own_vs_other``: columns ``specialist``, ``blocks_above``, ``blocks``, ``mean_ratio`` and
      optionally ``seed`` (``diagnostics.specialisation_by_seed``, saved by ``04_layerwise``). Fig. 2:
      own-modality SWD exceeds other-modality SWD at most blocks and on average
      (``specialisation_verdict``); with several specialist seeds, *holds* only at every seed,
      *mixed: holds at k of S seeds* when at some.
    * ``projection_stability``: columns ``projections``, ``mean std of alpha over seeds``
      (``04_layerwise``). Table 7: more projections, steadier coefficients (strictly falling).
    * ``merged_distances``: rows token modalities, columns specialists; distance from the ES-merged
      model (``05_elementwise``). Fig. 8: on each modality the merged model is nearest the
      matching specialist.

    ``n``: the examples behind each source (an int for all, or ``{source: n}``; ``"not recorded"``
    where absent); ``seeds``: the specialist seeds; ``caveats``: what applies, default
    ``DEFAULT_CAVEATS["representation"]`` (on Fig. 2 rows the seed caveat says that the
    seed was selected by that very test).

    Returns ``claim, source, evidence, verdict`` with verdict ``holds`` or ``does not hold``, and
    the caveat columns ``n, seeds, caveats, would_change``.
    """
    rows = []
    applies = tuple(DEFAULT_CAVEATS["representation"] if caveats is None else caveats)

    def count(source):
        value = n.get(source) if isinstance(n, Mapping) else n
        return "not recorded" if value is None else value

    def add(claim, source, evidence, holds, change, row_seeds=None):
        row_seeds = tuple(seeds) if row_seeds is None else row_seeds
        text = caveats_for(applies, ["specialists"], seeds=row_seeds,
                           selected_by="this very test" if source == "Fig. 2" else SELECTION_TEST)
        verdict = holds if isinstance(holds, str) else "holds" if holds else "does not hold"
        rows.append({"claim": claim, "source": source, "evidence": evidence, "verdict": verdict, "n": count(source),
                     "seeds": seeds_text(row_seeds, ["specialists"]), "caveats": text, "would_change": change})

    def nearest(row, want, smallest):
        other = row.drop(want)
        best = other.idxmin() if smallest else other.idxmax()
        return f"{best} {other[best]:.3g} vs {want} {row[want]:.3g}"

    for name, row in last_block_shift.iterrows():
        if name in row.index:
            holds = row.idxmax() == name
            change = (f"another modality's tokens moving further ({nearest(row, name, False)})" if holds else
                      f"{name} tokens moving furthest (now {nearest(row, name, False)})")
            add(f"the {name} specialist moves {name} tokens furthest from the base (last block)", "Fig. 1",
                ", ".join(f"{m} {v:.3g}" for m, v in row.items()), holds, change)
    by_seed = own_vs_other if "seed" in own_vs_other else own_vs_other.assign(seed=seeds[0])
    for spec, part in by_seed.groupby("specialist", sort=False):
        part = part.sort_values("seed")
        passed = [specialisation_verdict(r.blocks_above, r.blocks, r.mean_ratio) for r in part.itertuples()]
        evidence = "; ".join(f"seed {r.seed}: {r.blocks_above}/{r.blocks} blocks, mean ratio {r.mean_ratio:.2f}"
                             for r in part.itertuples()) if len(part) > 1 else (
            f"{part.blocks_above.iloc[0]}/{part.blocks.iloc[0]} blocks, mean ratio {part.mean_ratio.iloc[0]:.2f}")
        holds = all(passed) or (f"mixed: holds at {sum(passed)} of {len(passed)} seeds" if any(passed) else False)
        every, any_ = (" at every seed", " at any seed") if len(part) > 1 else ("", "")
        change = (f"own SWD above the others' at half the blocks or fewer, or a mean ratio <= 1{any_} (now {evidence})"
                  if holds is True else
                  f"own SWD above the others' at most blocks and a mean ratio > 1{every} (now {evidence})")
        add(f"{spec} specialist: SWD on {spec} tokens exceeds SWD on other tokens", "Fig. 2", evidence, holds,
            change, tuple(part["seed"]))
    ordered = projection_stability.sort_values("projections")
    spread = ordered["mean std of alpha over seeds"].to_numpy()
    holds = bool(len(spread) > 1 and np.all(np.diff(spread) < 0))
    add("more random projections give steadier layer coefficients", "Table 7",
        ", ".join(f"{p}: {v:.3f}" for p, v in zip(ordered["projections"], spread)), holds,
        "a spread that does not fall at some step to more projections" if holds
        else "a spread that falls at every step to more projections")
    for modality, row in merged_distances.iterrows():
        if modality in row.index:
            holds = row.idxmin() == modality
            change = (f"another specialist nearer ({nearest(row, modality, True)})" if holds else
                      f"the {modality} specialist nearest (now {nearest(row, modality, True)})")
            add(f"on {modality} tokens the ES-merged model is nearest the {modality} specialist", "Fig. 8",
                "nearest: " + row.idxmin() + "; " + ", ".join(f"{m} {v:.3g}" for m, v in row.items()), holds, change)
    return pd.DataFrame(rows, columns=["claim", "source", "evidence", "verdict", *CAVEAT_COLUMNS])
