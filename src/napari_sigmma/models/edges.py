"""The stochastic edge-addition layer (paper §4, §5.2): candidates, scores, sampling, the
evaluation modes and the sampler's diagnostics.

A stage (meso, macro) of :class:`~napari_sigmma.models.graph.HierarchicalGraphEncoder` adds
edges to the graph of the stage before it:

1. **Candidates** (:func:`candidate_pairs`): node pairs of the same block (meso: same meso
   block of the same tile; macro: same tile, different meso block) that are not edges yet.
   **All pairs of the block**, as the paper, by default. A cap exists only as a memory guard
   for dense blocks: a node with more than ``cap`` allowed partners proposes its ``cap``
   nearest (the union of the proposals, made undirected, is the candidate set). With the
   default cap (:data:`DEFAULT_CANDIDATE_CAP`) no block of the embedded or synthetic samples
   is capped (at most 154 cells per tile). Cost: a 300-cell tile has ~34k macro candidate
   pairs (0.375·n² for cells spread over the four meso blocks), ~100 MB of scorer
   activations in training at ``hidden=128``; the cap starts to bind above ~340 cells.
2. **Scores** (:class:`EdgeScorer`): ``s_uv = σ((MLP([h_u,h_v]) + MLP([h_v,h_u])) / 2)``.
3. **Training**: ``y ~ RelaxedBernoulli(T, s_uv)``, straight-through
   ``y_st = (1[y > 0.5] - y).detach() + y`` (:func:`sample_edges`); every candidate enters
   message passing with weight ``y_st`` (0 or 1 forward, so the graph is exactly observed +
   accepted edges; the relaxed sample carries the gradient to the scorer). A candidate is
   accepted with probability ``s_uv``.
4. **Evaluation** (:data:`EDGE_MODES`, :func:`set_edge_mode`): how the learnt distribution
   becomes one graph without training noise:

   - ``expected`` (default): every candidate with weight ``s_uv``, the expectation of the
     training edge weight. One deterministic pass; the expected number of added edges equals
     training's, whatever the scores look like.
   - ``threshold``: candidates with ``s_uv > 0.5``, weight 1 (the "deterministic choice";
     keeps 0 % or 100 % of the candidates whenever the scores sit on one side of 0.5).
   - ``sampled``: the mean of the node / tile embeddings over ``n_samples`` passes, each with
     hard Bernoulli(``s_uv``) edges, as training draws them (seeded, so repeatable).
   - topology controls (evaluation without retraining): ``none`` (no added edges),
     ``all`` (every candidate, weight 1) and ``random`` (each candidate kept with
     probability ``rate``, weight 1; ``rate=None`` = the mean score of the stage's
     candidates, i.e. the acceptance rate training would have on these tiles).

   Why ``expected`` is the default (measured on the demo model, :mod:`napari_sigmma.demo`,
   all 38 tiles of the embedded sample, 5 training draws): accept_eval / accept_train per
   stage (meso, macro) were ``expected`` 0.507 / 0.508 and 0.500 / 0.500, ``sampled`` (8
   passes) 0.506 / 0.508 and 0.498 / 0.500, ``threshold`` 0.986 / 0.508 and 0.014 / 0.500:
   the scores sat within 0.003 of 0.5, so thresholding kept almost all meso and almost no
   macro candidates. Untrained (6 seeds) ``threshold`` kept 0 % or 100 % of a stage's
   candidates in 9 of 12 stage draws, ``expected`` 49-51 %. ``expected`` matches training's
   acceptance by construction in one deterministic pass; ``sampled`` matches too but costs
   ``n_samples`` passes of the meso and macro stages; both gave node-pooled embeddings
   within 1e-4 (relative) of the mean over 16 training-mode draws, ``threshold`` 5e-4.

The scorer's final bias starts at 0 (:class:`EdgeScorer`), so an untrained layer scores
``s ≈ 0.5`` (std ≈ 0.002 on random node embeddings): training accepts about half the
candidates and ``expected`` weighs each by about 0.5, instead of a random bias putting every
score on one side of 0.5. (A constant 0.5 is the worst case for ``threshold``, which is why
it is not the default.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from napari_sigmma.errors import SigmmaError

#: Evaluation modes of the edge sampler (see the module docstring).
EDGE_MODES: tuple[str, ...] = ("expected", "threshold", "sampled", "none", "all", "random")
#: The mode a graph encoder evaluates with unless told otherwise (chosen by measurement).
DEFAULT_EDGE_MODE = "expected"
#: The stages that add edges.
STAGES: tuple[str, ...] = ("meso", "macro")
#: Memory guard: a node with more allowed partners than this proposes only its nearest.
DEFAULT_CANDIDATE_CAP = 256
# Scores inside [0.5 - _UNCERTAIN, 0.5 + _UNCERTAIN] count as undecided in the diagnostics.
_UNCERTAIN = 0.1
# cap on G·n² elements of one dense distance block in candidate search (memory)
_DENSE_BUDGET = 1 << 24


# ---------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------
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
        ``(n, 2)`` node positions (distances decide the nearest candidates under a cap).
    group
        ``(n,)`` block id; pairs must share it (e.g. ``tile*4 + meso``).
    k
        Cap: a node with more than ``k`` allowed partners proposes its ``k`` nearest; None =
        all allowed partners (every pair of the block).
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


def both_directions(pairs: torch.Tensor) -> torch.Tensor:
    """``(2, P)`` undirected pairs → ``(2, 2P)`` edges, both directions (PyG style)."""
    return torch.cat([pairs, pairs.flip(0)], dim=1)


# ---------------------------------------------------------------------------------------
# scores and samples
# ---------------------------------------------------------------------------------------
class EdgeScorer(nn.Module):
    """Symmetric edge score of the stochastic edge-addition layer.

    ``s_uv = σ((MLP([h_u, h_v]) + MLP([h_v, h_u])) / 2)``, MLP = Linear–GELU–Linear, so
    ``s_uv = s_vu`` and one sample serves both directions of a pair. The final bias starts at
    0, so an untrained scorer gives ``s ≈ 0.5`` for every pair (see the module docstring).

    Parameters
    ----------
    hidden
        Node embedding width.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """``(n, hidden)`` node embeddings, ``(2, P)`` pairs → ``(P,)`` scores in (0, 1)."""
        # first layer split per endpoint: W·[h_u, h_v] = W_a·h_u + W_b·h_v, computed once
        # per node instead of once per pair (same function, far fewer FLOPs)
        first, rest = self.mlp[0], self.mlp[1:]
        d = h.shape[-1]
        a = nn.functional.linear(h, first.weight[:, :d], first.bias)
        b = nn.functional.linear(h, first.weight[:, d:])
        u, v = pairs
        logit = 0.5 * (rest(a[u] + b[v]) + rest(a[v] + b[u]))
        return torch.sigmoid(logit.squeeze(-1))


