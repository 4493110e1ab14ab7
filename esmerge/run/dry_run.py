"""``esmerge merge|evaluate --scale paper --dry-run``: every check that needs no weight, then a plan.

``merge_plan`` and ``evaluate_plan`` build the base on the ``meta`` device and read only configs,
tokenizers, cards and safetensors headers (``esmerge.run.dry_run_checks``). ``evaluate_plan`` also
renders a few real prompts per benchmark (data through ``ESMERGE_DATA_DIR``, shots retrieved as in
the real run) and counts their tokens, each modality block at the length its encoder gives it. Both
return a ``Plan`` (``esmerge.run.dry_run_plan``) whose ``problems`` block the run and whose
``lines()`` say what was checked and what the run would cost. ``print_plan`` prints it and returns
the exit code (1 when there is a problem).
"""
from __future__ import annotations

import re
from pathlib import Path

from esmerge import methods, scales
from esmerge.errors import EsmergeError, UsageError
from esmerge.run.dry_run_checks import check_base, check_merged, check_specialists
from esmerge.run.dry_run_plan import (
    DEFAULT_UTILIZATION,
    H100_BF16_DENSE_PEAK,
    OVERHEAD,
    Plan,
    Step,
    activation_bytes,
    adamerging_cost,
    finetune_cost,
    forward_flops,
    gradient_flops,
    human,
    kv_cache_bytes,
    memory_bytes,
)
from esmerge.specialists import encoders
from esmerge.specialists.load import paper_base
from esmerge.specialists.per_scale import paper_specialists_dir
from esmerge.specialists.raw_encoder import RawEncoder

BASE_BYTES = 2  # load_paper loads the base in bf16
ES_BATCH = 16  # probes per batched gradient pass (esmerge.signals.gradients.BATCH_SIZE)
PROBE_TOKENS = {"molecule": 8, "cell": 24}  # es_signals' probe blocks; a protein block is its residues + 2
SPECIALIST = "specialist-"


class _BlockLength(RawEncoder):
    """Stands in for an encoder when counting tokens: the block length it gives, no weights."""

    def __init__(self, modality: str, n_tokens: int = 8):
        super().__init__()
        self.modality, self.n_tokens = modality, (None if modality == "protein" else n_tokens)

    def block_length(self, item) -> int:
        return len(encoders.esm_token_ids(item)) if self.modality == "protein" else self.n_tokens


def probe_length(tokenizer, mol_tokens: int = 8) -> int:
    """Tokens of one ES probe: the Fig. 4 template's text, a molecule block, the longest possible protein
    block (ESM-2's 1021 residues + 2: probes are padded to the longest) and a cell block."""
    from esmerge.signals.probe import probe_template

    text = re.split(r"<\|(?:molecule|protein|cell)\|>", probe_template(tokenizer, encoders.MODALITIES))
    words = sum(len(tokenizer(piece, add_special_tokens=False)["input_ids"]) for piece in text if piece)
    return words + mol_tokens + encoders.ESM_MAX_RESIDUES + 2 + PROBE_TOKENS["cell"]


