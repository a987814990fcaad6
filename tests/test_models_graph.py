"""Hierarchical cell-graph encoder: block constraints of the edge sampler, straight-through
gradients, determinism, the dense ablation, the weighted GraphSAGE layer."""

from __future__ import annotations

import itertools

import pytest
import torch

from _models_data import make_batch, make_tile, one_thread
from napari_sigmma.errors import SigmmaError
from napari_sigmma.models.conv import WeightedSAGEConv
from napari_sigmma.models.edges import EdgeScorer, candidate_pairs, sample_edges, set_edge_mode
from napari_sigmma.models.graph import (
    GeneVectorEncoder,
    GraphOutput,
    HierarchicalGraphEncoder,
    micro_edges,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


F = 8


def _pairs_set(ei: torch.Tensor) -> set[tuple[int, int]]:
    return {(min(u, v), max(u, v)) for u, v in ei.t().tolist()}


def _encoder(**kw) -> HierarchicalGraphEncoder:
    torch.manual_seed(0)
    return HierarchicalGraphEncoder(F, 16, hidden=16, gnn_layers=(1, 1, 1), **kw)


def test_micro_edges_are_the_proximity_edges_inside_micro_blocks():
    b = make_batch()
    got = micro_edges(b.edge_index, b.micro, b.batch)
    ref = [
        [u, v]
        for u, v in b.edge_index.t().tolist()
        if b.micro[u] == b.micro[v] and b.batch[u] == b.batch[v]
    ]
    assert got.t().tolist() == ref
    assert 0 < got.shape[1] < b.edge_index.shape[1]


def test_candidate_pairs_respect_blocks_existing_edges_and_cap():
    b = make_batch((50, 30))
    group = b.batch * 4 + b.meso
    ex = micro_edges(b.edge_index, b.micro, b.batch)
    k = 3
    pairs = candidate_pairs(b.pos, group, k=k, existing=ex)
    assert pairs.shape[0] == 2 and pairs.shape[1] > 0
    u, v = pairs
    assert (u < v).all()
    assert (group[u] == group[v]).all()
    assert not (_pairs_set(pairs) & _pairs_set(ex))
    assert len(_pairs_set(pairs)) == pairs.shape[1]  # unique
    # every pair is among the k nearest allowed partners of one of its ends, and each node
    # proposes min(k, #allowed) partners
    n = b.pos.shape[0]
    exs = _pairs_set(ex)
    d = torch.cdist(b.pos, b.pos)
    nearest = {}
    for i in range(n):
        allowed = [
            j
            for j in range(n)
            if j != i and group[j] == group[i] and (min(i, j), max(i, j)) not in exs
        ]
        allowed.sort(key=lambda j: d[i, j].item())
        nearest[i] = set(allowed[:k])
        got = {b_ if a == i else a for a, b_ in pairs.t().tolist() if i in (a, b_)}
        assert nearest[i] <= got
    for a, c in pairs.t().tolist():
        assert c in nearest[a] or a in nearest[c]
    # no cap: all allowed pairs
    full = candidate_pairs(b.pos, group, k=None, existing=ex)
    ref = {
        (i, j)
        for i, j in itertools.combinations(range(n), 2)
        if group[i] == group[j] and (i, j) not in exs
    }
    assert _pairs_set(full) == ref


def test_candidate_pairs_forbid_same_label_and_small_chunks(monkeypatch):
    b = make_batch((40, 33, 20))
    pairs = candidate_pairs(b.pos, b.batch, k=5, forbid_same=b.meso)
    u, v = pairs
    assert (b.batch[u] == b.batch[v]).all() and (b.meso[u] != b.meso[v]).all()
    # the memory-bounded chunking over groups gives the same answer
    import napari_sigmma.models.edges as edges

    monkeypatch.setattr(edges, "_DENSE_BUDGET", 50)
    again = candidate_pairs(b.pos, b.batch, k=5, forbid_same=b.meso)
    assert torch.equal(pairs, again)


def _check_blocks(b, out: GraphOutput):
    mi, mi_p = out.edges["micro"]
    assert (b.micro[mi[0]] == b.micro[mi[1]]).all() and (mi_p == 1).all()
    me, me_p = out.edges["meso"]
    ma, ma_p = out.edges["macro"]
    # meso additions: same tile and same meso block; macro: same tile (never across tiles)
    assert (b.batch[me[0]] == b.batch[me[1]]).all()
    assert (b.meso[me[0]] == b.meso[me[1]]).all()
    assert (b.batch[ma[0]] == b.batch[ma[1]]).all()
    assert (b.meso[ma[0]] != b.meso[ma[1]]).all()  # documented: cross-meso pairs only
    # added edges are new, both directions are listed with the same probability
    assert not (_pairs_set(me) & _pairs_set(mi))
    assert not (_pairs_set(ma) & (_pairs_set(mi) | _pairs_set(me)))
    for ei, p in ((me, me_p), (ma, ma_p)):
        assert ei.shape[1] % 2 == 0 and p.shape == (ei.shape[1],)
        h = ei.shape[1] // 2
        assert torch.equal(ei[:, :h].flip(0), ei[:, h:]) and torch.equal(p[:h], p[h:])
        assert ((p > 0) & (p < 1)).all()


def test_training_sampler_respects_blocks_and_is_stochastic():
    b = make_batch()
    enc = _encoder().train()
    torch.manual_seed(1)
    o1 = enc(b)
    o2 = enc(b)
    _check_blocks(b, o1)
    _check_blocks(b, o2)
    assert o1.edges["meso"][0].shape[1] > 0 and o1.edges["macro"][0].shape[1] > 0
    # two draws pick different edge sets (scores start near 0.5), hence different embeddings
    assert _pairs_set(o1.edges["meso"][0]) != _pairs_set(o2.edges["meso"][0])
    assert not torch.allclose(o1.emb["macro"], o2.emb["macro"])
    assert set(o1.emb) == {"micro", "meso", "macro"}
    assert all(v.shape == (3, 16) for v in o1.emb.values())
    assert all(v.shape == (b.num_nodes, 16) for v in o1.nodes.values())


def test_eval_is_deterministic_and_thresholds_scores():
    b = make_batch()
    enc = _encoder().eval()
    set_edge_mode(enc, "threshold")
    with torch.no_grad():
        o1, o2 = enc(b), enc(b)
    _check_blocks(b, o1)
    for s in ("micro", "meso", "macro"):
        assert torch.equal(o1.emb[s], o2.emb[s])
        assert torch.equal(o1.edges[s][0], o2.edges[s][0])
    # eval keeps exactly the candidates scoring above 0.5
    with torch.no_grad():
        h = enc.gnn["micro"](enc.input(b.x), *_micro_graph(b))
        cand = candidate_pairs(
            b.pos,
            b.batch * 4 + b.meso,
            k=enc.cap,
            existing=micro_edges(b.edge_index, b.micro, b.batch),
        )
        s = enc.scorers["meso"](h, cand)
    assert _pairs_set(o1.edges["meso"][0]) == _pairs_set(cand[:, s > 0.5])
    assert (o1.edges["meso"][1] > 0.5).all()


def _micro_graph(b):
    ei = micro_edges(b.edge_index, b.micro, b.batch)
    return ei, torch.ones(ei.shape[1])


def test_straight_through_gradients_reach_the_edge_scorers():
    b = make_batch()
    enc = _encoder().train()
    torch.manual_seed(2)
    out = enc(b)
    target = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    loss = sum(((out.emb[s] - target) ** 2).sum() for s in ("meso", "macro"))
    loss.backward()
    for s in ("meso", "macro"):
        grads = [p.grad for p in enc.scorers[s].parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0, s
    # in eval (hard threshold, no relaxation) nothing flows to the scorer
    enc.zero_grad()
    enc.eval()
    set_edge_mode(enc, "threshold")
    out = enc(b)
    sum(v.sum() for v in out.emb.values()).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in enc.scorers.parameters())


def test_relaxed_bernoulli_acceptance_rate_equals_score():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.5, 0.8]).repeat_interleave(20000).requires_grad_(True)
    w, hard = sample_edges(probs, temperature=0.5, training=True)
    assert torch.equal(w.detach(), hard.float())  # straight-through: forward value is hard
    rate = hard.float().reshape(3, -1).mean(1)
    assert torch.allclose(rate, torch.tensor([0.1, 0.5, 0.8]), atol=0.015)
    w.sum().backward()
    assert probs.grad.abs().sum() > 0
    _, hard_eval = sample_edges(probs.detach(), temperature=0.5, training=False)
    assert torch.equal(hard_eval, probs.detach() > 0.5)


