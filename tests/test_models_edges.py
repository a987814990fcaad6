"""The edge sampler's public API: evaluation modes, set_edge_mode, all-pairs candidates,
the scorer's initialisation and the diagnostics (real encoders on small PyG batches)."""

from __future__ import annotations

import itertools

import pytest
import torch

from _models_data import make_batch, one_thread
from napari_sigmma.errors import SigmmaError
from napari_sigmma.models.edges import (
    DEFAULT_EDGE_MODE,
    EDGE_MODES,
    edge_mode,
    get_edge_mode,
    sampler_diagnostics,
    set_edge_mode,
)
from napari_sigmma.models.graph import GeneVectorEncoder, HierarchicalGraphEncoder, micro_edges


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


F = 8


def _encoder(seed: int = 0, **kw) -> HierarchicalGraphEncoder:
    torch.manual_seed(seed)
    return HierarchicalGraphEncoder(F, 16, hidden=16, gnn_layers=(1, 1, 1), **kw).eval()


def _pairs(ei: torch.Tensor) -> set[tuple[int, int]]:
    return {(min(u, v), max(u, v)) for u, v in ei.t().tolist()}


def test_uncapped_candidates_cover_every_pair_of_a_block():
    b = make_batch((40, 25, 60))
    enc = _encoder()
    assert enc.candidate_k is None and enc.cap == 256  # all pairs; the guard is far above
    with torch.no_grad():
        out = enc(b)
    n = b.num_nodes
    mi = _pairs(micro_edges(b.edge_index, b.micro, b.batch))
    same_tile = {(i, j) for i, j in itertools.combinations(range(n), 2) if b.batch[i] == b.batch[j]}
    same_meso = {(i, j) for i, j in same_tile if b.meso[i] == b.meso[j]}
    assert _pairs(out.sampler["meso"]["pairs"]) == same_meso - mi
    assert _pairs(out.sampler["macro"]["pairs"]) == same_tile - same_meso
    # the memory guard caps a node's proposals only when its block is larger
    capped = _encoder(candidate_cap=5)
    with torch.no_grad():
        c = capped(b)
    assert 0 < c.sampler["meso"]["pairs"].shape[1] < out.sampler["meso"]["pairs"].shape[1]


def test_evaluation_modes():
    b = make_batch()
    enc = _encoder()
    res = {}
    for mode in EDGE_MODES:
        set_edge_mode(enc, mode, n_samples=4, seed=3)
        with torch.no_grad():
            res[mode] = enc(b), enc(b)
    for mode, (o1, o2) in res.items():  # every mode is repeatable (seeded draws)
        for s in ("micro", "meso", "macro"):
            assert torch.equal(o1.emb[s], o2.emb[s]), (mode, s)
    for s in ("meso", "macro"):
        score = res["expected"][0].sampler[s]["score"]
        w = {m: res[m][0].sampler[s]["weight"] for m in EDGE_MODES}
        assert torch.equal(w["expected"], score)
        assert torch.equal(w["threshold"], (score > 0.5).float())
        assert (w["none"] == 0).all() and (w["all"] == 1).all()
        assert set(w["random"].unique().tolist()) <= {0.0, 1.0}
        # sampled: mean of 4 hard draws per candidate
        assert torch.allclose(w["sampled"] * 4, (w["sampled"] * 4).round())
        assert res["none"][0].edges[s][0].shape[1] == 0
        assert _pairs(res["all"][0].edges[s][0]) == _pairs(res["all"][0].sampler[s]["pairs"])
    # no added edges: meso / macro see G_micro only, so they differ from the full graph
    assert not torch.allclose(res["none"][0].emb["macro"], res["all"][0].emb["macro"])
    assert torch.equal(res["none"][0].emb["micro"], res["all"][0].emb["micro"])
    # sampled differs from one draw; another seed gives another draw
    set_edge_mode(enc, "sampled", n_samples=4, seed=4)
    with torch.no_grad():
        other = enc(b)
    assert not torch.equal(other.emb["macro"], res["sampled"][0].emb["macro"])