def sample_edges(
    probs: torch.Tensor, *, temperature: float, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw edges from scores (training) or threshold them (``training=False``).

    Returns
    -------
    weight, hard
        ``weight``: straight-through weights (forward value = ``hard``; gradient of the relaxed
        sample in training). ``hard``: bool, the accepted edges. Not training: ``s > 0.5``.
    """
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


def eval_weights(
    probs: torch.Tensor,
    mode: str,
    *,
    rate: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Edge weights of the candidates in one evaluation pass of ``mode``.

    ``sampled`` returns one hard Bernoulli(``s``) draw (the caller averages the passes).
    Weights are ``(P,)`` in ``probs``' dtype; a weight of 0 means "not added".
    """
    if mode == "expected":
        return probs
    if mode == "threshold":
        return (probs > 0.5).to(probs.dtype)
    if mode == "none":
        return torch.zeros_like(probs)
    if mode == "all":
        return torch.ones_like(probs)
    if mode in ("sampled", "random"):
        if probs.numel() == 0:
            return probs
        if mode == "sampled":
            p = probs.float()
        else:
            r = float(probs.float().mean()) if rate is None else float(rate)
            p = torch.full_like(probs, r, dtype=torch.float32)
        u = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float32)
        return (u < p).to(probs.dtype)
    raise SigmmaError(f"unknown edge mode {mode!r}; choose one of {', '.join(EDGE_MODES)}")


# ---------------------------------------------------------------------------------------
# the mode of a model
# ---------------------------------------------------------------------------------------
def _graph_encoder(model: Any) -> Any:
    """The hierarchical graph encoder of a SigmmaModel / an encoder itself, else None."""
    enc = getattr(model, "graph", model)
    return enc if hasattr(enc, "edge_mode") else None


def get_edge_mode(model: Any) -> dict[str, Any] | None:
    """``{"mode", "n_samples", "rate", "seed"}`` of a model's graph encoder (None: the model
    has no cell graph, e.g. the gene-vector ablation)."""
    enc = _graph_encoder(model)
    if enc is None:
        return None
    return {
        "mode": enc.edge_mode,
        "n_samples": enc.edge_samples,
        "rate": enc.edge_rate,
        "seed": enc.edge_seed,
    }