def prompt_lengths(benchmark: str, tokenizer, config, token_sets: list[frozenset], n_prompts: int = 3,
                   mol_tokens: int = 8) -> dict[frozenset, list[tuple[int, int]]]:
    """``token modalities -> [(tokens, protein block tokens)]`` of ``n_prompts`` evaluation prompts of
    ``benchmark`` plus the one whose entities are longest, built as ``evaluate.sweep`` builds them
    (pools of ``config``, shots retrieved from the context pool, ``prompts.build_prompt``)."""
    from esmerge.data.benchmark_pools import split_pools
    from esmerge.data.benchmarks import load_benchmark, spec
    from esmerge.evaluate.prompts import build_prompt
    from esmerge.evaluate.retrieval import RetrievalCache, as_text
    from esmerge.evaluate.scoring import prompt_token_ids

    eval_df, context_df = split_pools(load_benchmark(benchmark), config.n_eval, config.n_context, config.seed)
    size = eval_df.apply(lambda r: sum(len(as_text(r.get(c))) for c in ("molecule", "molecule2", "protein"))
                         + len(r.get("cell_genes") or []) * 8, axis=1)
    queries = eval_df.loc[list(dict.fromkeys([*eval_df.index[:n_prompts], size.idxmax()]))]
    pool, positions = RetrievalCache().shots(spec(benchmark).kind, benchmark, queries, context_df, config.n_shots)
    found = {}
    for tokens in token_sets:
        projectors = {m: _BlockLength(m, mol_tokens) for m in tokens}
        options = config.prompt_options(tokens)
        rows = []
        for (_, row), shots in zip(queries.iterrows(), positions):
            prompt = build_prompt(benchmark, row, pool.iloc[shots], tokenizer, options)
            ids = prompt_token_ids(prompt, tokenizer, None, 0, projectors)[0]
            rows.append((len(ids), sum(projectors[m].block_length(v) for m, v in prompt.entities if m == "protein")))
        found[tokens] = rows
    return found


def _model_tokens(name: str, with_encoder: set[str]) -> frozenset:
    """The modalities model ``name`` reads as token blocks (the others as text), as ``evaluate_by_name``."""
    if name == "base":
        return frozenset()
    if name.startswith(SPECIALIST):
        return frozenset({name[len(SPECIALIST):]} & with_encoder)
    return frozenset(with_encoder)


def _new_plan(command: str, model_id: str, utilization: float, peak_flops: float) -> Plan:
    plan = Plan(command, model_id, utilization=utilization, peak_flops=peak_flops)
    plan.assumptions += [
        f"throughput {utilization:.0%} of {human(peak_flops, 'FLOP/s')} (default: an H100's dense bf16 peak)",
        "FLOPs: 2 x params x tokens per forward, x3 with one backward; attention's own FLOPs not counted",
        f"memory: base in bf16 ({BASE_BYTES} bytes/param), encoders at stored precision, KV cache / activations "
        f"as stated, + {OVERHEAD:.0%}",
    ]
    return plan


