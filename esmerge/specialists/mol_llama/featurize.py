"""SMILES -> the two graphs Mol-LLaMA's encoder reads: a 2D bond graph and a 3D heavy-atom conformer.

2D (MoleculeSTM's GIN, OGB-style features as Mol-LLaMA's ``data_provider/ogb_features.py`` and
``mol_dataset.smiles2graph``): per atom 9 category indices (atomic number, chirality tag, total degree,
formal charge, total H count, radical electrons, hybridisation, aromatic, in ring); per bond 3 (type,
stereo, conjugated), each bond listed in both directions. A value outside a list takes its last index.

3D (Uni-Mol, as Mol-LLaMA's ``mol_llama.gen_3d_conformation_from_rdkit`` + ``get_unimol_data``): one
RDKit ETKDG conformer of the molecule with hydrogens, MMFF-optimised, hydrogens then removed; the
heavy atoms as Uni-Mol dictionary ids between ``[CLS]`` and ``[SEP]``, coordinates centred, the two
specials at the origin, pairwise distances and pair types ``a * len(dictionary) + b``. Upstream
embeds without a seed (so its tokens vary run to run); here the seed is fixed so blocks are
reproducible. RDKit is imported lazily: without it ``EncoderUnavailableError`` says what to install.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from esmerge.errors import InputError

# The category lists are the OGB feature vocabulary MoleculeSTM was trained on; each ends in a catch-all.
ATOM_CATEGORIES = (
    (*range(1, 119), "misc"),                                              # atomic number
    ("CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW", "CHI_OTHER"),
    (*range(11), "misc"),                                                  # total degree
    (*range(-5, 6), "misc"),                                               # formal charge
    (*range(9), "misc"),                                                   # total hydrogens
    (*range(5), "misc"),                                                   # radical electrons
    ("SP", "SP2", "SP3", "SP3D", "SP3D2", "misc"),                         # hybridisation
    (False, True),                                                         # aromatic
    (False, True),                                                         # in a ring
)
BOND_CATEGORIES = (
    ("SINGLE", "DOUBLE", "TRIPLE", "AROMATIC", "misc"),
    ("STEREONONE", "STEREOZ", "STEREOE", "STEREOCIS", "STEREOTRANS", "STEREOANY"),
    (False, True),                                                         # conjugated
)
ATOM_FEATURE_SIZES = tuple(len(c) for c in ATOM_CATEGORIES)  # rows of each atom embedding table
BOND_FEATURE_SIZES = tuple(len(c) for c in BOND_CATEGORIES)
# Uni-Mol's molecule dictionary (mol.dict.txt of dptech/Uni-Mol-Models) in file order, plus the
# "[MASK]" Mol-LLaMA appends; used when the file itself is not at hand and the embedding has 31 rows.
UNIMOL_SYMBOLS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "C", "N", "O", "S", "H", "Cl", "F", "Br", "I", "Si", "P",
                  "B", "Na", "K", "Al", "Ca", "Sn", "As", "Hg", "Fe", "Zn", "Cr", "Se", "Gd", "Au", "Li", "[MASK]")
CONFORMER_SEED = 42
MAX_ATOMS = 512  # Uni-Mol's longest input; larger molecules keep a seeded random subset, as upstream samples one


def rdkit():
    """``(Chem, AllChem)``, or a one-line ``EncoderUnavailableError`` naming the package to install."""
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import AllChem
    except ImportError as err:
        from esmerge.specialists.raw_encoder import EncoderUnavailableError

        raise EncoderUnavailableError(f"Mol-LLaMA's molecule encoder needs RDKit ({err}): pip install rdkit") from None
    RDLogger.DisableLog("rdApp.*")
    return Chem, AllChem


def parse(smiles: str):
    Chem, _ = rdkit()
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise InputError(f"invalid SMILES: {smiles!r}")
    return mol


def _index(categories: tuple, value) -> int:
    return categories.index(value) if value in categories else len(categories) - 1


def atom_features(atom) -> list[int]:
    """The 9 category indices of one RDKit atom (see ``ATOM_CATEGORIES``)."""
    values = (atom.GetAtomicNum(), str(atom.GetChiralTag()), atom.GetTotalDegree(), atom.GetFormalCharge(),
              atom.GetTotalNumHs(), atom.GetNumRadicalElectrons(), str(atom.GetHybridization()),
              atom.GetIsAromatic(), atom.IsInRing())
    return [_index(c, v) for c, v in zip(ATOM_CATEGORIES, values)]


def bond_features(bond) -> list[int]:
    """The 3 category indices of one RDKit bond (see ``BOND_CATEGORIES``)."""
    values = (str(bond.GetBondType()), str(bond.GetStereo()), bond.GetIsConjugated())
    return [_index(c, v) for c, v in zip(BOND_CATEGORIES, values)]


def smiles_graph(smiles: str) -> dict[str, torch.Tensor]:
    """The 2D graph: ``atoms [N, 9]``, ``edge_index [2, E]`` (E = 2 x bonds, both directions),
    ``edges [E, 3]``, all int64. Rows follow RDKit's atom order."""
    mol = parse(smiles)
    atoms = torch.tensor([atom_features(a) for a in mol.GetAtoms()], dtype=torch.long).view(-1, 9)
    pairs, feats = [], []
    for bond in mol.GetBonds():
        i, j, f = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx(), bond_features(bond)
        pairs += [(i, j), (j, i)]
        feats += [f, f]
    edge_index = torch.tensor(pairs, dtype=torch.long).view(-1, 2).T.contiguous()
    return {"atoms": atoms, "edge_index": edge_index, "edges": torch.tensor(feats, dtype=torch.long).view(-1, 3)}


