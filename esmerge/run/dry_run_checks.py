"""The checks of a paper-scale dry run (``esmerge.run.dry_run``): files, shapes, encoders, tokenizer.

Each reads only what is small: the base's ``config.json`` and tokenizer, the safetensors *headers*
(names, shapes, dtypes) of the base's shards and of every specialist's files, and the cards. The
base is built on the ``meta`` device (no weight memory). Each check appends to a ``Plan``: a
blocking line to ``problems``, what it verified to ``checked``, what it left to the real run to
``not_checked``.

* files: the base folder (or its hub-cache snapshot) with config, tokenizer and every shard; each
  specialist folder with its card, adapter and encoder files; each card's base-weights hash against
  the base's (when that hash is cheap: hub-cache blobs, a memoised hash, or a small checkpoint);
* shapes: the shards hold every tensor the config needs, at its shape; every LoRA factor fits its
  module (``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``), with the shared r and alpha;
* encoders: each card's encoder is one esmerge can build (Prot2Text-V2's is built on ``meta`` and
  its tensors checked; Mol-LLaMA's is an optional extra, blocking only where it is needed);
* tokenizer: chat template, end-of-turn token, every special token the template writes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from esmerge.cache import cache_dir, content_key
from esmerge.errors import EsmergeError
from esmerge.run.dry_run_plan import (
    GIB,
    Plan,
    human,
)
from esmerge.specialists import encoders
from esmerge.specialists.base_llm import (
    LORA_ALPHA,
    LORA_RANK,
    TOKENIZER_FILES,
    checkpoint_sha256,
    end_of_turn_id,
    load_tokenizer,
    same_base_name,
)
from esmerge.specialists.load import read_card
from esmerge.specialists.per_scale import PAPER_SOURCES
from esmerge.specialists.raw_encoder import UnavailableEncoder

SPECIALIST_FILES = ("card.json", "adapter_config.json", "adapter_model.safetensors")
ENCODER_FILES = {"prot2text": ("projector.safetensors", "encoder.safetensors"), "mol-llama": ("projector.safetensors",)}
HASH_LIMIT = GIB  # a local checkpoint up to this size is hashed by the dry run; a larger one only when memoised
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight")
SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>")


# --------------------------------------------------------------------------- reading without loading
def header_shapes(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``name -> (shape, dtype)`` of every tensor in a safetensors file, from its header only."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def header_size(headers: dict) -> tuple[int, int]:
    """``(bytes, parameters)`` of the tensors of ``header_shapes``."""
    counts = [(int(torch.Size(s).numel()), DTYPE_BYTES.get(d, 4)) for s, d in headers.values()]
    return sum(n * b for n, b in counts), sum(n for n, _ in counts)


def local_base_folder(model_id: str) -> Path | None:
    """``model_id`` as a local folder, or its snapshot in the hub cache (never downloads); None if neither."""
    if Path(model_id).is_dir():
        return Path(model_id)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), a malformed id, huggingface_hub missing
        return None


def meta_model(folder: Path):
    """The base's ``AutoModelForCausalLM`` built from its ``config.json`` on the ``meta`` device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _shards(folder: Path, plan: Plan) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        named = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in named if not (folder / n).is_file()]
        if missing:
            plan.problems.append(f"base {folder}: {len(missing)} of {len(named)} shards in its index are missing "
                                 f"({', '.join(missing[:2])}); download them again")
        return [folder / n for n in named if n not in missing]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        plan.problems.append(f"base {folder}: no *.safetensors weights; download the checkpoint's safetensors files")
    return shards


def _check_base_tensors(model, shards: list[Path], plan: Plan) -> None:
    found = {}
    for shard in shards:
        found |= header_shapes(shard)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in found]
    wrong = [f"{k} {list(found[k][0])} (config: {list(v)})" for k, v in expected.items()
             if k in found and found[k][0] != v]
    if shards and (missing or wrong):
        plan.problems.append(f"base weights do not fit its config.json: {len(missing)} tensors missing "
                             f"{missing[:2]}, {len(wrong)} of another shape {wrong[:2]}")
    elif shards:
        plan.checked.append(f"base: {len(expected)} tensors in {len(shards)} shard(s) fit config.json (headers)")