def test_sparsify_off_adds_every_candidate():
    b = make_batch((30, 22))
    enc = _encoder(sparsify=False, dense_k=None).train()
    assert enc.scorers is None
    out = enc(b)
    n = b.num_nodes
    mi = _pairs_set(out.edges["micro"][0])
    same_meso = {
        (i, j)
        for i, j in itertools.combinations(range(n), 2)
        if b.batch[i] == b.batch[j] and b.meso[i] == b.meso[j]
    }
    assert _pairs_set(out.edges["meso"][0]) == same_meso - mi
    same_tile = {(i, j) for i, j in itertools.combinations(range(n), 2) if b.batch[i] == b.batch[j]}
    assert _pairs_set(out.edges["macro"][0]) == same_tile - same_meso
    assert (out.edges["meso"][1] == 1).all() and (out.edges["macro"][1] == 1).all()
    # the final graph is the complete graph of each tile; training == eval (no sampling)
    with torch.no_grad():
        e1 = enc.eval()(b)
    assert torch.allclose(e1.emb["macro"], out.emb["macro"].detach(), atol=1e-6)
    # a cap keeps it bounded
    capped = _encoder(sparsify=False, dense_k=2).eval()(b)
    assert capped.edges["meso"][0].shape[1] < out.edges["meso"][0].shape[1]


