"""Hierarchical cell-graph encoder with stochastic edge addition (paper §4, §5.2).

Per tile (a PyG ``Data`` inside a ``Batch``), with fields ``x``, ``edge_index`` (proximity
edges over the whole tile, both directions), ``pos`` (tile-local, [0, 1)), ``micro`` (0..15),
``meso`` (0..3) and ``batch``:

1. **G_micro** = the proximity edges whose two cells lie in the same micro block (4×4 grid)
   of the same tile. GNN layers → node embeddings → gated attention pooling → ``z_micro``.
2. **G_meso** = G_micro + edges added by a stochastic edge-addition layer whose candidate
   pairs lie in the same meso block (2×2 grid) of the same tile. GNN layers → ``z_meso``.
3. **G_macro** = G_meso + added edges whose candidate pairs lie in the same tile.
   GNN layers → ``z_macro``.

Choices the paper leaves open (documented here because they change results):

- **Candidate cap.** All pairs of a block are O(n²); each node proposes only its
  ``candidate_k`` nearest (by ``pos``) allowed partners, and the union of these proposals,
  made undirected, is the candidate set (so a node can end up in a few more than k pairs).
  ``sparsify=False`` (the paper's "sparsification off" ablation) adds every candidate with
  weight 1; its cap is ``dense_k`` (None = truly all pairs of the block).
- **Macro candidates** are pairs of the same tile in *different* meso blocks: pairs inside a
  meso block were already candidates of the meso layer, and with a nearest-k cap the macro
  layer would otherwise re-propose the same nearby pairs. Union of all stages still spans
  the whole tile (with ``sparsify=False`` the final graph is the complete tile graph when
  the caps are None).
- Existing edges are never candidates.
- **Scores** are symmetric: ``s_uv = σ((MLP([h_u,h_v]) + MLP([h_v,h_u])) / 2)``, one sample per
  undirected pair, the same weight on both directions.
- **Training**: ``y ~ RelaxedBernoulli(T, s_uv)``, straight-through ``y_st = (y_hard - y).detach()
  + y``. Every candidate enters message passing with weight ``y_st`` (0 or 1 in the forward
  pass, so the graph used is exactly observed + accepted edges), which lets rejected
  candidates receive a gradient too. **Eval**: deterministic ``s_uv > 0.5``; only accepted
  edges are used. Observed edges keep weight 1.
- **Layers** are GraphSAGE-form with a weighted mean:
  ``h_v' = GELU(W·[h_v, Σ_u w_uv h_u / max(1, Σ_u w_uv)])`` (the clamp only matters for nodes
  whose incoming weights are all 0, i.e. no neighbour; it keeps their gradient bounded).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from napari_sigmma.constants import SCALES
from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    import torch

# cap on G·n² elements of one dense distance block in candidate search (memory)
_DENSE_BUDGET = 1 << 24


@dataclass
class GraphOutput:
    """What the ST encoder returns for a batch of tiles.

    Attributes
    ----------
    emb
        ``{scale: (B, D)}`` tile embeddings.
    nodes
        ``{scale: (n, D)}`` node embeddings after each stage, in the same space as ``emb``
        (``emb`` is their attention-weighted mean). Empty for the gene-vector encoder.
    edges
        ``{scale: (edge_index (2, E), prob (E,))}``, both directions like PyG. ``micro``: the
        proximity edges inside micro blocks, prob 1. ``meso`` / ``macro``: the edges the layer
        added (accepted samples in training, ``s_uv > 0.5`` in eval) with their ``s_uv``.
    """

    emb: dict[str, torch.Tensor]
    nodes: dict[str, torch.Tensor] = field(default_factory=dict)
    edges: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------
def micro_edges(
    edge_index: torch.Tensor, micro: torch.Tensor, batch: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the edges whose endpoints share a micro block (and a tile)."""
    u, v = edge_index
    keep = micro[u] == micro[v]
    if batch is not None:
        keep &= batch[u] == batch[v]
    return edge_index[:, keep]


