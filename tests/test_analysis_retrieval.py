"""Retrieval index: exact top-k, persistence without pickle, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sigmma.errors import SigmmaError
from napari_sigmma.retrieval.index import EmbeddingIndex


def test_topk_matches_brute_force_across_slides() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(200, 16))
    index = EmbeddingIndex(16, use_faiss=False)
    index.add("slide_a", np.arange(300), a)
    index.add("slide_b", np.arange(1000, 1200), b)
    q = rng.normal(size=16)
    got = index.query(q, k=7)
    allv = np.concatenate([a, b])
    sims = (allv / np.linalg.norm(allv, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    order = np.argsort(-sims)[:7]
    expect = [("slide_a", int(i)) if i < 300 else ("slide_b", int(1000 + i - 300)) for i in order]
    assert [(s, t) for s, t, _ in got] == expect
    assert np.allclose([c for *_, c in got], sims[order], atol=1e-5)
    # a stored vector finds itself first with cosine 1
    assert index.query(b[5], k=1)[0][:2] == ("slide_b", 1005)


def test_save_load_round_trip_no_pickle(tmp_path) -> None:
    rng = np.random.default_rng(1)
    index = EmbeddingIndex(8, use_faiss=False)
    index.add("s", np.arange(50), rng.normal(size=(50, 8)))
    path = index.save(tmp_path / "index.npz")
    again = EmbeddingIndex.load(path, use_faiss=False)
    q = rng.normal(size=8)
    assert again.query(q, 5) == index.query(q, 5)
    # an object array would need pickle: loading must refuse it, not execute anything
    bad = tmp_path / "bad.npz"
    np.savez(bad, matrix=np.array([{"x": 1}], dtype=object))
    with pytest.raises(SigmmaError, match=r"bad\.npz"):
        EmbeddingIndex.load(bad)


def test_bad_embeddings_are_refused() -> None:
    index = EmbeddingIndex(4, use_faiss=False)
    with pytest.raises(SigmmaError, match="dim 4"):
        index.add("s", np.arange(2), np.zeros((2, 5)))
    with pytest.raises(SigmmaError, match="NaN"):
        index.add("s", np.arange(1), np.array([[np.nan, 0, 0, 1]]))
    assert index.query(np.ones(4)) == []
