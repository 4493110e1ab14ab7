"""MoleculeSTM's 2D graph encoder (a GIN with OGB atom/bond embeddings), in plain torch.

Follows Mol-LLaMA's ``models/moleculestm/moleculestm.py`` (``MoleculeSTM`` -> ``GNN`` -> ``GINConv``,
itself from MoleculeSTM / OGB): atom features are embedded by summing one table per feature; each of
L layers adds, for every node, the sum over incoming bonds of ``relu(h_src + bond_embedding)`` to
``(1 + eps) * h``, runs the MLP ``Linear(D, 2D) -> BatchNorm -> ReLU -> Linear(2D, D)``, a BatchNorm,
and a ReLU on all but the last layer (eval mode: BatchNorms use their running statistics, dropout is
off, as upstream freezes this encoder). The node states are padded to a batch and the graph's mean
node state is put in front as an extra token.

Submodule names keep upstream's state-dict keys (``molecule_node_model.atom_encoder.atom_embedding_list.0.weight``,
``molecule_node_model.gnns.0.mlp.1.running_mean``, ``graph_pred_linear.weight``, ...), so
``encoder.graph_encoder.moleculestm.*`` tensors and MoleculeSTM's ``molecule_model.pth`` load as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from esmerge.specialists.mol_llama.featurize import ATOM_FEATURE_SIZES, BOND_FEATURE_SIZES


class FeatureEmbedding(nn.Module):
    """Sum of one embedding table per categorical feature: ``[n, F]`` int -> ``[n, D]``."""

    def __init__(self, sizes: tuple[int, ...], dim: int, name: str):
        super().__init__()
        self.name = name
        self.add_module(name, nn.ModuleList(nn.Embedding(size, dim) for size in sizes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tables = getattr(self, self.name)
        return sum(table(features[:, i]) for i, table in enumerate(tables))


class GINLayer(nn.Module):
    """One GIN convolution with bond features (no self loops, sum aggregation at each edge's target)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.BatchNorm1d(2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.eps = nn.Parameter(torch.zeros(1))
        self.bond_encoder = FeatureEmbedding(BOND_FEATURE_SIZES, dim, "bond_embedding_list")

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """h ``[n, D]``, edge_index ``[2, E]`` (source, target), edges ``[E, 3]`` -> ``[n, D]``."""
        messages = torch.relu(h[edge_index[0]] + self.bond_encoder(edges))
        summed = torch.zeros_like(h).index_add_(0, edge_index[1], messages)
        return self.mlp((1 + self.eps) * h + summed)


class GINNodeModel(nn.Module):
    """``GNN`` upstream: atom embedding, ``num_layers`` GIN layers each followed by a BatchNorm."""

    def __init__(self, num_layers: int, dim: int):
        super().__init__()
        self.atom_encoder = FeatureEmbedding(ATOM_FEATURE_SIZES, dim, "atom_embedding_list")
        self.gnns = nn.ModuleList(GINLayer(dim) for _ in range(num_layers))
        self.batch_norms = nn.ModuleList(nn.BatchNorm1d(dim) for _ in range(num_layers))

    def forward(self, atoms: torch.Tensor, edge_index: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        h = self.atom_encoder(atoms)
        for i, (gin, norm) in enumerate(zip(self.gnns, self.batch_norms)):
            h = norm(gin(h, edge_index, edges))
            h = h if i == len(self.gnns) - 1 else torch.relu(h)  # the last layer's states stay signed ("JK last")
        return h


class MoleculeSTMGraph(nn.Module):
    """2D encoder: K graphs -> ``([K, 1 + N_max, D], mask [K, 1 + N_max] bool)``; token 0 is the mean
    over the graph's nodes, then its nodes in RDKit order, zero-padded (mask False)."""

    def __init__(self, num_layers: int = 5, dim: int = 300, num_tasks: int = 1):
        super().__init__()
        self.molecule_node_model = GINNodeModel(num_layers, dim)
        # Unused by the forward (MoleculeSTM's property head); kept so its checkpoint loads strictly.
        self.graph_pred_linear = nn.Linear(dim, num_tasks)
        self.num_features = dim

    def forward(self, graphs: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.graph_pred_linear.weight.device
        sizes = [int(g["atoms"].shape[0]) for g in graphs]
        offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
        atoms = torch.cat([g["atoms"] for g in graphs]).to(device)
        # One disjoint union graph: each graph's node ids shift by the nodes before it.
        edge_index = torch.cat([g["edge_index"] + off for g, off in zip(graphs, offsets)], dim=1).to(device)
        edges = torch.cat([g["edges"] for g in graphs]).to(device)
        nodes = self.molecule_node_model(atoms, edge_index, edges)
        width = max(sizes)
        out = nodes.new_zeros(len(graphs), 1 + width, nodes.shape[-1])
        mask = torch.zeros(len(graphs), 1 + width, dtype=torch.bool, device=device)
        for k, (off, n) in enumerate(zip(offsets, sizes)):
            out[k, 0] = nodes[off:off + n].mean(0)
            out[k, 1:1 + n] = nodes[off:off + n]
            mask[k, : 1 + n] = True
        return out, mask
