"""Hierarchical cell-graph encoder with stochastic edge addition (paper §4, §5.2).

Per tile (a PyG ``Data`` inside a ``Batch``), with fields ``x``, ``edge_index`` (proximity
edges, both directions; :func:`napari_sigmma.tiles.graphs.build_tile_cells` builds them per
micro block), ``pos`` (tile-local, [0, 1)), ``micro`` (0..15), ``meso`` (0..3) and ``batch``:

1. **G_micro** = the proximity edges whose two cells lie in the same micro block (4×4 grid)
   of the same tile. GNN layers → node embeddings → gated attention pooling → ``z_micro``.
2. **G_meso** = G_micro + edges added by the stochastic edge-addition layer
   (:mod:`napari_sigmma.models.edges`) whose candidate pairs lie in the same meso block
   (2×2 grid) of the same tile. GNN layers → ``z_meso``.
3. **G_macro** = G_meso + added edges whose candidate pairs lie in the same tile.
   GNN layers → ``z_macro``.

Layers: :class:`~napari_sigmma.models.conv.WeightedSAGEConv` (GraphSAGE form, weighted
mean), :class:`~napari_sigmma.models.edges.EdgeScorer`,
:class:`~napari_sigmma.models.pool.ScalePool`.

Choices the paper leaves open (documented here because they change results):

- **Candidates**: all pairs of the block (see :mod:`napari_sigmma.models.edges`);
  ``candidate_k`` caps them to each node's k nearest (the former default, 8, kept by old
  checkpoints), ``candidate_cap`` is the memory guard when ``candidate_k`` is None.
  ``sparsify=False`` (the paper's "sparsification off" ablation) adds every candidate with
  weight 1; its cap is ``dense_k`` (None = the memory guard only).
- **Macro candidates** are pairs of the same tile in *different* meso blocks: pairs inside a
  meso block were already candidates of the meso layer. Union of all stages still spans
  the whole tile (with ``sparsify=False`` the final graph is the complete tile graph).
- Existing edges are never candidates.
- **Training / evaluation** of the sampler: :mod:`napari_sigmma.models.edges` (training draws
  straight-through samples; evaluation follows the encoder's ``edge_mode``, default
  ``expected``). Observed edges keep weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from napari_sigmma.constants import SCALES
from napari_sigmma.errors import SigmmaError
from napari_sigmma.models.conv import WeightedSAGEConv
from napari_sigmma.models.edges import (
    DEFAULT_CANDIDATE_CAP,
    DEFAULT_EDGE_MODE,
    EDGE_MODES,
    EdgeScorer,
    both_directions,
    candidate_pairs,
    eval_weights,
    sample_edges,
)
from napari_sigmma.models.pool import ScalePool


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
        proximity edges inside micro blocks, prob 1. ``meso`` / ``macro``: the added edges
        whose weight is ≥ 0.5 (training: the accepted samples; ``threshold``: ``s > 0.5``;
        ``expected``: ``s ≥ 0.5``; ``sampled``: accepted in at least half the passes) with
        their score ``s_uv`` (1 without sparsification).
    sampler
        ``{stage: {"pairs" (2, P), "score" (P,), "weight" (P,)}}`` for ``meso`` and
        ``macro``: every candidate (undirected), its score and the weight it had in the
        graph (training: the hard sample; evaluation: the mode's weight, averaged over the
        passes of ``sampled``). Read by :func:`~napari_sigmma.models.edges.sampler_diagnostics`.
    """

    emb: dict[str, torch.Tensor]
    nodes: dict[str, torch.Tensor] = field(default_factory=dict)
    edges: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    sampler: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def micro_edges(
    edge_index: torch.Tensor, micro: torch.Tensor, batch: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the edges whose endpoints share a micro block (and a tile)."""
    u, v = edge_index
    keep = micro[u] == micro[v]
    if batch is not None:
        keep &= batch[u] == batch[v]
    return edge_index[:, keep]


class GNNStack(nn.Module):
    """``n_layers`` :class:`WeightedSAGEConv` layers, each followed by GELU:
    ``h ← GELU(conv(h, E, w))``."""

    def __init__(self, hidden: int, n_layers: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(WeightedSAGEConv(hidden, hidden) for _ in range(n_layers))
        self.act = nn.GELU()

    def forward(
        self, h: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor
    ) -> torch.Tensor:
        for conv in self.convs:
            h = self.act(conv(h, edge_index, edge_weight))
        return h


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
        Nearest candidates each node proposes per edge-addition layer; None = all pairs of
        the block (the paper), capped by ``candidate_cap``.
    candidate_cap
        Memory guard for dense blocks when ``candidate_k`` is None (None = no guard).
    sparsify
        False: add every candidate (weight 1), cap ``dense_k``.
    dense_k
        Candidate cap when ``sparsify=False`` (None = ``candidate_cap``).
    edge_temperature
        Relaxed-Bernoulli temperature.
    edge_mode
        Evaluation mode of the sampler (:data:`~napari_sigmma.models.edges.EDGE_MODES`;
        change it with :func:`~napari_sigmma.models.edges.set_edge_mode`).
    """

    def __init__(
        self,
        in_dim: int,
        embed_dim: int = 128,
        *,
        hidden: int = 128,
        gnn_layers: tuple[int, int, int] = (2, 1, 1),
        candidate_k: int | None = None,
        candidate_cap: int | None = DEFAULT_CANDIDATE_CAP,
        sparsify: bool = True,
        dense_k: int | None = None,
        edge_temperature: float = 0.5,
        edge_mode: str = DEFAULT_EDGE_MODE,
    ) -> None:
        super().__init__()
        gnn_layers = tuple(int(n) for n in gnn_layers)
        if len(gnn_layers) != 3 or min(gnn_layers) < 1:
            raise SigmmaError(
                f"gnn_layers must be three counts ≥ 1 (micro, meso, macro), got {gnn_layers}"
            )
        for name, val in (("candidate_k", candidate_k), ("candidate_cap", candidate_cap)):
            if val is not None and int(val) < 1:
                raise SigmmaError(f"{name} must be ≥ 1 or None, got {val}")
        if edge_mode not in EDGE_MODES:
            raise SigmmaError(f"edge_mode must be one of {', '.join(EDGE_MODES)}")
        self.in_dim = int(in_dim)
        self.hidden = int(hidden)
        self.candidate_k = None if candidate_k is None else int(candidate_k)
        self.candidate_cap = None if candidate_cap is None else int(candidate_cap)
        self.sparsify = bool(sparsify)
        self.dense_k = None if dense_k is None else int(dense_k)
        self.edge_temperature = float(edge_temperature)
        # evaluation mode of the sampler (plain attributes: not in the state dict)
        self.edge_mode = edge_mode
        self.edge_samples = 8
        self.edge_rate: float | None = None
        self.edge_seed = 0
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

    @property
    def cap(self) -> int | None:
        """Per-node candidate cap in force (None = every pair of the block)."""
        k = self.candidate_k if self.sparsify else self.dense_k
        return self.candidate_cap if k is None else k

    def _add_edges(
        self,
        scale: str,
        h: torch.Tensor,
        pairs: torch.Tensor,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor,
        gen: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One stage's additions → the new graph and ``{"pairs", "score", "weight"}``."""
        mode = self.edge_mode
        if self.sparsify:
            probs = self.scorers[scale](h, pairs)
        else:
            probs = torch.ones(pairs.shape[1], device=h.device, dtype=h.dtype)
            if mode in ("expected", "threshold", "sampled"):
                mode = "all"  # the dense model's own graph
            if mode == "random" and self.edge_rate is None:
                mode = "all"  # its trained acceptance rate is 1
        if self.training:
            if self.sparsify:
                weight, _ = sample_edges(probs, temperature=self.edge_temperature, training=True)
            else:
                weight = probs
            # all candidates, weight 0/1 forward (a gradient for every candidate)
            used, used_w, kept = pairs, weight, weight.detach()
        else:
            w = eval_weights(probs, mode, rate=self.edge_rate, generator=gen)
            nz = w > 0
            used, used_w, kept = pairs[:, nz], w[nz], w
        ei = torch.cat([edge_index, both_directions(used)], dim=1)
        ew = torch.cat([edge_weight, used_w, used_w])
        return ei, ew, {"pairs": pairs, "score": probs, "weight": kept}

    def _upper(
        self,
        h: torch.Tensor,
        pos: torch.Tensor,
        b: torch.Tensor,
        meso: torch.Tensor,
        n_graphs: int,
        ei: torch.Tensor,
        ew: torch.Tensor,
        gen: torch.Generator | None,
    ) -> tuple[dict, dict, dict]:
        """The meso and macro stages (one pass): embeddings, node embeddings, sampler."""
        emb: dict[str, Any] = {}
        nodes: dict[str, Any] = {}
        stats: dict[str, Any] = {}
        k = self.cap
        # G_meso: candidates inside the same meso block of the same tile
        group = b * 4 + meso
        pairs = candidate_pairs(pos, group, k=k, existing=ei)
        ei, ew, stats["meso"] = self._add_edges("meso", h, pairs, ei, ew, gen)
        h = self.gnn["meso"](h, ei, ew)
        emb["meso"], nodes["meso"] = self.pools["meso"](h, b, n_graphs)
        # G_macro: candidates in the same tile, other meso block
        pairs = candidate_pairs(pos, b, k=k, existing=ei, forbid_same=meso)
        ei, ew, stats["macro"] = self._add_edges("macro", h, pairs, ei, ew, gen)
        h = self.gnn["macro"](h, ei, ew)
        emb["macro"], nodes["macro"] = self.pools["macro"](h, b, n_graphs)
        return emb, nodes, stats

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
                f"node features have width {x.shape[1]}, the graph encoder expects {self.in_dim}"
            )

        ei = micro_edges(batch.edge_index.long(), micro, b)
        ew = torch.ones(ei.shape[1], device=x.device, dtype=x.dtype)
        edges: dict[str, Any] = {"micro": (ei, torch.ones_like(ew))}
        h = self.input(x)
        h = self.gnn["micro"](h, ei, ew)
        emb_mi, nodes_mi = self.pools["micro"](h, b, n_graphs)

        gen, passes = None, 1
        if not self.training and self.edge_mode in ("sampled", "random"):
            gen = torch.Generator(device=x.device)
            gen.manual_seed(int(self.edge_seed))
            if self.edge_mode == "sampled" and self.sparsify:
                passes = max(int(self.edge_samples), 1)
        runs = [self._upper(h, pos, b, meso, n_graphs, ei, ew, gen) for _ in range(passes)]
        emb, nodes, stats = runs[0]
        if passes > 1:
            emb = {s: torch.stack([r[0][s] for r in runs]).mean(0) for s in emb}
            nodes = {s: torch.stack([r[1][s] for r in runs]).mean(0) for s in nodes}
            stats = {
                s: {
                    "pairs": st["pairs"],
                    "score": torch.stack([r[2][s]["score"] for r in runs]).mean(0),
                    "weight": torch.stack([r[2][s]["weight"] for r in runs]).mean(0),
                }
                for s, st in stats.items()
            }
        for s, st in stats.items():
            keep = st["weight"] >= 0.5
            acc, p = st["pairs"][:, keep], st["score"][keep].detach()
            edges[s] = (both_directions(acc), torch.cat([p, p]))
        return GraphOutput(
            emb={"micro": emb_mi, **emb},
            nodes={"micro": nodes_mi, **nodes},
            edges=edges,
            sampler=stats,
        )


class GeneVectorEncoder(nn.Module):
    """No-graph ablation: MLP on the tile's mean expression vector (``genevec``); the same
    embedding is returned for every scale.

    Parameters
    ----------
    n_genes
        Length of ``genevec``.
    embed_dim
        Shared embedding dimension.
    hidden
        Hidden width of the MLP (Linear–GELU–Linear–GELU–Linear).
    """

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
            raise SigmmaError(f"genevec has {g.shape[1]} genes, the encoder expects {self.n_genes}")
        z = self.mlp(g)
        return GraphOutput(emb={s: z for s in SCALES})