def test_weighted_sage_layer():
    torch.manual_seed(0)
    conv = WeightedSAGEConv(4, 3)
    x = torch.randn(4, 4)
    ei = torch.tensor([[1, 2, 3], [0, 0, 0]])
    w = torch.tensor([1.0, 3.0, 0.0])
    out = conv(x, ei, w)
    agg = (1.0 * x[1] + 3.0 * x[2]) / 4.0
    assert torch.allclose(out[0], conv.lin(torch.cat([x[0], agg])), atol=1e-6)
    # a weight-0 edge is the same as no edge; a node without neighbours aggregates zeros
    out2 = conv(x, ei[:, :2], w[:2])
    assert torch.allclose(out, out2, atol=1e-6)
    assert torch.allclose(out[1], conv.lin(torch.cat([x[1], torch.zeros(4)])), atol=1e-6)


def test_isolated_nodes_tiles_without_edges_and_bad_settings():
    # a tile with one cell and one with two far-apart cells still embed
    from torch_geometric.data import Batch

    t1 = make_tile(1, seed=3)
    t2 = make_tile(2, seed=4)
    t3 = make_tile(12, seed=5)
    b = Batch.from_data_list([t1, t2, t3])
    for mode in (True, False):
        out = _encoder().train(mode)(b)
        assert all(torch.isfinite(v).all() and v.shape == (3, 16) for v in out.emb.values())
    with pytest.raises(SigmmaError, match="gnn_layers"):
        HierarchicalGraphEncoder(F, 16, gnn_layers=(1, 0, 1))
    with pytest.raises(SigmmaError, match="width"):
        _encoder()(make_batch(n_features=F + 1))


def test_gene_vector_encoder():
    b = make_batch(n_genes=12)
    torch.manual_seed(0)
    enc = GeneVectorEncoder(12, 16, hidden=8)
    out = enc(b)
    assert set(out.emb) == {"micro", "meso", "macro"}
    assert out.emb["micro"].shape == (3, 16)
    assert out.emb["micro"] is out.emb["macro"]
    assert torch.allclose(out.emb["meso"][1], enc(b.genevec[1:2]).emb["meso"][0])
    assert out.nodes == {} and out.edges == {}
    with pytest.raises(SigmmaError, match="genes"):
        enc(torch.zeros(2, 5))


def test_edge_scorer_is_the_symmetric_mlp_of_the_paper():
    torch.manual_seed(0)
    sc = EdgeScorer(16)
    h = torch.randn(10, 16)
    pairs = torch.tensor([[0, 1, 2, 7], [3, 4, 5, 9]])
    u, v = pairs
    ref = torch.sigmoid(
        0.5
        * (sc.mlp(torch.cat([h[u], h[v]], -1)) + sc.mlp(torch.cat([h[v], h[u]], -1))).squeeze(-1)
    )
    got = sc(h, pairs)
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.allclose(got, sc(h, pairs.flip(0)), atol=1e-6)