def cheap_base_sha256(folder: Path, limit: int = HASH_LIMIT) -> tuple[str | None, str]:
    """``(checkpoint_sha256(folder), how)`` when it is cheap (hub-cache blobs are named by their hash,
    memoised files, or at most ``limit`` bytes to read), else ``(None, why not)``."""
    files = sorted(folder.glob("*.safetensors"))
    todo = 0
    for file in files:
        real = file.resolve()
        named = real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name)
        stat = real.stat()
        if not named and not (cache_dir() / "file-sha256" / content_key(str(real), stat.st_size,
                                                                          stat.st_mtime_ns)).exists():
            todo += stat.st_size
    if todo > limit:
        return None, f"base weights hash (would read {human(todo, 'B')}; the real run hashes them and checks the cards)"
    return checkpoint_sha256(folder), f"read {human(todo, 'B')}" if todo else "from hub-cache names / memo"


# --------------------------------------------------------------------------- the base
def check_base(model_id: str, plan: Plan, hash_limit: int = HASH_LIMIT):
    """Files, meta model, tensor headers and tokenizer of the base; ``(meta model, tokenizer, sha256)``
    with ``None`` for what could not be had (each reason is one of ``plan.problems``)."""
    folder = local_base_folder(model_id)
    if folder is None:
        plan.problems.append(f"base {model_id!r}: not a local folder and not in the hub cache; download it "
                             "(huggingface-cli download, accepted LLaMA-3.1 licence) or set ESMERGE_PAPER_BASE")
        return None, None, None
    if not (folder / "config.json").is_file():
        plan.problems.append(f"base {folder}: config.json is missing; copy the checkpoint's config.json into it")
        return None, None, None
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        plan.problems.append(f"base {folder}: no tokenizer ({', '.join(TOKENIZER_FILES)} all missing); "
                             "copy the base's tokenizer files into it")
    model = meta_model(folder)
    plan.meta_model, plan.max_positions = model, getattr(model.config, "max_position_embeddings", None)
    plan.params = sum(p.numel() for p in model.parameters())
    plan.checked.append(f"base folder {folder}: config.json, tokenizer, safetensors present")
    _check_base_tensors(model, _shards(folder, plan), plan)
    digest, how = cheap_base_sha256(folder, hash_limit)
    (plan.checked if digest else plan.not_checked).append(f"base weights sha256 {digest[:12]}... ({how})"
                                                          if digest else how)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(str(folder))
    except EsmergeError as err:
        plan.problems.append(str(err))
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config.vocab_size, plan)
    return model, tokenizer, digest


def check_tokenizer(tokenizer, vocab_size: int, plan: Plan) -> None:
    """The chat template, the end-of-turn token, every special token the template writes (each must be
    one token), and a vocabulary no larger than the embedding table."""
    if not getattr(tokenizer, "chat_template", None):
        plan.problems.append("tokenizer: no chat template; use the Instruct model's tokenizer files")
        return
    try:
        eot = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
    except EsmergeError as err:
        plan.problems.append(f"tokenizer: {err}")
        eot = None
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False) + tokenizer.apply_chat_template(
        chat[:2], tokenize=False, add_generation_prompt=True)
    specials = list(dict.fromkeys(SPECIAL.findall(text)))
    for token in specials:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            plan.problems.append(f"tokenizer: lacks the special token {token} that its chat template writes (it "
                                 f"splits into {len(ids)} tokens); use the base's own tokenizer files")
    if len(tokenizer) > vocab_size:
        plan.problems.append(f"tokenizer: {len(tokenizer)} tokens but the base embeds {vocab_size}")
    pad = "pads with the end-of-turn token" if tokenizer.pad_token is None else f"pad {tokenizer.pad_token}"
    plan.checked.append(f"tokenizer: chat template writes {', '.join(specials) or 'no special token'}; "
                        f"end of turn {eot}; {pad}; modality blocks take reserved slots, no placeholder token")


# --------------------------------------------------------------------------- specialists
def check_lora(headers: dict, model, rank: int) -> list[str]:
    """One line per LoRA tensor that does not fit ``model`` (a meta model): not a factor, no such module,
    a shape other than ``lora_A [rank, in]`` / ``lora_B [out, rank]``, or not floating point."""
    bad = []
    for key, (shape, dtype) in sorted(headers.items()):
        match = LORA_KEY.fullmatch(key)
        if not match:
            bad.append(f"{key}: not a LoRA factor")
            continue
        try:
            module = model.get_submodule(match[1])
        except AttributeError:
            bad.append(f"{key}: the base has no module {match[1]}")
            continue
        want = (rank, module.in_features) if match[2] == "A" else (module.out_features, rank)
        if shape != want:
            bad.append(f"{key}: {list(shape)}, the base's {match[1]} needs {list(want)}")
        elif dtype not in ("F32", "F16", "BF16", "F64"):
            bad.append(f"{key}: {dtype}, not floating point")
    return bad


