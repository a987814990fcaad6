"""The message-passing layer of the cell-graph encoder (GraphSAGE form, paper §4)."""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter


class WeightedSAGEConv(MessagePassing):
    r"""GraphSAGE layer with a weighted-mean neighbour aggregate.

    .. math::
        \mathbf{h}_v' = \mathbf{W} \cdot \Big[\mathbf{h}_v \,\Big\|\,
        \frac{\sum_{u \in \mathcal{N}(v)} w_{uv} \mathbf{h}_u}
             {\max\big(1, \sum_{u \in \mathcal{N}(v)} w_{uv}\big)}\Big]

    (activation applied by the caller). Observed edges carry ``w = 1``; edges added by the
    edge sampler carry their sampled (training) or evaluation weight, so a weight-0 edge is
    the same as no edge. The clamp only matters for nodes whose incoming weights sum below 1
    (e.g. no neighbour): it keeps their aggregate and gradient bounded.

    Parameters
    ----------
    in_dim, out_dim
        Input and output widths.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(aggr="add")
        self.lin = nn.Linear(2 * in_dim, out_dim)

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor
    ) -> torch.Tensor:
        num = self.propagate(edge_index, x=x, w=edge_weight.to(x.dtype))
        den = scatter(
            edge_weight.to(x.dtype), edge_index[1], dim=0, dim_size=x.shape[0], reduce="sum"
        )
        agg = num / den.clamp_min(1.0).unsqueeze(-1)
        return self.lin(torch.cat([x, agg], dim=-1))

    def message(self, x_j, w):  # no annotations: PyG inspects them
        return w.unsqueeze(-1) * x_j