def candidate_pairs(
    pos: torch.Tensor,
    group: torch.Tensor,
    *,
    k: int | None,
    existing: torch.Tensor | None = None,
    forbid_same: torch.Tensor | None = None,
) -> torch.Tensor:
    """Candidate node pairs for edge addition, restricted to blocks.

    Parameters
    ----------
    pos
        ``(n, 2)`` node positions (distances decide the nearest candidates).
    group
        ``(n,)`` block id; pairs must share it (e.g. ``tile*4 + meso``).
    k
        Each node proposes its ``k`` nearest allowed partners; None = all allowed partners.
    existing
        ``(2, E)`` edges that are not candidates (either direction).
    forbid_same
        ``(n,)`` labels; pairs with equal labels are not candidates (e.g. ``meso`` for the
        macro layer).

    Returns
    -------
    torch.Tensor
        ``(2, P)`` long, undirected pairs with ``u < v``, unique, sorted.
    """
    import torch

    device = pos.device
    n = pos.shape[0]
    if n < 2:
        return torch.empty(2, 0, dtype=torch.long, device=device)
    order = torch.argsort(group, stable=True)
    _, counts = torch.unique_consecutive(group[order], return_counts=True)
    n_groups = counts.numel()
    ptr = torch.zeros(n_groups + 1, dtype=torch.long, device=device)
    ptr[1:] = torch.cumsum(counts, 0)
    gid_sorted = torch.repeat_interleave(torch.arange(n_groups, device=device), counts)
    local_sorted = torch.arange(n, device=device) - ptr[gid_sorted]
    node_gid = torch.empty(n, dtype=torch.long, device=device)
    node_loc = torch.empty(n, dtype=torch.long, device=device)
    node_gid[order] = gid_sorted
    node_loc[order] = local_sorted

    if existing is not None and existing.numel():
        eu, ev = existing
        same = node_gid[eu] == node_gid[ev]
        eu, ev = eu[same], ev[same]
    else:
        eu = ev = torch.empty(0, dtype=torch.long, device=device)

    found: list[torch.Tensor] = []
    sizes = counts.tolist()
    start = 0
    while start < n_groups:
        # chunk of groups whose padded distance blocks fit the memory budget
        stop, widest = start, 0
        while stop < n_groups:
            w = max(widest, sizes[stop])
            if stop > start and (stop - start + 1) * w * w > _DENSE_BUDGET:
                break
            widest, stop = w, stop + 1
        found.append(
            _pairs_in_groups(
                pos,
                order,
                ptr,
                node_gid,
                node_loc,
                (eu, ev),
                forbid_same,
                groups=(start, stop),
                width=widest,
                k=k,
            )
        )
        start = stop
    pairs = torch.cat(found, dim=1)
    if pairs.numel() == 0:
        return pairs
    u = torch.minimum(pairs[0], pairs[1])
    v = torch.maximum(pairs[0], pairs[1])
    key = torch.unique(u * n + v)
    return torch.stack([key // n, key % n])


def _pairs_in_groups(
    pos: torch.Tensor,
    order: torch.Tensor,
    ptr: torch.Tensor,
    node_gid: torch.Tensor,
    node_loc: torch.Tensor,
    existing: tuple[torch.Tensor, torch.Tensor],
    forbid_same: torch.Tensor | None,
    *,
    groups: tuple[int, int],
    width: int,
    k: int | None,
) -> torch.Tensor:
    """Directed candidate pairs ``(2, P)`` of groups ``groups[0]:groups[1]`` via padded
    ``(G, width, width)`` distance blocks."""
    import torch

    eu, ev = existing
    start, stop = groups

    device = pos.device
    G = stop - start
    lo, hi = int(ptr[start]), int(ptr[stop])
    nodes = order[lo:hi]  # sorted by group
    g_local = node_gid[nodes] - start
    l_local = node_loc[nodes]
    P = pos.new_zeros(G, width, pos.shape[1])
    P[g_local, l_local] = pos[nodes].to(P.dtype)
    valid = torch.zeros(G, width, dtype=torch.bool, device=device)
    valid[g_local, l_local] = True
    node_of = torch.full((G, width), -1, dtype=torch.long, device=device)
    node_of[g_local, l_local] = nodes

    allowed = valid[:, :, None] & valid[:, None, :]
    allowed &= ~torch.eye(width, dtype=torch.bool, device=device)[None]
    if forbid_same is not None:
        lab = torch.full((G, width), -1, dtype=torch.long, device=device)
        lab[g_local, l_local] = forbid_same[nodes].long()
        allowed &= lab[:, :, None] != lab[:, None, :]
    if eu.numel():
        inside = (node_gid[eu] >= start) & (node_gid[eu] < stop)
        a, b = eu[inside], ev[inside]
        ga = node_gid[a] - start
        allowed[ga, node_loc[a], node_loc[b]] = False
        allowed[ga, node_loc[b], node_loc[a]] = False

    if k is None or k >= width - 1:
        g, i, j = allowed.nonzero(as_tuple=True)
    else:
        d = torch.cdist(P, P)
        d = d.masked_fill(~allowed, float("inf"))
        vals, idx = d.topk(max(int(k), 0), dim=-1, largest=False)
        ok = torch.isfinite(vals)
        g, i, kk = ok.nonzero(as_tuple=True)
        j = idx[g, i, kk]
    return torch.stack([node_of[g, i], node_of[g, j]])


def sample_edges(
    probs: torch.Tensor, *, temperature: float, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw edges from scores.

    Returns
    -------
    weight, hard
        ``weight``: straight-through weights (forward value = ``hard``; gradient of the relaxed
        sample in training). ``hard``: bool, the accepted edges. Eval: ``s > 0.5``, no noise.
    """
    import torch

    if not training:
        hard = probs > 0.5
        return hard.to(probs.dtype), hard
    if probs.numel() == 0:
        return probs, probs > 0.5
    p = probs.float().clamp(1e-6, 1 - 1e-6)  # sample in fp32 even under bf16 autocast
    dist = torch.distributions.RelaxedBernoulli(
        torch.tensor(float(temperature), device=p.device, dtype=p.dtype), probs=p
    )
    y = dist.rsample()
    y_hard = (y > 0.5).to(y.dtype)
    return ((y_hard - y).detach() + y).to(probs.dtype), y_hard.bool()


def _both_directions(pairs: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([pairs, pairs.flip(0)], dim=1)


# ---------------------------------------------------------------------------------------
# modules (defined on first use: importing this file must not import torch)
# ---------------------------------------------------------------------------------------
@functools.cache
def _classes() -> dict[str, type]:
    import torch
    from torch import nn
    from torch_geometric.nn import MessagePassing
    from torch_geometric.nn.aggr import AttentionalAggregation
    from torch_geometric.utils import scatter

    class WeightedSAGEConv(MessagePassing):
        """GraphSAGE layer with a weighted-mean neighbour aggregate.

        ``h_v' = W·[h_v, Σ_u w_uv h_u / max(1, Σ_u w_uv)]`` (activation applied by the caller).
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

        def message(self, x_j, w):  # no annotations: PyG evaluates them in module globals
            return w.unsqueeze(-1) * x_j

    class EdgeScorer(nn.Module):
        """Symmetric edge score ``σ((MLP([h_u,h_v]) + MLP([h_v,h_u])) / 2)``."""

        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

        def forward(self, h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
            # first layer split per endpoint: W·[h_u, h_v] = W_a·h_u + W_b·h_v, computed once
            # per node instead of once per pair (same function, far fewer FLOPs)
            first, rest = self.mlp[0], self.mlp[1:]
            d = h.shape[-1]
            a = nn.functional.linear(h, first.weight[:, :d], first.bias)
            b = nn.functional.linear(h, first.weight[:, d:])
            u, v = pairs
            logit = 0.5 * (rest(a[u] + b[v]) + rest(a[v] + b[u]))
            return torch.sigmoid(logit.squeeze(-1))

    class GNNStack(nn.Module):
        def __init__(self, hidden: int, n_layers: int) -> None:
            super().__init__()
            self.convs = nn.ModuleList(WeightedSAGEConv(hidden, hidden) for _ in range(n_layers))
            self.act = nn.GELU()

        def forward(self, h, edge_index, edge_weight):
            for conv in self.convs:
                h = self.act(conv(h, edge_index, edge_weight))
            return h

    class ScalePool(nn.Module):
        """Gated global attention pooling; the value network projects into the shared
        space, so node embeddings and the pooled tile embedding live in the same space."""

        def __init__(self, hidden: int, out_dim: int) -> None:
            super().__init__()
            self.value = nn.Sequential(
                nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
            )
            gate = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            self.pool = AttentionalAggregation(gate_nn=gate, nn=self.value)

        def forward(self, h, batch, n_graphs):
            return self.pool(h, batch, dim_size=n_graphs), self.value(h)

    class HierarchicalGraphEncoder(nn.Module):
        """ST encoder g(·): hierarchical graph structure learning + pooling per scale.

        Parameters
        ----------
        in_dim
            Node feature width ``F``.
        embed_dim
            Shared embedding dimension ``D``.
        hidden
            Node embedding width inside the GNN.
        gnn_layers
            GNN layers run on G_micro, G_meso, G_macro (each ≥ 1).
        candidate_k
            Candidates each node proposes per edge-addition layer (nearest first).
        sparsify
            False: add every candidate (weight 1), cap ``dense_k``.
        dense_k
            Candidate cap when ``sparsify=False`` (None = all pairs of the block).
        edge_temperature
            Relaxed-Bernoulli temperature.
        """

        def __init__(
            self,
            in_dim: int,
            embed_dim: int = 128,
            *,
            hidden: int = 128,
            gnn_layers: tuple[int, int, int] = (2, 1, 1),
            candidate_k: int = 8,
            sparsify: bool = True,
            dense_k: int | None = 64,
            edge_temperature: float = 0.5,
        ) -> None:
            super().__init__()
            gnn_layers = tuple(int(n) for n in gnn_layers)
            if len(gnn_layers) != 3 or min(gnn_layers) < 1:
                raise SigmmaError(
                    f"gnn_layers must be three counts ≥ 1 (micro, meso, macro), got {gnn_layers}"
                )
            if int(candidate_k) < 1:
                raise SigmmaError(f"candidate_k must be ≥ 1, got {candidate_k}")
            self.in_dim = int(in_dim)
            self.hidden = int(hidden)
            self.candidate_k = int(candidate_k)
            self.sparsify = bool(sparsify)
            self.dense_k = None if dense_k is None else int(dense_k)
            self.edge_temperature = float(edge_temperature)
            self.input = nn.Sequential(nn.Linear(self.in_dim, self.hidden), nn.GELU())
            self.gnn = nn.ModuleDict(
                {s: GNNStack(self.hidden, n) for s, n in zip(SCALES, gnn_layers, strict=True)}
            )
            self.pools = nn.ModuleDict({s: ScalePool(self.hidden, embed_dim) for s in SCALES})
            # no scorer parameters in the dense ablation (they would be unused)
            self.scorers = (
                nn.ModuleDict({s: EdgeScorer(self.hidden) for s in ("meso", "macro")})
                if self.sparsify
                else None
            )

        def _add_edges(
            self, scale: str, h, pos, group, forbid, edge_index, edge_weight
        ) -> tuple[Any, Any, tuple[Any, Any]]:
            k = self.candidate_k if self.sparsify else self.dense_k
            pairs = candidate_pairs(pos, group, k=k, existing=edge_index, forbid_same=forbid)
            if not self.sparsify:
                w = torch.ones(pairs.shape[1], device=h.device, dtype=h.dtype)
                added = _both_directions(pairs)
                ei = torch.cat([edge_index, added], dim=1)
                ew = torch.cat([edge_weight, torch.cat([w, w])])
                return ei, ew, (added, torch.ones(added.shape[1], device=h.device))
            probs = self.scorers[scale](h, pairs)
            weight, hard = sample_edges(
                probs, temperature=self.edge_temperature, training=self.training
            )
            if self.training:  # all candidates, weight 0/1 forward (gradient for all)
                used, used_w = pairs, weight
            else:
                used, used_w = pairs[:, hard], weight[hard]
            ei = torch.cat([edge_index, _both_directions(used)], dim=1)
            ew = torch.cat([edge_weight, used_w, used_w])
            acc = pairs[:, hard]
            acc_p = probs[hard]
            return ei, ew, (_both_directions(acc), torch.cat([acc_p, acc_p]))

        def forward(self, batch: Any) -> GraphOutput:
            x = batch.x.float()
            n = x.shape[0]
            b = getattr(batch, "batch", None)
            if b is None:
                b = torch.zeros(n, dtype=torch.long, device=x.device)
            n_graphs = int(getattr(batch, "num_graphs", int(b.max()) + 1 if n else 1))
            pos = batch.pos.float()
            micro, meso = batch.micro.long(), batch.meso.long()
            if x.shape[1] != self.in_dim:
                raise SigmmaError(
                    f"node features have width {x.shape[1]}, the graph encoder expects "
                    f"{self.in_dim}"
                )

            emb: dict[str, Any] = {}
            nodes: dict[str, Any] = {}
            edges: dict[str, Any] = {}

            ei = micro_edges(batch.edge_index.long(), micro, b)
            ew = torch.ones(ei.shape[1], device=x.device, dtype=x.dtype)
            edges["micro"] = (ei, torch.ones_like(ew))
            h = self.input(x)
            h = self.gnn["micro"](h, ei, ew)
            emb["micro"], nodes["micro"] = self.pools["micro"](h, b, n_graphs)

            # G_meso: candidates inside the same meso block of the same tile
            ei, ew, edges["meso"] = self._add_edges("meso", h, pos, b * 4 + meso, None, ei, ew)
            h = self.gnn["meso"](h, ei, ew)
            emb["meso"], nodes["meso"] = self.pools["meso"](h, b, n_graphs)

            # G_macro: candidates in the same tile, other meso block
            ei, ew, edges["macro"] = self._add_edges("macro", h, pos, b, meso, ei, ew)
            h = self.gnn["macro"](h, ei, ew)
            emb["macro"], nodes["macro"] = self.pools["macro"](h, b, n_graphs)
            return GraphOutput(emb=emb, nodes=nodes, edges=edges)

    class GeneVectorEncoder(nn.Module):
        """No-graph ablation: MLP on the tile's mean expression vector (``genevec``); the
        same embedding is returned for every scale."""

        def __init__(self, n_genes: int, embed_dim: int = 128, *, hidden: int = 128) -> None:
            super().__init__()
            self.n_genes = int(n_genes)
            self.mlp = nn.Sequential(
                nn.Linear(self.n_genes, hidden),
                nn.GELU(),
                nn.Linear(hidden, hidden),
                nn.GELU(),
                nn.Linear(hidden, embed_dim),
            )

        def forward(self, batch: Any) -> GraphOutput:
            g = batch if isinstance(batch, torch.Tensor) else batch.genevec
            g = g.float().reshape(-1, g.shape[-1])
            if g.shape[1] != self.n_genes:
                raise SigmmaError(
                    f"genevec has {g.shape[1]} genes, the encoder expects {self.n_genes}"
                )
            z = self.mlp(g)
            return GraphOutput(emb={s: z for s in SCALES})

    out = {}
    for cls in (
        WeightedSAGEConv,
        EdgeScorer,
        GNNStack,
        ScalePool,
        HierarchicalGraphEncoder,
        GeneVectorEncoder,
    ):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        out[cls.__name__] = cls
    return out


def __getattr__(name: str):
    if name in (
        "WeightedSAGEConv",
        "EdgeScorer",
        "GNNStack",
        "ScalePool",
        "HierarchicalGraphEncoder",
        "GeneVectorEncoder",
    ):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
