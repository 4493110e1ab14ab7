"""Which three specialists each scale merges (paper §5.1): shipped, trained on demand, or converted.

At ``cpu`` scale they are the shipped sets in ``data_manifest/specialists/<shipped_set>/``, every
file checked against its sha256 in ``data_manifest/specialists.yaml`` (``verify_shipped``;
``write_manifest`` records a retrained set); at ``smoke`` scale tiny ones trained on demand on the
hand-made examples and cached under ``cache_dir()``; at ``paper`` scale the converted published
checkpoints (the cell one a substitute trained by ``esmerge train``) in ``paper_specialists_dir()``.
Reading, writing and training one specialist is ``esmerge.specialists.load``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from esmerge.cache import cache_dir, content_key, file_sha256, key_lock, keyed_on_device
from esmerge.errors import UsageError, check_seed
from esmerge.paths import REPO_ROOT
from esmerge.scales import ScaleConfig
from esmerge.specialists.base_llm import BaseModel
from esmerge.specialists.captions import CODE_VERSION, MODALITIES, SpecialistError, load_examples
from esmerge.specialists.load import (
    SHIPPED_DIR,
    Specialist,
    _train_into,
    is_finished,
    load_specialist,
    read_card,
    shipped_set,
)

SHIPPED_MANIFEST = REPO_ROOT / "data_manifest" / "specialists.yaml"
SHIPPED_FILES = ("adapter_config.json", "adapter_model.safetensors", "projector.safetensors", "card.json")
PAPER_SPECIALISTS_ENV = "ESMERGE_PAPER_SPECIALISTS"


def shipped_manifest() -> dict:
    if not SHIPPED_MANIFEST.exists():
        raise SpecialistError(f"{SHIPPED_MANIFEST} is missing: the shipped specialists cannot be verified")
    return yaml.safe_load(SHIPPED_MANIFEST.read_text())


def verify_shipped(scale: str = "cpu", seed: int = 0) -> dict[str, Path]:
    """Check every shipped specialist file of ``scale`` at training ``seed`` against its sha256 in
    ``specialists.yaml``."""
    name = shipped_set(scale, seed)
    manifest = shipped_manifest().get(name)
    if not manifest:
        raise SpecialistError(f"{SHIPPED_MANIFEST} lists no {name!r} specialists")
    dirs = {}
    for modality in MODALITIES:
        entry = manifest["specialists"][modality]
        folder = REPO_ROOT / entry["path"]
        for name, expected in entry["sha256"].items():
            file = folder / name
            if not file.exists():
                raise SpecialistError(f"{file} is missing; restore it with "
                                      f"`git checkout -- {file.relative_to(REPO_ROOT)}` "
                                      f"or retrain with `esmerge train --scale {scale} --modality {modality} "
                                      f"--seed {seed}`")
            actual = file_sha256(file)
            if actual != expected:
                raise SpecialistError(f"{file}: sha256 {actual[:16]}... does not match {SHIPPED_MANIFEST.name} "
                                      f"({expected[:16]}...); the file is corrupt or was retrained without "
                                      "updating the manifest (`esmerge train --write-manifest`)")
        dirs[modality] = folder
    return dirs


def write_manifest(scale: str = "cpu", seed: int = 0) -> Path:
    """(Re)write the section of ``specialists.yaml`` of ``scale`` at training ``seed`` (``shipped_set``)
    from the shipped directories."""
    data = yaml.safe_load(SHIPPED_MANIFEST.read_text()) if SHIPPED_MANIFEST.exists() else {}
    name = shipped_set(scale, seed)
    section = {"specialists": {}}
    for modality in MODALITIES:
        folder = SHIPPED_DIR / name / modality
        if not is_finished(folder):
            raise SpecialistError(f"{folder} holds no finished specialist")
        card = read_card(folder)
        section["base_name"], section["base_weights_sha256"] = card["base_name"], card["base_weights_sha256"]
        section["specialists"][modality] = {
            "path": str(folder.relative_to(REPO_ROOT)),
            "steps": card["steps"], "batch_size": card["batch_size"], "lr": card["lr"], "seed": card["seed"],
            "sha256": {f: file_sha256(folder / f) for f in SHIPPED_FILES if (folder / f).exists()},
        }
    if any(entry["seed"] != seed for entry in section["specialists"].values()):
        raise SpecialistError(f"{SHIPPED_DIR / name} holds specialists trained at another seed than {seed}")
    data[name] = section
    SHIPPED_MANIFEST.write_text(yaml.safe_dump(data, sort_keys=False))
    return SHIPPED_MANIFEST


def paper_specialists_dir(root=None) -> Path:
    """Where the converted paper-scale specialists live: ``root``, else ``$ESMERGE_PAPER_SPECIALISTS``,
    else ``data_manifest/specialists/paper`` (one folder per modality)."""
    return Path(root or os.environ.get(PAPER_SPECIALISTS_ENV) or SHIPPED_DIR / "paper")


# How each paper-scale specialist folder is made (the published checkpoints; the cell one is a substitute).
PAPER_SOURCES = {
    "molecule": "esmerge convert mol-llama DongkiKim/Mol-Llama-3.1-8B-Instruct {folder}",
    "protein": "esmerge convert prot2text xiao-fei/Prot2Text-V2-11B-Instruct-hf {folder} "
               "--base meta-llama/Llama-3.1-8B-Instruct",
    "cell": "esmerge train --scale paper --modality cell --out {folder}",
}


def _paper_folder(root: Path, modality: str) -> Path:
    folder = root / modality
    if not is_finished(folder):
        raise SpecialistError(f"{folder} holds no converted {modality} specialist; make it with "
                              f"`{PAPER_SOURCES[modality].format(folder=folder)}` (or point "
                              f"{PAPER_SPECIALISTS_ENV} at the folder holding molecule/, protein/, cell/)")
    return folder


def load_specialists(config: ScaleConfig, base: BaseModel, root=None, seed: int = 0) -> dict[str, Specialist]:
    """The three specialists of the scale ``config`` trained at ``seed``, ordered molecule, protein, cell.

    * ``cpu``: the shipped ones in ``data_manifest/specialists/<shipped_set(scale, seed)>/<modality>/``
      (seed 0: ``cpu/``; the seed replicates: ``cpu-seed1/``, ...), after checking their sha256
      against ``data_manifest/specialists.yaml``.
    * ``smoke``: tiny specialists on the hand-made examples, trained in seconds (the smoke
      ``config.train``) and cached under ``cache_dir()`` keyed by the base weights, recipe
      and code version; a second process waits for the first and reuses its specialists.
    * ``paper``: the converted ones (``esmerge convert``; the cell one trained by ``esmerge train
      --scale paper --modality cell``, a substitute for Cell-o1) in ``<root>/<modality>/``, ``root``
      from ``paper_specialists_dir``. Each card's ``encoder`` entry builds its modality encoder
      (``encoders.build_encoder``): ESM-2 + adapter for proteins (blocks of length + 2),
      Mol-LLaMA's own encoder for molecules when that optional extra is installed.
    """
    check_seed(seed, "specialist seed")
    scale = config.name
    if scale == "cpu":
        dirs = verify_shipped("cpu", seed)
        return {m: load_specialist(dirs[m], base) for m in MODALITIES}
    if scale == "smoke":
        recipe = replace(config.train, seed=seed) if seed else config.train
        key = content_key(keyed_on_device(base.weights_sha256, base.model), asdict(recipe), CODE_VERSION)
        root = cache_dir() / "specialists" / "smoke" / key
        specs = {}
        for modality in MODALITIES:
            folder = root / modality
            with key_lock(folder):
                if is_finished(folder):
                    specs[modality] = load_specialist(folder, base)
                    continue
                examples, info = load_examples(modality, "train", config)
                settings = recipe.settings_for(modality) | dict(resume=True, checkpoint_every=25, stop_after=None,
                                                                progress=False)
                specs[modality] = _train_into(base, modality, folder, settings, False, examples, info, None)
        return specs
    if scale == "paper":
        if seed:
            raise UsageError(f"specialist seed {seed}: the paper scale has one set of specialists, the published "
                             "ones (seed 0)")
        root = paper_specialists_dir(root)
        return {m: load_specialist(_paper_folder(root, m), base) for m in MODALITIES}
    raise AssertionError(f"unreachable: scale {scale!r}")