def set_edge_mode(
    model: Any,
    mode: str,
    *,
    n_samples: int = 8,
    rate: float | None = None,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Choose how a model's edge sampler builds its graphs at evaluation (not training).

    Parameters
    ----------
    model
        A :class:`~napari_sigmma.models.sigmma.SigmmaModel` or a graph encoder.
    mode
        One of :data:`EDGE_MODES`.
    n_samples
        Passes averaged by ``sampled``.
    rate
        Acceptance probability of ``random`` (None = the mean score of each stage's
        candidates).
    seed
        Seed of the draws of ``sampled`` and ``random`` (every forward call restarts it, so
        the same tiles give the same result).

    Returns
    -------
    dict or None
        The previous settings (pass them back as ``set_edge_mode(model, **prev)``), or None
        when the model has no cell graph (nothing to set).

    Models trained without sparsification have no scores: ``expected``, ``threshold`` and
    ``sampled`` then add every candidate (their trained graph); ``random`` needs ``rate``
    or adds every candidate.
    """
    if mode not in EDGE_MODES:
        raise SigmmaError(f"unknown edge mode {mode!r}; choose one of {', '.join(EDGE_MODES)}")
    if int(n_samples) < 1:
        raise SigmmaError(f"n_samples must be ≥ 1, got {n_samples}")
    if rate is not None and not 0.0 <= float(rate) <= 1.0:
        raise SigmmaError(f"rate must be in [0, 1], got {rate}")
    prev = get_edge_mode(model)
    enc = _graph_encoder(model)
    if enc is None:
        return None
    enc.edge_mode = mode
    enc.edge_samples = int(n_samples)
    enc.edge_rate = None if rate is None else float(rate)
    enc.edge_seed = int(seed)
    return prev


@contextlib.contextmanager
def edge_mode(model: Any, mode: str, **kw: Any) -> Iterator[None]:
    """``with edge_mode(model, "none"): ...`` — :func:`set_edge_mode`, restored on exit."""
    prev = set_edge_mode(model, mode, **kw)
    try:
        yield
    finally:
        if prev is not None:
            set_edge_mode(model, **prev)


# ---------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------
def sampler_diagnostics(
    model: Any, batches: Any, *, n_draws: int = 5, seed: int = 0
) -> dict[str, Any]:
    """How the edge sampler behaves on some tiles, per stage (``meso``, ``macro``).

    Parameters
    ----------
    model
        A SigmmaModel or a graph encoder (its training / eval state is restored after).
    batches
        A PyG ``Batch`` of tiles, or an iterable of them (pooled), on the model's device.
    n_draws
        Training-mode forwards averaged for ``accept_train``.
    seed
        Seed of those draws (the caller's RNG state is restored after).

    Returns
    -------
    dict
        ``{stage: {"accept_train", "accept_eval", "score_mean", "score_std",
        "frac_uncertain", "edges_per_node", "candidates_per_node", "n_candidates",
        "n_nodes", "mode"}}``; ``{"skipped": reason}`` for a model without a sampler.
        ``accept_train``: fraction of candidates accepted by training-mode sampling (mean
        over ``n_draws``); ``accept_eval``: mean edge weight of the candidates in the
        model's evaluation mode (for ``threshold`` the accepted fraction); scores are those
        of the evaluation pass; ``frac_uncertain``: scores in [0.4, 0.6];
        ``edges_per_node``: added edges per node in evaluation (weight sum of the added
        undirected edges × 2 / nodes, i.e. the mean added degree).
    """
    enc = _graph_encoder(model)
    if enc is None:
        return {"skipped": "the model has no cell graph"}
    if not enc.sparsify:
        return {"skipped": "the model adds every candidate (no sparsification): no scores"}
    if hasattr(batches, "x"):
        batches = [batches]
    acc: dict[str, dict[str, float]] = {
        s: {"n": 0.0, "cand": 0.0, "w": 0.0, "s1": 0.0, "s2": 0.0, "unc": 0.0, "train": 0.0}
        for s in STAGES
    }
    was = enc.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_devices(enc)):
            torch.manual_seed(int(seed))
            for batch in _iterate(batches):
                enc.eval()
                out = enc(batch)
                n_nodes = int(batch.x.shape[0])
                for s in STAGES:
                    st = out.sampler[s]
                    sc = st["score"].double()
                    a = acc[s]
                    a["n"] += n_nodes
                    a["cand"] += sc.numel()
                    a["w"] += float(st["weight"].double().sum())
                    a["s1"] += float(sc.sum())
                    a["s2"] += float((sc * sc).sum())
                    a["unc"] += float(((sc >= 0.5 - _UNCERTAIN) & (sc <= 0.5 + _UNCERTAIN)).sum())
                enc.train()
                for _ in range(int(n_draws)):
                    out = enc(batch)
                    for s in STAGES:
                        w = out.sampler[s]["weight"]
                        acc[s]["train"] += float(w.double().sum()) / max(int(n_draws), 1)
    finally:
        enc.train(was)
    res: dict[str, Any] = {}
    for s in STAGES:
        a = acc[s]
        c = max(a["cand"], 1.0)
        mean = a["s1"] / c
        var = max(a["s2"] / c - mean * mean, 0.0)
        res[s] = {
            "accept_train": a["train"] / c,
            "accept_eval": a["w"] / c,
            "score_mean": mean,
            "score_std": var**0.5,
            "frac_uncertain": a["unc"] / c,
            "edges_per_node": 2.0 * a["w"] / max(a["n"], 1.0),
            "candidates_per_node": 2.0 * a["cand"] / max(a["n"], 1.0),
            "n_candidates": int(a["cand"]),
            "n_nodes": int(a["n"]),
            "mode": enc.edge_mode,
        }
    return res


def _iterate(batches: Iterable[Any]) -> Iterator[Any]:
    yield from batches


def _devices(enc: Any) -> list[int]:
    """CUDA device indices of the encoder (whose RNG state :func:`sampler_diagnostics` forks)."""
    return sorted({p.device.index or 0 for p in enc.parameters() if p.device.type == "cuda"})
