"""IVF search of the retrieval index: recall against exact search, growth after training,
persistence without pickle, exact mode and bad queries, and builds in another thread than
the queries (a query never waits for a build). No timing is asserted."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from napari_sigmma.bench.scale import clustered_embeddings, retrieval_scale
from napari_sigmma.errors import Cancelled, SigmmaError
from napari_sigmma.retrieval.index import EmbeddingIndex, spherical_kmeans


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(data: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    sims = _unit(data) @ (q / np.linalg.norm(q))
    return np.argsort(-sims, kind="stable")[:k]


def _keys(hits: list[tuple[str, int, float]]) -> set[tuple[str, int]]:
    return {(s, t) for s, t, _ in hits}


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """60,000 stored 32-d tile-like embeddings (300 clusters) and 100 fresh queries."""
    kw = {"n_clusters": 300, "n_types": 12, "seed": 3}
    return (
        clustered_embeddings(60_000, 32, draw=0, **kw),
        clustered_embeddings(100, 32, draw=1, **kw),
    )


@pytest.fixture(scope="module")
def ivf_index(clustered: tuple[np.ndarray, np.ndarray]) -> EmbeddingIndex:
    data, _ = clustered
    index = EmbeddingIndex(32, use_faiss=False)
    index.add("a", np.arange(30_000), data[:30_000])
    index.add("b", np.arange(30_000), data[30_000:])
    index.query(data[0])  # trains lazily (60k >= the default threshold)
    return index


def test_small_index_is_exact_and_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2000, 24))
    index = EmbeddingIndex(24, use_faiss=False)
    index.add("s", np.arange(2000), data)
    for q in rng.normal(size=(5, 24)):
        hits = index.query(q, k=10)
        assert not index.is_ivf
        assert [t for _, t, _ in hits] == _brute_force(data, q, 10).tolist()
        assert hits == index.query(q, k=10, exact=True)


def test_exact_mode_of_a_trained_index_matches_brute_force(
    ivf_index: EmbeddingIndex, clustered: tuple[np.ndarray, np.ndarray]
) -> None:
    data, queries = clustered
    assert ivf_index.is_ivf and 100 <= ivf_index.ivf_lists <= 1000
    for q in queries[:5]:
        expect = _brute_force(data, q, 10)
        keys = [("a", int(i)) if i < 30_000 else ("b", int(i) - 30_000) for i in expect]
        hits = ivf_index.query(q, k=10, exact=True)
        assert [(s, t) for s, t, _ in hits] == keys
        cos = _unit(data[expect]) @ (q / np.linalg.norm(q))
        np.testing.assert_allclose([c for *_, c in hits], cos, atol=1e-5)


def test_ivf_recall_on_clustered_embeddings(
    ivf_index: EmbeddingIndex, clustered: tuple[np.ndarray, np.ndarray]
) -> None:
    data, queries = clustered
    # the IVF must search only part of the index for this to test anything
    assert ivf_index.effective_nprobe < ivf_index.ivf_lists / 4
    recall = [
        len(_keys(ivf_index.query(q, 10)) & _keys(ivf_index.query(q, 10, exact=True))) / 10
        for q in queries
    ]
    assert np.mean(recall) >= 0.95
    # a stored vector finds itself first
    for i in (0, 12_345, 45_678):
        s, t, c = ivf_index.query(data[i], k=1)[0]
        assert (s, t) == (("a", i) if i < 30_000 else ("b", i - 30_000)) and c > 0.9999


def test_nprobe_is_a_real_knob(ivf_index: EmbeddingIndex, clustered) -> None:
    _, queries = clustered
    q = queries[0]
    everything = ivf_index.query(q, 10, nprobe=ivf_index.ivf_lists)
    exact = ivf_index.query(q, 10, exact=True)
    assert [h[:2] for h in everything] == [h[:2] for h in exact]
    np.testing.assert_allclose([h[2] for h in everything], [h[2] for h in exact], atol=1e-5)
    one = ivf_index.query(q, 10, nprobe=1)
    assert len(one) == 10  # lists are probed until k rows are found


def test_items_added_after_training_are_found(clustered) -> None:
    data, queries = clustered
    index = EmbeddingIndex(32, use_faiss=False, ivf_min_size=20_000)
    index.add("a", np.arange(40_000), data[:40_000])
    index.query(queries[0])
    lists, trained = index.ivf_lists, index.build_seconds
    assert index.is_ivf
    # grow by less than 2x: the new rows join their nearest lists (tail, then merged)
    index.add("late", np.arange(5000), data[40_000:45_000])
    for i in (0, 1234, 4999):
        assert index.query(data[40_000 + i], k=1)[0][:2] == ("late", i)
    index.add("later", np.arange(15_000), data[45_000:])
    assert index.ivf_lists == lists and index.build_seconds == trained  # not retrained
    for i in (0, 7777, 14_999):
        assert index.query(data[45_000 + i], k=1)[0][:2] == ("later", i)
    assert len(index) == 60_000
    recall = [
        len(_keys(index.query(q, 10)) & _keys(index.query(q, 10, exact=True))) / 10
        for q in queries[:40]
    ]
    assert np.mean(recall) >= 0.95
    # doubling the size since training retrains the quantiser
    index.add("double", np.arange(30_000), data[:30_000] + 0.01)
    index.query(queries[0])
    assert index.ivf_lists > lists and len(index) == 90_000


def test_save_load_round_trip_keeps_the_ivf(tmp_path, clustered) -> None:
    data, queries = clustered
    ivf_index = EmbeddingIndex(32, use_faiss=False, ivf_min_size=20_000)
    ivf_index.add("a", np.arange(50_000), data[:50_000])
    ivf_index.build_ivf()
    ivf_index.add("tail", np.arange(100), data[50_000:50_100])  # a tail is saved too
    path = ivf_index.save(tmp_path / "ivf.npz")
    with np.load(path, allow_pickle=False) as z:
        assert {"ivf_centroids", "ivf_row_lists", "ivf_state"} <= set(z.files)
        assert int(z["index_format"]) == 2 and z["ivf_row_lists"].shape == (50_000,)
    again = EmbeddingIndex.load(path, use_faiss=False)
    assert again.is_ivf and again.ivf_lists == ivf_index.ivf_lists
    assert again.effective_nprobe == ivf_index.effective_nprobe
    for q in queries[:20]:
        assert again.query(q, 10) == ivf_index.query(q, 10)
        assert again.query(q, 10, exact=True) == ivf_index.query(q, 10, exact=True)
    # a file whose IVF arrays disagree with its matrix is refused, naming the file
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["ivf_row_lists"] = arrays["ivf_row_lists"][:-1]
    bad = tmp_path / "bad_ivf.npz"
    np.savez(bad, **arrays)
    with pytest.raises(SigmmaError, match=r"bad_ivf\.npz"):
        EmbeddingIndex.load(bad)


def test_an_index_saved_by_the_numpy_ivf_loads_without_retraining(tmp_path, clustered) -> None:
    """Files of the hand-written numpy IVF used before faiss (rows sorted by list, a tail)
    load into the faiss index with the same lists: same nprobe, no build, and the same
    results as the numpy IVF gave (both scan the same lists exactly)."""
    from napari_sigmma.bench.ivf_numpy import NumpyIVFIndex

    data, queries = clustered
    old = NumpyIVFIndex(32, use_faiss=False, ivf_min_size=20_000)
    old.add("a", np.arange(50_000), data[:50_000])
    old.build_ivf()
    old.add("tail", np.arange(100), data[50_000:50_100])
    path = old.save(tmp_path / "numpy_ivf.npz")
    with np.load(path, allow_pickle=False) as z:
        assert {"ivf_offsets", "ivf_tail_lists"} <= set(z.files) and "index_format" not in z
    new = EmbeddingIndex.load(path)
    assert new.is_ivf and new.ivf_lists == old.ivf_lists and not new.builds
    assert new.effective_nprobe == old.effective_nprobe and len(new) == 50_100
    assert not new.needs_build()
    for q in queries[:20]:
        got, want = new.query(q, 10), old.query(q, 10)
        assert [h[:2] for h in got] == [h[:2] for h in want]
        np.testing.assert_allclose([h[2] for h in got], [h[2] for h in want], atol=1e-5)
    assert new.query(data[50_042], k=1)[0][:2] == ("tail", 42)
    # an index saved before any IVF loads untrained and trains at its first query
    flat = tmp_path / "flat.npz"
    with np.load(path, allow_pickle=False) as z:
        np.savez(flat, **{k: z[k] for k in ("matrix", "tile_ids", "slide_ids", "slide_names")})
    lazy = EmbeddingIndex.load(flat, ivf_min_size=20_000)
    assert not lazy.is_ivf and lazy.needs_build()
    lazy.query(queries[0])
    assert lazy.is_ivf and [b["kind"] for b in lazy.builds] == ["train"]


def test_bad_queries_raise_sigmma_error(ivf_index: EmbeddingIndex) -> None:
    small = EmbeddingIndex(4, use_faiss=False)
    small.add("s", np.arange(3), np.eye(3, 4))
    for index, dim in ((small, 4), (ivf_index, 32)):
        with pytest.raises(SigmmaError, match=f"dim {dim}"):
            index.query(np.ones(dim + 1))
        nan = np.ones(dim)
        nan[1] = np.nan
        with pytest.raises(SigmmaError, match="NaN"):
            index.query(nan)
        with pytest.raises(SigmmaError, match="NaN"):
            index.query(np.full(dim, np.inf), exact=True)
    with pytest.raises(SigmmaError, match="empty"):
        EmbeddingIndex(4, use_faiss=False).build_ivf()


def test_spherical_kmeans_is_a_lloyd_fixed_point() -> None:
    rng = np.random.default_rng(5)
    centres = _unit(rng.normal(size=(6, 16)))
    x = _unit(np.repeat(centres, 200, axis=0) + 0.05 * rng.normal(size=(1200, 16)))
    x = x.astype(np.float32)
    found = spherical_kmeans(x, 6, n_iter=20, seed=0)
    assert found.shape == (6, 16)
    np.testing.assert_array_equal(found, spherical_kmeans(x, 6, n_iter=20, seed=0))
    np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1, atol=1e-5)
    # converged: each centroid is the mean direction of the rows nearest to it
    lab = np.argmax(x @ found.T, axis=1)
    for j in range(6):
        members = x[lab == j]
        assert members.shape[0] > 0
        assert float(_unit(members.mean(0, keepdims=True))[0] @ found[j]) > 0.9999
    # one cluster: the mean direction of everything
    one = spherical_kmeans(x, 1, seed=0)[0]
    assert float(_unit(x.mean(0, keepdims=True))[0] @ one) > 0.9999


def test_retrieval_scale_reports_ivf_and_exact_on_the_same_queries() -> None:
    r = retrieval_scale(12_000, 16, n_queries=20, ivf_min_size=5000)
    assert r["backend"] == "ivf" and r["data"] == "clustered" and r["n_lists"] > 0
    assert 0 < r["median_ms"] <= r["p99_ms"] and 0 < r["exact_median_ms"] <= r["exact_p99_ms"]
    assert 0.9 <= r["recall_at_k"] <= 1 and r["build_seconds"] > 0
    o = r["numpy_ivf"]  # the hand-written IVF, on the same data and queries
    assert o["backend"] == "ivf" and o["n_embeddings"] == r["n_embeddings"] == 12_000
    assert 0.9 <= o["recall_at_k"] <= 1 and o["build_seconds"] > 0 and o["median_ms"] > 0
    g = retrieval_scale(12_000, 16, data="gaussian", n_queries=10, ivf_min_size=5000)
    assert g["data"] == "gaussian" and 0 <= g["recall_at_k"] <= 1
    assert g["topk_cos_median"] < r["topk_cos_median"]  # noise has no close neighbours


# -- builds off the querying thread ---------------------------------------------------------------
def test_a_query_during_a_build_is_exact_and_does_not_wait() -> None:
    """One thread builds the IVF (60k × 64), another queries: the query searches every row
    exactly and returns while the build is still running; rows added during the build are
    found at once and join the IVF when it is installed."""
    rng = np.random.default_rng(11)
    data = rng.normal(size=(60_000, 64)).astype(np.float32)
    index = EmbeddingIndex(64, use_faiss=False, build_in_query=False)
    index.add("r", np.arange(60_000), data)
    assert index.needs_build() and not index.is_ivf and not index.building
    # the build polls its cancel hook between k-means iterations and assignment blocks:
    # this one holds the build there until released, so it is surely mid-way
    inside, release = threading.Event(), threading.Event()

    def hold() -> bool:
        inside.set()
        release.wait(30)
        return False

    builder = threading.Thread(target=index.ensure_built, args=(hold,), name="ivf-builder")
    builder.start()
    try:
        assert inside.wait(30) and index.building
        queries = rng.normal(size=(5, 64)).astype(np.float32)
        got: list[list[tuple[str, int, float]]] = []
        asker = threading.Thread(target=lambda: got.extend(index.query(q, 10) for q in queries))
        asker.start()
        asker.join(20)
        assert not asker.is_alive() and len(got) == 5  # answered; the build is still held
        assert index.building and not index.is_ivf
        for q, hits in zip(queries, got, strict=True):
            assert [t for _, t, _ in hits] == _brute_force(data, q, 10).tolist()
        # rows added mid-build are searched (exactly) at once
        late = rng.normal(size=(50, 64)).astype(np.float32)
        index.add("late", np.arange(50), late)
        assert index.query(late[7], k=1)[0][:2] == ("late", 7)
    finally:
        release.set()
        builder.join(60)
    assert not builder.is_alive() and not index.building
    assert index.is_ivf and index.last_build_thread == "ivf-builder"
    assert [b["kind"] for b in index.builds] == ["train"] and index.builds[0]["rows"] == 60_000
    assert len(index) == 60_050 and not index.needs_build()
    for i in (0, 7, 49):  # the late rows went to the new lists' tail
        assert index.query(late[i], k=1)[0][:2] == ("late", i)

    # unheld: queries keep being answered (exactly) while a retrain runs in a thread
    builder = threading.Thread(target=index.build_ivf, name="ivf-rebuilder")
    exact_ms, during = [], 0
    builder.start()
    while builder.is_alive():
        q = rng.normal(size=64).astype(np.float32)
        t0 = time.perf_counter()
        hits = index.query(q, 10, exact=True)
        exact_ms.append(1000 * (time.perf_counter() - t0))
        during += index.building
        assert [h[2] for h in hits] == sorted((h[2] for h in hits), reverse=True)
    builder.join()
    assert during >= 1  # at least one query ended before the build did
    assert index.last_build_thread == "ivf-rebuilder" and len(index.builds) == 2
    print(
        f"\n60k×64 build {index.build_seconds:.2f} s; {len(exact_ms)} exact queries during "
        f"it, median {np.median(exact_ms):.1f} ms, max {max(exact_ms):.1f} ms"
    )


def test_a_cancelled_build_leaves_the_index_as_it_was(clustered) -> None:
    data, queries = clustered
    index = EmbeddingIndex(32, use_faiss=False, build_in_query=False)
    index.add("a", np.arange(60_000), data)
    polls: list[int] = []

    def stop_after_three() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(Cancelled):
        index.ensure_built(stop_after_three)
    assert len(polls) == 4 and not index.is_ivf and not index.building and not index.builds
    assert index.needs_build()
    exact = index.query(queries[0], 10)  # still answered, exactly
    assert [t for _, t, _ in exact] == _brute_force(data, queries[0], 10).tolist()


def test_ensure_built_in_a_thread_gives_the_lazy_index(
    ivf_index: EmbeddingIndex, clustered: tuple[np.ndarray, np.ndarray]
) -> None:
    """``build_in_query=False``: queries never build; ensure_built (here in a worker thread)
    gives the same IVF, hence the same results and recall, as the lazily trained index;
    doubling the index waits for the next ensure_built, the old IVF serving meanwhile."""
    data, queries = clustered
    index = EmbeddingIndex(32, use_faiss=False, build_in_query=False)
    index.add("a", np.arange(30_000), data[:30_000])
    index.add("b", np.arange(30_000), data[30_000:])
    assert index.query(queries[0], 10) == index.query(queries[0], 10, exact=True)
    assert not index.is_ivf and not index.builds  # the query did not build
    worker = threading.Thread(target=index.ensure_built, name="prepare-worker")
    worker.start()
    worker.join(60)
    assert index.is_ivf and index.last_build_thread == "prepare-worker"
    assert index.ivf_lists == ivf_index.ivf_lists
    assert index.effective_nprobe == ivf_index.effective_nprobe < index.ivf_lists / 4
    for q in queries[:20]:
        assert index.query(q, 10) == ivf_index.query(q, 10)
    recall = [
        len(_keys(index.query(q, 10)) & _keys(index.query(q, 10, exact=True))) / 10 for q in queries
    ]
    assert np.mean(recall) >= 0.95
    assert not index.ensure_built()  # nothing due
    lists = index.ivf_lists
    index.add("double", np.arange(60_000), data + 0.01)
    assert index.needs_build()
    for i in (0, 31_000):  # the old IVF (new rows in its tail) serves meanwhile
        assert index.query(data[i] + 0.01, k=1)[0][:2] == ("double", i)
    assert index.ivf_lists == lists and len(index.builds) == 1
    assert index.ensure_built() and index.ivf_lists > lists and not index.needs_build()
    assert index.last_build_thread == threading.current_thread().name
