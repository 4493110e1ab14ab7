"""The data-facing inputs of the training baselines (and Graft's compatibility table), built from
the evaluation's prompt pipeline.

AdaMerging needs an entropy objective over *unlabeled test prompts*; Avg+FT needs a loss over
one benchmark's *training examples*. Both reuse ``esmerge.evaluate`` (App. A.4 retrieval, the
Table 9-10 prompts, two-label scoring) so the merged models are adapted on exactly the prompts
they are evaluated with:

* unlabeled test prompts: the evaluation pool's queries with ``y`` hidden (AdaMerging is a
  test-time method; the paper adapts on the test samples);
* training examples: queries drawn from the benchmark's in-context pool (the training side of
  ``benchmark_pools.split_pools``), each with in-context examples retrieved from the rest of that pool,
  and its gold answer.

The functions return plain callables/lists so the methods themselves stay data-agnostic.
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch

from esmerge import evaluate
from esmerge.data import benchmarks
from esmerge.data.benchmark_pools import split_pools
from esmerge.evaluate.scoring import common_n_tokens, entity_tokens, length_batches, prompt_token_ids
from esmerge.methods.graft_compatibility import compatibility_score
from esmerge.methods.objectives import lora_state_swapped, mean_entropy
from esmerge.signals.hooks import module_outputs
from esmerge.specialists.adapters import Adapter, LoraState
from esmerge.specialists.load import attach_specialist, projectors_of


@functools.lru_cache(maxsize=32)
def benchmark_pools(benchmark: str, config):
    """``(eval_df, context_df)`` as the evaluation draws them: ``benchmark_pools.split_pools`` with the
    config's sizes, the in-context pool shrunk to the rows left when a benchmark is smaller than
    ``n_eval + n_context`` (e.g. the CYP substrate sets)."""
    frame = benchmarks.load_benchmark(benchmark)
    n_eval = min(config.n_eval, len(frame) // 2)
    n_context = min(config.n_context, len(frame) - n_eval)
    return split_pools(frame, n_eval, n_context, config.seed)


def training_rows(benchmark: str, config):
    """Every row of ``benchmark`` outside its evaluation pool (the in-context pool and the rows neither
    pool drew): what a fine-tuning baseline may train on without seeing an evaluation row."""
    eval_df, _ = benchmark_pools(benchmark, config)
    frame = benchmarks.load_benchmark(benchmark)
    return frame.drop(index=eval_df.index)


def benchmark_prompts(benchmark: str, tokenizer, projectors: dict, config, split: str = "eval",
                      n: int | None = None, seed: int = 0) -> list:
    """Prompts of ``benchmark`` as ``esmerge.evaluate`` builds them.

    split : ``"eval"`` -- the evaluation queries (labels kept in ``Prompt.y``; callers that must
    not see them, like AdaMerging, ignore ``y``); ``"train"`` -- queries from the in-context pool,
    with shots retrieved from the same pool (never the query itself), or, when ``n`` asks for more
    rows than that pool holds (Avg+FT's 2,000 at paper scale), from every row outside the
    evaluation pool, shots still from the in-context pool.
    n : at most this many prompts (seeded sample), default all.
    config : the ``evaluate.EvalConfig`` whose pools, shots and prompt options are used.
    """
    eval_df, context_df = benchmark_pools(benchmark, config)  # cached: callers only read them
    options = config.prompt_options(projectors)
    index = evaluate.ContextIndex(context_df, evaluate.benchmark_kind(benchmark))
    if split == "eval":
        queries = eval_df
    elif split == "train":
        queries = context_df if n is None or n <= len(context_df) else training_rows(benchmark, config)
    else:
        raise ValueError(f"split must be 'eval' or 'train', got {split!r}")
    if n is not None and n < len(queries):
        queries = queries.sample(n=n, random_state=seed)
    prompts = []
    for _, row in queries.iterrows():
        shots = index.pool.iloc[evaluate.retrieve_examples(index, row, config.n_shots)]
        prompts.append(evaluate.build_prompt(benchmark, row, shots, tokenizer, options))
    return prompts


def prompt_batches(prompts: list, tokenizer, projectors: dict, batch_size: int, seed: int = 0) -> list:
    """Collate prompts into ``evaluate.PromptBatch`` es of similar length (``scoring.length_batches``),
    in an order shuffled by ``seed``; each entity's block as long as its projector emits
    (``scoring.common_n_tokens``: one length for fixed-size projectors, each entity's own for a
    ``RawEncoder`` such as Prot2Text-V2's ESM-2, residues + 2).

    Grouping by length keeps padding, which costs FLOPs and does nothing, to a few percent of the tokens:
    prompts of one benchmark have similar lengths, and mixing benchmarks in random pairs padded a quarter.
    """
    n_tokens = common_n_tokens(projectors)
    lengths = [len(prompt_token_ids(p, tokenizer, n_tokens, 0, projectors)[0]) for p in prompts]
    return [evaluate.collate([prompts[i] for i in rows], tokenizer, n_tokens, projectors=projectors)
            for rows in length_batches(lengths, batch_size, seed)]


def trainable_copy(base, template: Adapter):
    """A PEFT copy of the base LLM with ``template``'s LoRA config; every weight frozen.

    The methods substitute their own LoRA tensors into it (:func:`lora_state_swapped`).
    """
    model = attach_specialist(base, template)
    model.requires_grad_(False)
    return model


def label_entropy_objective(model, batches: Iterable, projectors: dict):
    """AdaMerging's objective ``state -> mean entropy of softmax(label_logits)`` on the next batch (cycled).

    ``label_logits`` gives the two answers' log-likelihoods ``[B, 2]``; their softmax is the
    model's answer distribution over the two labels.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("AdaMerging needs at least one batch of unlabeled prompts")
    position = {"i": 0}

    def objective(state: LoraState) -> torch.Tensor:
        batch = batches[position["i"] % len(batches)]
        position["i"] += 1
        with lora_state_swapped(model, state):
            return mean_entropy(evaluate.label_logits(model, batch, projectors))

    return objective


def answer_nll_loss(model, projectors: dict):
    """Avg+FT's loss ``(state, batch) -> mean NLL of the gold answer continuation``.

    The gold answer is ``"Final answer: <label>"``; its log-likelihood is ``label_logits``' column
    ``y`` -- the supervised fine-tuning loss restricted to the answer tokens.
    """
    def loss(state: LoraState, batch) -> torch.Tensor:
        if (batch.y < 0).any():
            raise ValueError("fine-tuning batches need gold labels (y >= 0)")
        with lora_state_swapped(model, state):
            scores = evaluate.label_logits(model, batch, projectors)
        return -scores.gather(1, batch.y[:, None].to(scores.device)).mean()

    return loss


def adamerging_extras(base, specialists: dict, benchmarks: list[str], n_per_benchmark: int, batch_size: int,
                      config, seed: int = 0) -> dict:
    """``{"entropy_objective": ...}`` over unlabeled evaluation prompts of ``benchmarks``, mixed and shuffled."""
    projectors = projectors_of(specialists)
    prompts = []
    for benchmark in benchmarks:
        prompts += benchmark_prompts(benchmark, base.tokenizer, projectors, config, "eval", n_per_benchmark, seed)
    model = trainable_copy(base, next(iter(specialists.values())).adapter)
    batches = prompt_batches(prompts, base.tokenizer, projectors, batch_size, seed)
    return {"entropy_objective": label_entropy_objective(model, batches, projectors),
            "adamerging_prompts": len(prompts)}


def finetune_extras(base, specialists: dict, benchmark: str, n_examples: int, batch_size: int,
                    config, seed: int = 0) -> dict:
    """``{"train_loss", "train_batches", "benchmark"}`` for Avg+FT on one benchmark."""
    projectors = projectors_of(specialists)
    prompts = benchmark_prompts(benchmark, base.tokenizer, projectors, config, "train", n_examples, seed)
    model = trainable_copy(base, next(iter(specialists.values())).adapter)
    return {"train_loss": answer_nll_loss(model, projectors),
            "train_batches": prompt_batches(prompts, base.tokenizer, projectors, batch_size, seed),
            "benchmark": benchmark}


def compatibility_table(base, specialists: dict, benchmarks: list[str], n_prompts: int, config, seed: int = 0,
                        module_suffix: str = "mlp.down_proj") -> list[dict]:
    """Graft's activation compatibility (Eqs. 9-14) of each specialist with each benchmark.

    Each specialist sees a benchmark's evaluation prompts as it is evaluated (its own modality as
    tokens, the others as text); activations are the outputs of the modules whose name ends with
    ``module_suffix`` (one per block, to keep memory small). Returns one row per pair.
    """
    rows = []
    for modality, spec in specialists.items():
        projectors = {modality: spec.projector} if getattr(spec, "projector", None) is not None else {}
        model = attach_specialist(base, spec.adapter)
        for benchmark in benchmarks:
            prompts = benchmark_prompts(benchmark, base.tokenizer, projectors, config, "eval", n_prompts, seed)
            batches = prompt_batches(prompts, base.tokenizer, projectors, len(prompts), seed)
            captured: dict = {}
            for batch in batches:
                with torch.no_grad():
                    out = module_outputs(model, lambda m=model, b=batch: _prompt_forward(m, b, projectors),
                                         lambda name: name.endswith(module_suffix))
                real = batch.attention_mask.bool()
                for name, acts in out.items():
                    # one sample per prompt, its real (unpadded) positions only
                    captured.setdefault(name, []).extend(acts[b][real[b]] for b in range(acts.shape[0]))
            score = compatibility_score(captured)
            rows.append({"specialist": modality, "benchmark": benchmark, "compatibility": score["compatibility"],
                         "n_prompts": len(prompts)})
        del model
    return rows


def _prompt_forward(model, batch, projectors: dict):
    """One forward pass over a ``PromptBatch``'s prompts (modality tokens spliced in, as the evaluation does)."""
    embedding = model.get_input_embeddings()
    embeds = embedding(batch.input_ids)
    embeds = evaluate.splice_embeddings(embeds, batch.slots, entity_tokens(batch, projectors), batch.lengths)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    return model(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=positions, logits_to_keep=1)