def test_random_mode_rate():
    b = make_batch((120, 90))
    enc = _encoder()
    with edge_mode(enc, "random", rate=0.2, seed=1), torch.no_grad():
        w = enc(b).sampler["macro"]["weight"]
    assert abs(float(w.mean()) - 0.2) < 0.03
    with edge_mode(enc, "random"), torch.no_grad():  # rate None: the mean score
        out = enc(b)
    st = out.sampler["macro"]
    assert abs(float(st["weight"].mean()) - float(st["score"].mean())) < 0.03
    assert get_edge_mode(enc)["mode"] == DEFAULT_EDGE_MODE  # restored


def test_set_edge_mode_api():
    enc = _encoder()
    assert enc.edge_mode == DEFAULT_EDGE_MODE == "expected"
    prev = set_edge_mode(enc, "threshold")
    assert prev == {"mode": "expected", "n_samples": 8, "rate": None, "seed": 0}
    assert get_edge_mode(enc)["mode"] == "threshold"
    with edge_mode(enc, "none"):
        assert enc.edge_mode == "none"
    assert enc.edge_mode == "threshold"
    bad_calls = (
        {"mode": "nope"},
        {"mode": "random", "rate": 1.5},
        {"mode": "sampled", "n_samples": 0},
    )
    for bad in bad_calls:
        with pytest.raises(SigmmaError):
            set_edge_mode(enc, **bad)
    # a model without a cell graph: nothing to set
    assert set_edge_mode(GeneVectorEncoder(5, 4), "none") is None

    class Wrapper(torch.nn.Module):  # a SigmmaModel holds its encoder as .graph
        def __init__(self):
            super().__init__()
            self.graph = enc

    set_edge_mode(Wrapper(), "all")
    assert enc.edge_mode == "all"
    # dense (no sparsification) models: score modes add every candidate
    dense = _encoder(sparsify=False)
    b = make_batch((30, 20))
    with torch.no_grad():
        full = dense(b)
        with edge_mode(dense, "none"):
            none = dense(b)
    assert (full.sampler["meso"]["weight"] == 1).all()
    assert (none.sampler["meso"]["weight"] == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_untrained_sampler_starts_consistent(seed):
    """Final bias 0 → s ≈ 0.5: training accepts about half the candidates and the default
    evaluation mode gives them the same expected weight (threshold would keep 0 % or 100 %
    of them: the scores barely spread around 0.5)."""
    b = make_batch((60, 45, 80), n_features=F)
    enc = _encoder(seed)
    assert float(enc.scorers["meso"].mlp[2].bias.detach()) == 0.0
    d = sampler_diagnostics(enc, b, n_draws=3)
    for s in ("meso", "macro"):
        x = d[s]
        assert abs(x["score_mean"] - 0.5) < 0.05 and x["frac_uncertain"] > 0.99
        assert abs(x["accept_train"] - 0.5) < 0.05
        assert abs(x["accept_eval"] - x["accept_train"]) < 0.1
        assert x["edges_per_node"] == pytest.approx(x["accept_eval"] * x["candidates_per_node"])
    assert not enc.training  # state restored


def test_sampler_diagnostics_keys_and_pooling():
    enc = _encoder()
    b1, b2 = make_batch((40, 25)), make_batch((60,))
    keys = {"accept_train", "accept_eval", "score_mean", "score_std", "frac_uncertain",
            "edges_per_node"}  # fmt: skip
    d = sampler_diagnostics(enc, [b1, b2], n_draws=2)
    assert set(d) == {"meso", "macro"}
    for s in d:
        assert keys <= set(d[s])
        assert all(0 <= d[s][k] <= 1 for k in ("accept_train", "accept_eval", "frac_uncertain"))
        assert d[s]["n_nodes"] == 125
    one = sampler_diagnostics(enc, b1, n_draws=2)
    assert one["meso"]["n_candidates"] < d["meso"]["n_candidates"]
    # the caller's RNG is untouched
    torch.manual_seed(5)
    a = torch.rand(1)
    torch.manual_seed(5)
    sampler_diagnostics(enc, b1, n_draws=1)
    assert torch.equal(torch.rand(1), a)
    assert "skipped" in sampler_diagnostics(GeneVectorEncoder(5, 4), b1)
    assert "skipped" in sampler_diagnostics(_encoder(sparsify=False), b1)