def merge_plan(method: str = "es", hparams: dict | None = None, *, base_path: str | None = None,
               specialists_dir: str | Path | None = None, probe_k: int | None = None, out: str | Path | None = None,
               force: bool = False, utilization: float = DEFAULT_UTILIZATION,
               peak_flops: float = H100_BF16_DENSE_PEAK) -> Plan:
    """What ``esmerge merge --scale paper --method METHOD --dry-run`` checks and would cost; loads no weight.

    ``base_path``/``specialists_dir``: as ``merge_command`` (default ``$ESMERGE_PAPER_BASE`` and
    ``$ESMERGE_PAPER_SPECIALISTS``). A bad method or hyper-parameter is a ``UsageError``, as in the real run;
    ``hparams`` that ``methods.validate`` already returned (``esmerge merge`` checks them first) are not checked again.
    """
    settings = methods.validate(method, {} if hparams is None else hparams)
    k = probe_k or scales.get("paper").probe_k
    probing, n = method in methods.needing("probe"), len(encoders.MODALITIES)
    if settings.get("probe_layout") == "code":  # the official code: M x probe_k probes (es_signals.signals)
        k *= n
    model_id = paper_base(base_path)
    plan = _new_plan("merge", model_id, utilization, peak_flops)
    model, tokenizer, sha = check_base(model_id, plan)
    encoded = probing or method in methods.needing("data")  # the data-driven baselines build prompts too
    sizes = check_specialists(paper_specialists_dir(specialists_dir), model, model_id, sha, plan,
                              set(encoders.MODALITIES) if encoded else set())
    plan.models = ["base", *(SPECIALIST + m for m in encoders.MODALITIES), f"merged ({method})"]
    if out is not None and Path(out).exists() and not force:
        plan.problems.append(f"--out {out} exists; choose another folder or pass --force")
    if model is None:
        return plan
    held, esm = sum(b for b, _ in sizes.values()), sizes.get("protein", (0, 0))[1]
    if not probing:
        if method in methods.needing("data") and tokenizer is not None:
            plan.steps += data_method_steps(method, settings, plan, model, tokenizer, held, esm)
        else:
            plan.steps.append(Step(f"{method}: base + encoders loaded, LoRA arithmetic", 0, 0.0,
                                   memory_bytes(plan.params, BASE_BYTES, held), "no model pass"))
        return plan
    cfg = model.config
    length = probe_length(tokenizer) if tokenizer is not None else 0
    plan.prompt_tokens["probe"] = length
    if plan.max_positions and length > plan.max_positions:
        plan.problems.append(f"probe: {length} tokens exceed the base's {plan.max_positions} positions")
    residues = k * (encoders.ESM_MAX_RESIDUES + 2)
    plan.steps += [
        Step("probe: ESM-2 on the proteins", residues, forward_flops(esm, residues),
             memory_bytes(0, 0, held), f"2 x {human(esm)} encoder params x residues"),
        Step(f"states: base + {n} specialists, {k} probes", (n + 1) * k * length,
             forward_flops(plan.params, (n + 1) * k * length),
             memory_bytes(plan.params, BASE_BYTES, held + kv_cache_bytes(
                 cfg.num_hidden_layers, _kv_heads(cfg), _head_dim(cfg), ES_BATCH * length)),
             f"forward; + KV of {ES_BATCH} probes"),
    ]
    if method != "es-layer":
        plan.steps.append(Step(f"element scores: {n} specialists x {k} probes", n * k * length,
                               n * gradient_flops(plan.params, k * length, backward_passes=n),
                               memory_bytes(plan.params, BASE_BYTES, held + activation_bytes(
                                   cfg.num_hidden_layers, cfg.hidden_size, length)),
                               f"1 forward + {n} backward; activations of one probe (protein blocks vary in "
                               "length, so es_signals.element_scores runs each probe alone)"))
    plan.assumptions.append(f"probe: {k} samples per specialist pass, padded to the longest possible protein "
                            f"({encoders.ESM_MAX_RESIDUES} residues + 2): {length} tokens each (an upper bound)")
    return plan


