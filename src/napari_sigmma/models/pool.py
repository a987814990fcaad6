"""Per-scale readout of the cell-graph encoder: gated global attention pooling (paper §5.2)."""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn.aggr import AttentionalAggregation


class ScalePool(nn.Module):
    r"""Gated global attention pooling of one scale's node embeddings.

    .. math::
        \mathbf{z} = \sum_{v} \operatorname{softmax}_v\big(g(\mathbf{h}_v)\big)\, f(\mathbf{h}_v)

    with gate ``g`` = Linear–Tanh–Linear and value ``f`` = Linear–GELU–Linear into the
    shared space (PyG ``AttentionalAggregation``). ``f`` also maps every node, so node
    embeddings and the pooled tile embedding live in the same space.

    Parameters
    ----------
    hidden
        Node embedding width.
    out_dim
        Shared embedding dimension.
    """

    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.value = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        gate = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.pool = AttentionalAggregation(gate_nn=gate, nn=self.value)

    def forward(
        self, h: torch.Tensor, batch: torch.Tensor, n_graphs: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, hidden)`` → tile embeddings ``(n_graphs, out_dim)`` and node embeddings
        ``(n, out_dim)``."""
        return self.pool(h, batch, dim_size=n_graphs), self.value(h)