@functools.lru_cache(maxsize=4096)
def conformer(smiles: str, seed: int = CONFORMER_SEED) -> tuple[tuple[str, ...], np.ndarray]:
    """Heavy-atom symbols and coordinates ``[N, 3]`` (float64, Angstrom, read-only) of one seeded 3D conformer.

    ETKDG with the molecule's hydrogens, then MMFF (where MMFF has parameters), then hydrogens
    removed, as upstream. Where ETKDG fails from its usual start it retries from random
    coordinates (upstream falls back to OpenBabel instead, not a pip dependency); where that fails
    too the 2D depiction (z = 0) stands in, so every parsable molecule gets a block. Memoised: every
    model that reads a molecule (each shot of each prompt) needs the same conformer, and embedding
    plus MMFF costs up to seconds per molecule.
    """
    Chem, AllChem = rdkit()
    mol = parse(smiles)
    with_h = Chem.AddHs(mol)
    embedded = False
    for random_coords in (False, True):
        # one conformer: nothing to prune, and RMS pruning's symmetry set-up alone can take a minute
        ids = AllChem.EmbedMultipleConfs(with_h, numConfs=1, randomSeed=seed, maxAttempts=10000,
                                         useRandomCoords=random_coords, numThreads=1)
        if len(ids):
            embedded = True
            break
    if embedded:
        try:
            AllChem.MMFFOptimizeMoleculeConfs(with_h, numThreads=1)
        except Exception:  # as upstream: MMFF lacks parameters for some elements; keep ETKDG's geometry
            pass
        mol = Chem.RemoveHs(with_h)  # a hydrogen it must keep (e.g. in [H][H]) is dropped by unimol_inputs
    else:
        AllChem.Compute2DCoords(mol)
    coords = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)
    coords.setflags(write=False)  # shared by every caller through the memo
    return tuple(a.GetSymbol() for a in mol.GetAtoms()), coords


def read_dictionary(path) -> tuple[str, ...]:
    """Uni-Mol's dictionary file (one ``symbol [count]`` per line) as symbols, plus ``[MASK]`` as upstream adds."""
    symbols = []
    for line in open(path, encoding="utf-8").read().splitlines():
        parts = line.rstrip().rsplit(" ", 1)
        symbol = parts[0] if len(parts) == 2 and parts[1].lstrip("-").isdigit() else line.rstrip()
        if symbol and symbol not in symbols:
            symbols.append(symbol)
    return tuple(symbols) + (() if "[MASK]" in symbols else ("[MASK]",))


def unimol_inputs(symbols: list[str], coords: np.ndarray, dictionary: tuple[str, ...],
                  max_atoms: int = MAX_ATOMS, seed: int = CONFORMER_SEED) -> dict[str, torch.Tensor]:
    """Uni-Mol's inputs for one conformer: ``tokens [T]`` (T = atoms + 2), ``distance [T, T]`` float32,
    ``edge_type [T, T]`` int64. Hydrogens are dropped; unknown elements map to ``[UNK]``."""
    symbols, coords = np.asarray(symbols), np.asarray(coords, dtype=np.float64)
    heavy = symbols != "H"
    if heavy.any():
        symbols, coords = symbols[heavy], coords[heavy]
    if len(symbols) > max_atoms:
        keep = np.random.default_rng(seed).permutation(len(symbols))[:max_atoms]
        symbols, coords = symbols[keep], coords[keep]
    index = {s: i for i, s in enumerate(dictionary)}
    ids = [index["[CLS]"], *(index.get(str(s), index["[UNK]"]) for s in symbols), index["[SEP]"]]
    tokens = torch.tensor(ids, dtype=torch.long)
    centred = coords - coords.mean(axis=0)
    padded = np.concatenate([np.zeros((1, 3)), centred, np.zeros((1, 3))])
    distance = np.sqrt(((padded[:, None, :] - padded[None, :, :]) ** 2).sum(-1)).astype(np.float32)
    return {"tokens": tokens, "distance": torch.from_numpy(distance),
            "edge_type": tokens[:, None] * len(dictionary) + tokens[None, :]}