# --------------------------------------------------------------------------- the data-driven baselines' passes
def data_method_steps(method: str, settings: dict, plan: Plan, model, tokenizer, held_bytes: float,
                      encoder_params: float, budgets=None, n_prompts: int = 3) -> list:
    """The costed passes of AdaMerging or Avg+FT at paper scale (``dry_run_plan.adamerging_cost``,
    ``finetune_cost``), from the declared budgets: the method's hyper-parameters where ``settings`` sets them
    (``steps``; ``epochs``, ``max_steps``), else ``budgets`` (default the paper scale's ``MergeBudgets``: prompts
    per benchmark, batch sizes, training rows), on the benchmarks ``budgets.benchmarks`` (all 13 by default).
    Prompt lengths are measured as the evaluation dry run measures them (``n_prompts`` rendered prompts per
    benchmark and its longest-entity one, as the merged model reads them: molecules and proteins as blocks).
    Training rows are what ``run.baseline_inputs`` draws: at most ``ft_examples``, from outside the evaluation pool."""
    from esmerge.data.benchmarks import BENCHMARK_NAMES
    from esmerge.evaluate.sweep import EvalConfig
    from esmerge.run.baseline_inputs import training_rows

    paper = scales.get("paper")
    budgets = budgets or paper.merge_budgets
    config, tokens = EvalConfig.for_scale(paper), frozenset({"molecule", "protein"})
    measured = {}
    for benchmark in budgets.benchmarks or BENCHMARK_NAMES:
        try:
            rows = prompt_lengths(benchmark, tokenizer, config, [tokens], n_prompts)[tokens]
            pool = len(training_rows(benchmark, config))
        except (EsmergeError, ValueError) as err:
            plan.problems.append(f"{method}: {benchmark}: {str(err).splitlines()[0]}")
            continue
        measured[benchmark] = (pool, sum(n for n, _ in rows) / len(rows), sum(p for _, p in rows) / len(rows),
                               max(n for n, _ in rows))
    if not measured:
        return []
    cfg, longest = model.config, max(m[3] for m in measured.values())
    shape = {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "held_bytes": held_bytes,
             "encoder_params": encoder_params}
    if method == "adamerging":
        steps = settings.get("steps", budgets.adamerging_steps)
        mean = sum(m[1] for m in measured.values()) / len(measured)  # the prompts mix every benchmark equally
        residues = sum(m[2] for m in measured.values()) / len(measured)
        plan.assumptions.append(f"adamerging: {budgets.adamerging_prompts_per_benchmark} unlabeled prompts per "
                                f"benchmark x {len(measured)} benchmarks, batches of {budgets.adamerging_batch}")
        return [adamerging_cost(plan.params, steps, budgets.adamerging_batch, mean, longest,
                                encoder_tokens=residues, **shape)]
    rows = {b: (min(budgets.ft_examples, m[0]), m[1]) for b, m in measured.items()}
    short = sorted(b for b, (n, _) in rows.items() if n < budgets.ft_examples)
    if short:  # the training rows: every row outside the evaluation pool (run.baseline_inputs.training_rows)
        plan.notes.append(f"avg-ft: {len(short)} benchmark(s) train on fewer than the declared {budgets.ft_examples} "
                          f"rows, as many as they hold outside the evaluation pool, e.g. {short[0]} "
                          f"{rows[short[0]][0]}")
    return [finetune_cost(plan.params, rows, settings.get("epochs", budgets.ft_epochs), budgets.ft_batch, longest,
                          max_steps=settings.get("max_steps"), encoder_tokens={b: m[2] for b, m in measured.items()},
                          **shape)]


