"""Where Mol-LLaMA's frozen graph encoders come from when a converted specialist does not carry them.

Mol-LLaMA's hub release saves only what it trained (blending module, Q-Former, ``llm_proj``, LoRA); its
encoder loads the frozen ones from the files its config names (``utils/configuration_mol_llama.py``):
Uni-Mol's ``mol_pre_no_h_220816.pt`` and ``mol.dict.txt`` from ``dptech/Uni-Mol-Models``, MoleculeSTM's
``demo/demo_checkpoints_Graph/molecule_model.pth`` from ``chao1224/MoleculeSTM``. Here they are resolved
the same way, through ``huggingface_hub.hf_hub_download`` into its cache, read with
``torch.load(weights_only=True)`` (tensors only, no code), and checked against the sha256 the card
records (``encoder.graph_encoder_files``, written by the converter when the files were at hand).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from esmerge.specialists.mol_llama.featurize import read_dictionary

# role -> (graph_encoder_config section, its repo key, its filename key, upstream's default repo and file)
UPSTREAM_FILES = {
    "unimol_weights": ("unimol_config", "repo_id", "weights_filename", "dptech/Uni-Mol-Models",
                       "mol_pre_no_h_220816.pt"),
    "unimol_dictionary": ("unimol_config", "repo_id", "dictionary_filename", "dptech/Uni-Mol-Models", "mol.dict.txt"),
    "moleculestm_weights": ("moleculestm_config", "repo_id", "filename", "chao1224/MoleculeSTM",
                            "demo/demo_checkpoints_Graph/molecule_model.pth"),
}
PREFIX = {"unimol_weights": "encoder.graph_encoder.unimol.",
          "moleculestm_weights": "encoder.graph_encoder.moleculestm."}


class GraphWeightsError(Exception):
    """A graph-encoder file cannot be had or does not match the card; the message is one line."""


def upstream_files(config: dict | None) -> dict[str, dict]:
    """role -> ``{"repo_id", "filename", "sha256": None}`` as the checkpoint's ``graph_encoder_config`` names them
    (upstream's defaults where it names none).

    >>> upstream_files({})["unimol_weights"]
    {'repo_id': 'dptech/Uni-Mol-Models', 'filename': 'mol_pre_no_h_220816.pt', 'sha256': None}
    """
    def section_of(parent, name):  # a Lightning file's pickled configs may stand in as non-dicts: use defaults
        value = parent.get(name) if isinstance(parent, dict) else None
        return value if isinstance(value, dict) else {}

    graph = section_of(config, "graph_encoder_config")
    out = {}
    for role, (section, repo_key, file_key, repo, filename) in UPSTREAM_FILES.items():
        named = section_of(graph, section)
        out[role] = {"repo_id": named.get(repo_key, repo), "filename": named.get(file_key, filename), "sha256": None}
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def with_cached_sha256(files: dict[str, dict]) -> dict[str, dict]:
    """``files`` with the sha256 of each one already in the hub cache (no download; the converter's record)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return files
    out = {}
    for role, f in files.items():
        cached = try_to_load_from_cache(f["repo_id"], f["filename"])
        out[role] = f | {"sha256": file_sha256(Path(cached)) if isinstance(cached, str) else f.get("sha256")}
    return out


def download(repo_id: str, filename: str) -> Path:
    """``hf_hub_download`` (the hub cache first; honours ``HF_HUB_OFFLINE``); ``GraphWeightsError`` if it fails."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise GraphWeightsError("huggingface_hub is not installed: pip install 'esmerge[paper]'") from None
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as err:  # offline, not in the cache, no such file, no network: the same advice for all
        raise GraphWeightsError(f"{repo_id}/{filename} ({type(err).__name__})") from None


def resolve(files: dict[str, dict]) -> dict[str, tuple[Path, str]]:
    """role -> (local path, sha256) for each upstream file. Refuses, in one line, the files that cannot be
    had (all of them, with the commands that fetch them) or whose sha256 is not the recorded one."""
    out, failed = {}, {}
    for role in sorted(files, key=list(UPSTREAM_FILES).index):
        f = files[role]
        try:
            path = download(f["repo_id"], f["filename"])
        except GraphWeightsError as err:
            failed.setdefault(f["repo_id"], []).append((f["filename"], str(err)))
            continue
        digest = file_sha256(path)
        if f.get("sha256") and f["sha256"] != digest:
            raise GraphWeightsError(f"{path}: sha256 {digest[:12]}... is not the {f['sha256'][:12]}... the card "
                                    f"records for {f['repo_id']}/{f['filename']}; delete it from the hub cache and "
                                    "fetch again")
        out[role] = (path, digest)
    if failed:
        what = ", ".join(reason for entries in failed.values() for _, reason in entries)
        fetch = " and ".join(f"`huggingface-cli download {repo} {' '.join(name for name, _ in entries)}`"
                             for repo, entries in failed.items())
        raise GraphWeightsError(f"cannot get {what}; fetch them with {fetch}")
    return out


def read_graph_tensors(paths: dict[str, tuple[Path, str]]) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The resolved files as upstream-keyed tensors (``encoder.graph_encoder.{unimol,moleculestm}.*``) and
    Uni-Mol's dictionary. Uni-Mol's checkpoint keeps its tensors under ``"model"``; its pretraining heads
    (``lm_head``, ``pair2coord_proj``, ``dist_head``) are dropped by the loader as upstream's non-strict load does."""
    tensors = {}
    for role, prefix in PREFIX.items():
        path = paths[role][0]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise GraphWeightsError(f"{path}: not a tensor checkpoint torch can read safely ({type(err).__name__}); "
                                    "delete it from the hub cache and fetch again") from None
        state = state.get("model", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise GraphWeightsError(f"{path}: holds {type(state).__name__}, not a state dict")
        tensors |= {prefix + k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, read_dictionary(paths["unimol_dictionary"][0])
