"""Retention: the ratio and its sign on hand-made NLLs, paired bootstrap CIs that
cover a known truth, the claims section's verdicts, and per-example NLLs on the smoke base."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from esmerge import scales
from esmerge.evaluate import retention as R
from esmerge.evaluate import retention_models as S
from esmerge.evaluate.caveats import CAVEAT_COLUMNS
from esmerge.specialists import captions as C
from esmerge.specialists import heldout
from esmerge.specialists.adapters import save_merged
from esmerge.specialists.base_llm import load_base
from esmerge.specialists.encoders import MODALITIES

SMOKE = scales.get("smoke")
SMOKE_RECIPE, SMOKE_TOP_K = SMOKE.train, SMOKE.cell_top_k


def hand_made(base=(3.0, 5.0), spec=(1.0, 3.0), **merged):
    """One modality, two examples of 1 and 2 answer tokens: summed NLLs per example."""
    tokens = np.array([1, 2])
    nlls = {"base": np.array(base), "specialist-molecule": np.array(spec)}
    nlls.update({k: np.array(v) for k, v in merged.items()})
    return {"molecule": nlls}, {"molecule": tokens}


# --------------------------------------------------------------------------- the ratio
def test_retained_fraction_on_hand_made_nlls():
    # mean NLLs (token-weighted): base 8/3, specialist 4/3; halfway is 2 -> sums 2 and 4 per example
    nlls, tokens = hand_made(half=(2.0, 4.0), same_as_spec=(1.0, 3.0), worse=(4.0, 6.0), better=(0.0, 2.0))
    res = R.resampled_retention(nlls, tokens, n_resamples=50)
    assert res.nll["base"]["molecule"] == pytest.approx(8 / 3)
    assert res.nll["specialist-molecule"]["molecule"] == pytest.approx(4 / 3)
    point = {k: res.point[k]["molecule"] for k in res.point}
    # sign convention: 1 = as good as the specialist, 0 = the base, < 0 worse than the base,
    # > 1 better than the specialist
    assert point == pytest.approx({"base": 0.0, "specialist-molecule": 1.0, "half": 0.5, "same_as_spec": 1.0,
                                   "worse": -0.5, "better": 1.5})  # means 10/3 and 2/3
    assert res.gain["molecule"][0] == pytest.approx(4 / 3)


def test_retained_fraction_is_nan_when_the_specialist_does_not_beat_the_base():
    assert np.isnan(R.retained_fraction(1.0, 2.0, 2.0))
    assert np.isnan(R.retained_fraction(1.0, 2.0, 2.5))
    assert R.retained_fraction(np.array([1.5, 2.0]), np.array([2.0, 2.0]), np.array([1.0, 1.0])).tolist() == [0.5, 0.0]


def test_mean_nll_weights_examples_by_answer_tokens_like_specialist_loss():
    # 1 nat over 1 token and 9 nats over 3 tokens: per token 10/4, not the mean of per-example means (2)
    assert R.mean_nll(np.array([1.0, 9.0]), np.array([1, 3])) == pytest.approx(2.5)


# --------------------------------------------------------------------------- bootstrap
def synthetic(n=400, seed=0, merged_shift=0.5, noise=0.05, models=None):
    """Three modalities, per-example NLLs that share a large example difficulty across models.

    Per token: base = d + 1, specialist = d, merged = d + ``merged_shift`` (+ small noise), so the
    true retained fraction is 1 - merged_shift on every modality.
    """
    rng = np.random.default_rng(seed)
    nlls, tokens = {}, {}
    for m in MODALITIES:
        t = rng.integers(5, 30, n)
        d = rng.gamma(2.0, 1.5, n)  # difficulty, shared: spread 2 nats, much larger than the effects
        per = {"base": d + 1, f"specialist-{m}": d,
               **{k: d + s for k, s in (models or {"merged": merged_shift}).items()}}
        nlls[m] = {k: (v + noise * rng.standard_normal(n)) * t for k, v in per.items()}
        tokens[m] = t
    return nlls, tokens


def test_paired_ci_covers_the_truth_and_is_tight():
    nlls, tokens = synthetic(merged_shift=0.3)
    table = R.retention_table(R.resampled_retention(nlls, tokens, n_resamples=500, seed=1))
    rows = table[table["method"] == "merged"].set_index("modality")
    for m in (*MODALITIES, "mean"):
        assert rows.loc[m, "lo"] < 0.7 < rows.loc[m, "hi"], m
        # paired: the shared difficulty cancels, so the CI is a few hundredths wide
        assert rows.loc[m, "hi"] - rows.loc[m, "lo"] < 0.1, m
    assert (rows.loc[list(MODALITIES), "n"] == 400).all()
    own = table[(table["method"] == "specialist-cell") & (table["modality"] == "cell")].iloc[0]
    assert own[["retained", "lo", "hi"]].tolist() == [1.0, 1.0, 1.0]


def test_ci_would_be_wide_without_pairing():
    """The same data with each model resampled independently: the CI of the difference is far wider,
    which is what the joint resampling removes (a test that fails if pairing is broken)."""
    nlls, tokens = synthetic(merged_shift=0.3)
    m = "molecule"
    t = tokens[m]
    rng = np.random.default_rng(0)
    unpaired = []
    for _ in range(300):
        draws = {k: R.mean_nll(v, t, rng.integers(0, len(t), (1, len(t))))[0] for k, v in nlls[m].items()}
        unpaired.append(R.retained_fraction(draws["merged"], draws["base"], draws[f"specialist-{m}"]))
    res = R.resampled_retention(nlls, tokens, n_resamples=300)
    paired_width = np.subtract(*R.percentile_ci(res.draws["merged"][m])[::-1])
    assert np.subtract(*R.percentile_ci(np.array(unpaired))[::-1]) > 5 * paired_width


def test_ci_covers_the_truth_in_most_synthetic_replicates():
    """Coverage of the nominal 95 % CI on 40 independent synthetic data sets (n = 200): at least 33 cover."""
    covered = 0
    for rep in range(40):
        nlls, tokens = synthetic(n=200, seed=100 + rep, merged_shift=0.4, noise=0.3)
        res = R.resampled_retention({"protein": nlls["protein"]}, {"protein": tokens["protein"]},
                                    n_resamples=400, seed=rep)
        lo, hi = R.percentile_ci(res.draws["merged"]["protein"])
        covered += lo < 0.6 < hi
    assert covered >= 33


# --------------------------------------------------------------------------- claims
def test_claims_rank_es_and_give_one_verdict_per_baseline():
    nlls, tokens = synthetic(models={"es": 0.3, "avg": 0.6, "ties": 0.1, "pcb": 0.3, "es-layer": 0.0},
                             noise=0.2)
    claims = R.retention_claims(R.resampled_retention(nlls, tokens, n_resamples=500))
    assert claims.iloc[0]["b"] == "every baseline"
    by_b = claims.iloc[1:].set_index("b")
    assert set(by_b.index) == {"avg", "ties", "pcb"}  # not the base, the specialists or ES's own ablation
    assert by_b.loc["avg", "verdict"] == "supported"  # retention 0.7 vs 0.4
    assert by_b.loc["ties", "verdict"] == "not supported"  # 0.7 vs 0.9
    assert by_b.loc["pcb", "verdict"] == "inconclusive"  # the same shift, different noise
    assert by_b.loc["avg", "ours"] == pytest.approx(0.3, abs=0.05)
    assert by_b.loc["avg", "lo"] < by_b.loc["avg", "ours"] < by_b.loc["avg", "hi"]
    head = claims.iloc[0]
    assert head["verdict"] == "not supported" and head["ours"] == by_b.loc["ties", "ours"]
    assert (claims["rank"] == 2).all() and (claims["of"] == 4).all()  # ties > es (~pcb) > avg
    assert set(claims["verdict"]) <= set(R.VERDICTS)


def test_claims_supported_only_when_every_margin_is():
    nlls, tokens = synthetic(models={"es": 0.1, "avg": 0.6, "ties": 0.5})
    claims = R.retention_claims(R.resampled_retention(nlls, tokens, n_resamples=300))
    assert claims["verdict"].tolist() == ["supported"] * 3
    assert claims.iloc[0]["rank"] == 1


def test_claims_without_es_are_not_measured():
    nlls, tokens = synthetic(models={"avg": 0.6})
    claims = R.retention_claims(R.resampled_retention(nlls, tokens, n_resamples=50))
    assert claims["verdict"].tolist() == ["not measured"]


# --------------------------------------------------------------------------- NLLs of real (smoke) models
@pytest.fixture(scope="module")
def smoke(private_cache):
    from esmerge.specialists.per_scale import load_specialists

    torch.set_num_threads(1)
    base = load_base(scales.get("smoke"))
    yield base, load_specialists(scales.get("smoke"), base)


def test_example_nlls_match_specialist_loss_and_single_examples(smoke):
    base, specs = smoke
    examples = C.smoke_examples("molecule", SMOKE_TOP_K)
    model = base.model
    nll, tokens = S.example_nlls(model, base.tokenizer, specs["molecule"].projector, examples, 128, batch_size=3)
    assert R.mean_nll(nll, tokens) == pytest.approx(heldout.specialist_loss(model, base, specs["molecule"], examples,
                                                                            max_tokens=128), rel=1e-5)
    one, one_t = S.example_nlls(model, base.tokenizer, specs["molecule"].projector, examples[5:6], 128, batch_size=1)
    assert one_t[0] == tokens[5] and one[0] == pytest.approx(nll[5], rel=1e-4)  # batch and order do not matter


def test_score_models_caches_per_model_and_reads_merged_folders(smoke, tmp_path, monkeypatch):
    base, specs = smoke
    avg = specs["molecule"].adapter  # any adapter will do as a "merged" model
    save_merged(tmp_path / "merges" / "avg", avg, {"method": "avg"})
    save_merged(tmp_path / "merges" / "avg-ft" / "GDSC2", specs["cell"].adapter, {"method": "avg-ft"})
    (tmp_path / "merges" / "junk").mkdir()
    models, notes = S.retention_models(specs, tmp_path / "merges", avg_ft_benchmarks=["GDSC2", "BindingDB"])
    assert list(models) == ["base", "specialist-molecule", "specialist-protein", "specialist-cell", "avg",
                            "avg-ft/GDSC2"]
    assert any("junk" in n for n in notes)
    examples = {m: C.smoke_examples(m, SMOKE_TOP_K)[:4] for m in ("molecule", "cell")}
    calls = []
    real = S.example_nlls
    monkeypatch.setattr(S, "example_nlls", lambda *a, **k: calls.append(1) or real(*a, **k))
    nlls, tokens = S.score_models(models, base, specs, examples, SMOKE_RECIPE, batch_size=4, cache=tmp_path / "c",
                                  progress=False)
    # keyed by weights: "avg" and "avg-ft/GDSC2" hold specialists' adapters, so 4 distinct models x 2 modalities
    assert len(calls) == 8 and set(nlls["cell"]) == set(models)
    # the merged "avg" holds the molecule specialist's adapter: identical NLLs on every example
    np.testing.assert_array_equal(nlls["molecule"]["avg"], nlls["molecule"]["specialist-molecule"])
    assert not np.array_equal(nlls["molecule"]["base"], nlls["molecule"]["specialist-molecule"])
    again, _ = S.score_models(models, base, specs, examples, SMOKE_RECIPE, batch_size=4, cache=tmp_path / "c",
                               progress=False)
    assert len(calls) == 8  # every entry read back from the cache
    np.testing.assert_array_equal(again["cell"]["avg-ft/GDSC2"], nlls["cell"]["avg-ft/GDSC2"])
    other = {"molecule": examples["molecule"][:3], "cell": examples["cell"]}
    S.score_models(models, base, specs, other, SMOKE_RECIPE, batch_size=4, cache=tmp_path / "c", progress=False)
    assert len(calls) == 12  # other examples: a new key for the molecule entries only
    res = R.resampled_retention(nlls, tokens, n_resamples=20)
    gain = res.gain["molecule"][0]
    if gain > 0:  # the specialist beats the base on these 4 examples: "avg" retains all of it
        assert res.point["avg"]["molecule"] == pytest.approx(1.0)
    else:  # nothing to retain
        assert np.isnan(res.point["avg"]["molecule"])


def test_claims_have_the_registers_shape_so_the_claims_chapter_can_list_them():
    from esmerge.report.summaries import disagreements

    nlls, tokens = synthetic(models={"es": 0.3, "avg": 0.6, "ties": 0.1})
    claims = R.retention_claims(R.resampled_retention(nlls, tokens, n_resamples=200))
    assert {"claim", "source", "paper", "ours", "lo", "hi", "verdict", "n_compared", "detail", "p_holm",
            "modality"} <= set(claims.columns)
    assert (claims["p_holm"] < 0.05).all()  # a margin of 0.3 or more survives Holm over the 2 baselines
    assert claims["n_compared"].tolist() == [2, 1, 1] and claims["paper"].isna().all()
    empty = pd.DataFrame(columns=["claim", "source", "evidence", "verdict"])
    lines = disagreements(empty, claims)
    assert any("ties" in line and "not supported" in line for line in lines)
    assert "1 of 3 supported, 2 contradicted" in lines[-1]  # the head row and "vs ties" are not supported


def test_emr_is_scored_with_its_modulation_for_the_specialists_task(smoke, tmp_path):
    from esmerge.specialists.adapters import with_state

    base, specs = smoke
    unified = specs["protein"].adapter
    extras = {}
    for m, lam in (("molecule", 0.5), ("protein", 2.0), ("cell", 1.0)):
        extras[f"{m}.rescale"] = torch.tensor(lam)
        extras.update({f"{m}.mask.{k}": torch.ones_like(v) for k, v in unified.state.items()})
    save_merged(tmp_path / "emr", with_state(unified, unified.state, "emr", extras), {"method": "emr"})
    models, _ = S.retention_models(specs, tmp_path)
    for m, lam in (("molecule", 0.5), ("protein", 2.0)):
        got = models["emr"].adapter_for(m).state
        for k, v in unified.state.items():
            torch.testing.assert_close(got[k], lam * v)


def test_every_retention_claim_carries_its_caveats_and_what_would_change_it():

    nlls, tokens = synthetic(models={"es": 0.3, "avg": 0.6, "emr": 0.1, "adamerging": 0.3}, noise=0.2)
    claims = R.retention_claims(R.resampled_retention(nlls, tokens, n_resamples=300))
    assert list(claims.columns[-4:]) == list(CAVEAT_COLUMNS)
    assert (claims["n"] == 3 * 400).all() and (claims["seeds"] == "0").all()
    by_b = claims.set_index("b")
    assert by_b.loc["emr", "caveats"] == "tiny base LLM; one seed, selected by the Fig. 2 test; oracle routing: emr"
    assert by_b.loc["avg", "caveats"] == "tiny base LLM; one seed, selected by the Fig. 2 test"
    assert by_b.loc["adamerging", "caveats"].endswith("below the paper's budget: adamerging")
    head = by_b.loc["every baseline"]
    assert "oracle routing: emr" in head["caveats"] and "below the paper's budget: adamerging" in head["caveats"]
    # numbers from the rows: avg is beaten (0.7 vs 0.4), emr beats es (0.9 vs 0.7) and decides the head
    avg = by_b.loc["avg"]
    assert avg["verdict"] == "supported"
    assert avg["would_change"] == f"a CI lower bound at or below 0 vs avg (now {avg['lo']:+.3f})"
    assert by_b.loc["emr", "verdict"] == head["verdict"] == "not supported"
    assert head["would_change"].startswith("emr no longer significantly better: a CI upper bound at or above 0")
    mine = R.retention_claims(R.resampled_retention(nlls, tokens, n_resamples=50), seeds=(0, 1, 2),
                              caveats=["tiny base"])
    assert (mine["seeds"] == "0, 1, 2").all() and (mine["caveats"] == "tiny base LLM").all()
    none = R.retention_claims(R.resampled_retention(*synthetic(models={"avg": 0.6}), n_resamples=20))
    assert none.iloc[0]["would_change"] == "results for the missing models or benchmarks"