def evaluate_plan(models: list[str], benchmarks: list[str] | None = None, *, n_eval: int | None = None,
                  n_shots: int | None = None, scoring: str | None = None, max_new_tokens: int | None = None,
                  seed: int = 0, base_path: str | None = None, specialists_dir: str | Path | None = None,
                  n_prompts: int = 3, utilization: float = DEFAULT_UTILIZATION,
                  peak_flops: float = H100_BF16_DENSE_PEAK) -> Plan:
    """What ``esmerge evaluate --scale paper --model ... --dry-run`` checks and would cost; loads no weight.

    Settings as ``evaluate_by_name`` (``EvalConfig.for_scale(scales.get("paper"), ...)``); ``n_prompts`` prompts per
    benchmark (and its longest-entity one) are rendered and tokenised.
    """
    from esmerge.data.benchmarks import BENCHMARK_NAMES
    from esmerge.evaluate.scoring import answer_tokens
    from esmerge.evaluate.sweep import EvalConfig, check_pool_sizes, default_benchmarks

    unknown = sorted(set(benchmarks or []) - set(BENCHMARK_NAMES))
    if unknown:
        raise UsageError(f"--benchmarks: unknown {', '.join(unknown)}; choose from {', '.join(BENCHMARK_NAMES)}")
    overrides = {"n_eval": n_eval, "n_shots": n_shots, "scoring": scoring, "max_new_tokens": max_new_tokens}
    paper = scales.get("paper")
    config = EvalConfig.for_scale(paper, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    model_id = paper_base(base_path)
    plan = _new_plan("evaluate", model_id, utilization, peak_flops)
    plan.models, plan.benchmarks = list(models), list(benchmarks or default_benchmarks(paper))
    for name in models:
        if not (name == "base" or (name.startswith(SPECIALIST) and name[len(SPECIALIST):] in encoders.MODALITIES)
                or (Path(name) / "esmerge.json").is_file()):
            plan.problems.append(f"--model {name!r}: not base, specialist-<molecule|protein|cell> or a finished "
                                 "merged-model folder (with esmerge.json)")
    with_encoder = {"molecule", "protein"}  # the paper specialists whose cards name an encoder
    token_sets = list(dict.fromkeys(_model_tokens(m, with_encoder) for m in models))
    needed = set().union(*token_sets) if token_sets else set()
    model, tokenizer, sha = check_base(model_id, plan)
    sizes = check_specialists(paper_specialists_dir(specialists_dir), model, model_id, sha, plan, needed)
    if model is None or tokenizer is None:
        return plan
    for name in models:
        if name != "base" and not name.startswith(SPECIALIST) and (Path(name) / "esmerge.json").is_file():
            check_merged(Path(name), model, plan)
    generated = config.max_new_tokens if config.scoring == "generate" else 0
    measured: dict[frozenset, list] = {t: [] for t in token_sets}
    for benchmark in plan.benchmarks:
        try:
            from esmerge.data.benchmarks import load_benchmark, spec

            check_pool_sizes(benchmark, config, len(load_benchmark(benchmark)))
            answer_tokens(tokenizer, spec(benchmark).labels)
            found = prompt_lengths(benchmark, tokenizer, config, token_sets, n_prompts)
        except (EsmergeError, ValueError) as err:
            plan.problems.append(f"{benchmark}: {str(err).splitlines()[0]}")
            continue
        longest = max(n for rows in found.values() for n, _ in rows)
        plan.prompt_tokens[benchmark] = longest
        if plan.max_positions and longest + generated > plan.max_positions:
            plan.problems.append(f"{benchmark}: prompts of up to {longest} tokens (+{generated} generated) exceed "
                                 f"the base's {plan.max_positions} positions")
        for tokens, rows in found.items():
            measured[tokens] += rows
    plan.checked.append(f"prompts: {n_prompts} per benchmark + the longest-entity one rendered and tokenised "
                        f"({config.scoring}, {config.n_shots} shots, n_eval {config.n_eval})")
    cfg, batch = model.config, config.batch_size
    longest = max(plan.prompt_tokens.values(), default=0) + generated
    kv = kv_cache_bytes(cfg.num_hidden_layers, _kv_heads(cfg), _head_dim(cfg), batch * longest)
    for name in models:
        rows = measured.get(_model_tokens(name, with_encoder)) or [(0, 0)]
        mean_tokens = sum(n for n, _ in rows) / len(rows) + generated
        mean_protein = sum(p for _, p in rows) / len(rows)
        tokens = int(mean_tokens * config.n_eval * len(plan.benchmarks))
        encoder = sum(sizes.get(m, (0, 0))[0] for m in _model_tokens(name, with_encoder))
        copies = 1 if name == "base" else 2  # evaluate.models.PeftCopies holds a copy of the base per adapter
        esm = forward_flops(sizes.get("protein", (0, 0))[1], mean_protein * config.n_eval * len(plan.benchmarks))
        plan.steps.append(Step(name if len(name) < 40 else "..." + name[-37:], tokens,
                               forward_flops(plan.params, tokens) + esm,
                               memory_bytes(copies * plan.params, BASE_BYTES, encoder + kv),
                               f"{len(plan.benchmarks)} x {config.n_eval} prompts of ~{mean_tokens:.0f} tokens; "
                               f"{copies} base cop{'y' if copies == 1 else 'ies'} + KV of {batch} x {longest}"))
    plan.assumptions.append(f"tokens per prompt: the mean of the rendered ones (+{generated} generated, KV-cached)")
    return plan


def print_plan(plan: Plan) -> int:
    """Print ``plan.lines()``; the exit code: 1 when the plan has a blocking problem, else 0."""
    print("\n".join(plan.lines()))
    return 1 if plan.problems else 0


def _kv_heads(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