def _check_encoder(modality: str, folder: Path, entry: dict, hidden: int | None, plan: Plan,
                   needed: bool) -> tuple[int, int]:
    """Problems of a card's encoder entry; returns the encoder's ``(bytes, parameters)``."""
    kind = entry.get("kind")
    if kind not in encoders.ENCODER_BUILDERS:
        plan.problems.append(f"{modality} specialist: unknown encoder kind {kind!r} in {folder / 'card.json'}; "
                             f"known: {', '.join(sorted(encoders.ENCODER_BUILDERS))}")
        return 0, 0
    heads = {n: header_shapes(folder / n) if (folder / n).is_file() else {}
             for n in ("projector.safetensors", "encoder.safetensors")}
    size = tuple(map(sum, zip(*(header_size(h) for h in heads.values()))))
    builder = encoders.ENCODER_BUILDERS[kind]
    if kind == "prot2text" and builder.__module__ == encoders.__name__:
        adapter = entry.get("adapter_config") or {}
        try:
            with torch.device("meta"):
                module = encoders.Prot2TextEncoder(entry["esm_config"], adapter["input_dim"],
                                                   adapter["intermediate_dim"], adapter["output_dim"])
        except (KeyError, TypeError, ValueError) as err:
            plan.problems.append(f"{modality} specialist: encoder entry of {folder / 'card.json'} cannot build "
                                 f"ESM-2 + adapter ({type(err).__name__}: {err}); reconvert with esmerge convert")
            return size
        have = heads["encoder.safetensors"] | heads["projector.safetensors"]
        bad = [k for k, v in module.state_dict().items() if not k.endswith("position_ids")
               and (k not in have or have[k][0] != tuple(v.shape))]
        if bad or adapter["output_dim"] != hidden:
            plan.problems.append(f"{modality} specialist: encoder tensors do not fit its card ({len(bad)} missing or "
                                 f"of another shape, e.g. {bad[:1]}; output {adapter['output_dim']}, base {hidden})")
        else:
            plan.checked.append(f"{modality} encoder: Prot2Text-V2 (ESM-2 + adapter) built on meta, "
                                f"{len(module.state_dict())} tensors fit ({human(size[0], 'B')})")
        return size
    if kind == "mol-llama" and builder.__module__ == encoders.__name__:
        _check_mol_llama_encoder(modality, folder, entry, heads, plan, needed)
        return size
    try:
        with torch.device("meta"):
            built = builder(entry, {}, {}, folder)
    except Exception as err:  # a registered builder that needs its tensors: not built here
        plan.not_checked.append(f"{modality} encoder ({kind}): its registered builder needs the weights "
                                f"({type(err).__name__}); built by the real run")
        return size
    if isinstance(built, UnavailableEncoder):
        line = f"{modality} specialist: its {kind} encoder cannot be built here ({built.message})"
        (plan.problems if needed else plan.notes).append(line if needed else line + "; not needed by this run")
    else:
        plan.checked.append(f"{modality} encoder: {kind} built by its registered builder")
    return size


def _check_mol_llama_encoder(modality: str, folder: Path, entry: dict, heads: dict, plan: Plan, needed: bool) -> None:
    """Mol-LLaMA's encoder without building it: its trained tensors in projector.safetensors (headers), and
    its frozen graph encoders in encoder.safetensors or already in the hub cache (nothing is downloaded)."""
    from esmerge.specialists.mol_llama import weights
    from esmerge.specialists.mol_llama.encoder import TRAINED_KEYS

    problems = [f"no tensor {k} in projector.safetensors; reconvert with `esmerge convert mol-llama`"
                for k in TRAINED_KEYS if k not in heads["projector.safetensors"]][:1]
    if any(k.startswith("encoder.graph_encoder.") for k in heads["encoder.safetensors"]):
        where = "in encoder.safetensors"
    else:
        files = entry.get("graph_encoder_files") or weights.upstream_files(entry.get("config"))
        absent = [f for f in files.values() if not _in_hub_cache(f["repo_id"], f["filename"])]
        where = "in the hub cache"
        if absent:
            fetch = " and ".join(f"`huggingface-cli download {f['repo_id']} {f['filename']}`" for f in absent)
            problems.append(f"its frozen graph encoders are not in the hub cache; fetch them with {fetch}")
    if problems:
        line = f"{modality} specialist: Mol-LLaMA's encoder cannot be built from {folder}: {problems[0]}"
        (plan.problems if needed else plan.notes).append(line if needed else line + "; not needed by this run")
    else:
        plan.checked.append(f"{modality} encoder: Mol-LLaMA (MoleculeSTM + Uni-Mol + Q-Former) trained tensors "
                            f"present, graph encoders {where}")


def check_specialists(root: Path, model, base_name: str, base_sha: str | None, plan: Plan,
                      encoders_needed: set[str]) -> dict[str, tuple[int, int]]:
    """Check each paper specialist folder under ``root``; returns ``modality -> (encoder bytes, parameters)``."""
    sizes = {}
    for modality in encoders.MODALITIES:
        folder = root / modality
        how = f"make it with `{PAPER_SOURCES[modality].format(folder=folder)}`"
        if not folder.is_dir():
            plan.problems.append(f"{modality} specialist: {folder} is missing; {how}")
            continue
        missing = [n for n in SPECIALIST_FILES if not (folder / n).is_file()]
        if missing:
            plan.problems.append(f"{modality} specialist: {folder} lacks {', '.join(missing)}; {how}")
            continue
        try:
            card = read_card(folder)
            config = json.loads((folder / "adapter_config.json").read_text())
        except (EsmergeError, ValueError) as err:
            plan.problems.append(f"{modality} specialist: {err}")
            continue
        encoder = card.get("encoder") or {}
        lacking = [n for n in ENCODER_FILES.get(encoder.get("kind"), ()) if not (folder / n).is_file()]
        if lacking:
            plan.problems.append(f"{modality} specialist: {folder} lacks {', '.join(lacking)} (its "
                                 f"{encoder['kind']} encoder); {how}")
            continue
        recorded = card.get("base_weights_sha256")
        if recorded and base_sha and recorded != base_sha:
            plan.problems.append(f"{modality} specialist: trained on base weights {recorded[:12]}..., the base has "
                                 f"{base_sha[:12]}...; convert it against this base")
        elif not recorded and config.get("base_model_name_or_path") and not same_base_name(
                config["base_model_name_or_path"], base_name):
            plan.problems.append(f"{modality} specialist: its adapter names base {config['base_model_name_or_path']!r}"
                                 f" and its card records no base hash; the base is {base_name}")
        elif recorded and not base_sha:
            plan.not_checked.append(f"{modality} card's base hash {recorded[:12]}... (base hash not computed)")
        if (config.get("r"), config.get("lora_alpha")) != (LORA_RANK, LORA_ALPHA):
            plan.problems.append(f"{modality} specialist: LoRA r={config.get('r')}, alpha={config.get('lora_alpha')}; "
                                 f"the shared configuration is r={LORA_RANK}, alpha={LORA_ALPHA}")
        if model is not None:
            bad = check_lora(header_shapes(folder / "adapter_model.safetensors"), model, config.get("r") or LORA_RANK)
            if bad:
                plan.problems.append(f"{modality} specialist: {len(bad)} LoRA tensor(s) do not fit the base, "
                                     f"e.g. {bad[0]}")
        sizes[modality] = _check_encoder(modality, folder, encoder, getattr(getattr(model, "config", None),
                                                                            "hidden_size", None),
                                         plan, modality in encoders_needed) if encoder else (0, 0)
        plan.checked.append(f"{modality} specialist {folder}: files, card, base hash, LoRA r={config.get('r')} "
                            "shapes (headers)" + ("" if encoder else ", text encoder (no weights)"))
    return sizes


def check_merged(folder: Path, model, plan: Plan) -> None:
    """A merged-model folder (``esmerge merge --out``): its adapter's LoRA factors fit the base (headers)."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        bad = check_lora(header_shapes(folder / "adapter_model.safetensors"), model, config.get("r") or LORA_RANK)
    except (OSError, ValueError) as err:
        plan.problems.append(f"merged model {folder}: unreadable adapter ({type(err).__name__}: {err}); merge again")
        return
    if bad:
        plan.problems.append(f"merged model {folder}: {len(bad)} LoRA tensor(s) do not fit the base, e.g. {bad[0]}")
    else:
        plan.checked.append(f"merged model {folder}: LoRA r={config.get('r')} shapes (headers)")


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, filename), str)
