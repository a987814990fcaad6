"""Live engine, Qt-free: visible tiles, caches, clusters, gene head, and the engine on a real
tiny model over real tiles of the embedded sample."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sigmma.analysis.clusters import (
    MICRO_TO_MESO,
    cluster_colour,
    contingency,
    fit_clusters,
    match_labels,
)
from napari_sigmma.errors import SigmmaError
from napari_sigmma.live.cache import DiskCache, MemoryLRU, TileResult
from napari_sigmma.live.visible import clip_box, visible_indices, visible_tiles
from napari_sigmma.tiles.grid import _make


def _grid(n_rows: int = 6, n_cols: int = 8, drop: tuple[tuple[int, int], ...] = ()):
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    keep = np.ones(rr.shape, bool)
    for r, c in drop:
        keep[r, c] = False
    # 256 px at 0.5 µm/px on a 0.25 µm/px slide: tiles of 512 level-0 px
    return _make(256, 0.5, 0.25, rr[keep], cc[keep], n_rows, n_cols, np.ones(keep.sum()))


# -- visible tiles ----------------------------------------------------------------------
def test_visible_tiles_exact_overlap_and_centre_first() -> None:
    g = _grid(drop=((2, 3),))
    assert g.tile_size == 512
    # box from the middle of tile (1, 2) to the middle of tile (3, 4)
    box = (2 * 512 + 256, 1 * 512 + 100, 4 * 512 + 10, 3 * 512 + 500)
    ids = visible_tiles(g, box)
    expected = {f"r{r}_c{c}" for r in (1, 2, 3) for c in (2, 3, 4)} - {"r2_c3"}
    assert set(ids) == expected and len(ids) == len(expected)
    # the tile nearest the box centre comes first, the corners last
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    d = [
        np.hypot(
            g.bounds[g.index_of(*map(int, t[1:].split("_c")))][[0, 2]].mean() - centre[0],
            g.bounds[g.index_of(*map(int, t[1:].split("_c")))][[1, 3]].mean() - centre[1],
        )
        for t in ids
    ]
    assert d == sorted(d)
    # touching an edge with zero area is not visible; a box exactly on a tile is one tile
    assert visible_tiles(g, (512, 512, 1024, 1024)) == ["r1_c1"]
    assert visible_tiles(g, (1024, 0, 1024, 4000)) == []
    # fully outside or degenerate
    assert visible_indices(g, (-500, -500, -1, -1)).size == 0
    assert visible_indices(g, (10, 10, 5, 20)).size == 0
    # everything
    assert len(visible_tiles(g, (0, 0, 1e9, 1e9))) == len(g)


def test_clip_box_to_slide() -> None:
    assert clip_box((-10, -5, 5000, 300), (1000, 2000)) == (0.0, 0.0, 2000.0, 300.0)


# -- caches -----------------------------------------------------------------------------
def _result(tile_id: str, index: int, n: int = 5, d: int = 8, seed: int = 0) -> TileResult:
    rng = np.random.default_rng(seed)
    cells = np.arange(index * 100, index * 100 + n)
    return TileResult(
        tile_id=tile_id,
        index=index,
        he={s: rng.normal(size=d).astype(np.float32) for s in ("micro", "meso", "macro")},
        he_crops=rng.normal(size=(21, d)).astype(np.float32),
        st={s: rng.normal(size=d).astype(np.float32) for s in ("micro", "meso", "macro")}
        if n
        else None,
        nodes={s: rng.normal(size=(n, d)).astype(np.float32) for s in ("micro", "meso", "macro")}
        if n
        else {},
        cell_index=cells,
        cell_micro=rng.integers(0, 16, size=n),
        edges={
            "micro": (np.stack([cells[:-1], cells[1:]], 1), np.ones(max(n - 1, 0), np.float32)),
            "meso": (cells[[0]].reshape(1, 1).repeat(2, 1), np.array([0.7], np.float32)),
        }
        if n
        else {},
        attention=rng.random((3, 14, 14)).astype(np.float32),
    )


def test_memory_lru_is_bounded_and_keeps_recent() -> None:
    lru = MemoryLRU(max_items=3)
    for i in range(5):
        lru.put(_result(f"t{i}", i))
    assert len(lru) == 3 and lru.keys() == ["t2", "t3", "t4"]
    assert lru.get("t2") is not None  # touch: t2 becomes the most recent
    lru.put(_result("t5", 5))
    assert lru.keys() == ["t4", "t2", "t5"]
    assert lru.get("t3") is None
    # byte bound
    one = _result("a", 0).nbytes
    lru = MemoryLRU(max_items=100, max_bytes=int(2.5 * one))
    for i in range(6):
        lru.put(_result(f"b{i}", i))
    assert len(lru) == 2 and lru.nbytes <= 2.5 * one


def test_disk_cache_round_trip_and_restart(tmp_path) -> None:
    a = _result("r1_c2", 7)
    empty = _result("r0_c0", 0, n=0)
    empty.attention = None
    cache = DiskCache(tmp_path, "slide-abc", "ckpt123")
    cache.put(a)
    cache.put(empty)
    assert cache.has("r1_c2") and not cache.has("r9_c9")
    # a new instance (a restart) sees the files
    again = DiskCache(tmp_path, "slide-abc", "ckpt123")
    assert again.tile_ids() == {"r1_c2", "r0_c0"}
    b = again.get("r1_c2")
    assert b is not None and b.tile_id == "r1_c2" and b.index == 7
    for s in a.he:
        np.testing.assert_array_equal(a.he[s], b.he[s])
        np.testing.assert_array_equal(a.nodes[s], b.nodes[s])
    np.testing.assert_array_equal(a.he_crops, b.he_crops)
    np.testing.assert_array_equal(a.cell_index, b.cell_index)
    np.testing.assert_array_equal(a.cell_micro, b.cell_micro)
    for s in a.edges:
        np.testing.assert_array_equal(a.edges[s][0], b.edges[s][0])
        np.testing.assert_array_equal(a.edges[s][1], b.edges[s][1])
    np.testing.assert_array_equal(a.attention, b.attention)
    e = again.get("r0_c0")
    assert e.st is None and e.attention is None and e.nodes == {} and e.n_cells == 0
    # files are plain npz: loadable without pickle
    with np.load(again.path("r1_c2"), allow_pickle=False) as z:
        assert "he_crops" in z.files
    # another checkpoint hash is another cache
    assert DiskCache(tmp_path, "slide-abc", "other").get("r1_c2") is None
    # a damaged file is dropped, not fatal
    again.path("r1_c2").write_bytes(b"not an npz")
    fresh = DiskCache(tmp_path, "slide-abc", "ckpt123")
    assert fresh.get("r1_c2") is None and not fresh.has("r1_c2")


# -- clusters ---------------------------------------------------------------------------
def test_match_labels_hungarian() -> None:
    c = np.array([[0, 9, 1], [8, 0, 0], [1, 0, 7]])
    np.testing.assert_array_equal(match_labels(c), [1, 0, 2])
    # more new clusters than reference: the extra one gets a fresh number
    c = np.array([[5, 0], [0, 4], [1, 1]])
    perm = match_labels(c)
    assert perm[0] == 0 and perm[1] == 1 and perm[2] == 2
    np.testing.assert_array_equal(
        contingency(np.array([0, 0, 1, -1]), np.array([1, 1, 0, 0]), 2, 2), [[0, 2], [1, 0]]
    )


def _structured_results(n_tiles: int = 40, k: int = 3, d: int = 16, seed: int = 0):
    """Tiles whose region type ``t`` (0..k-1) decides every crop's embedding family.

    Each scale gets its *own* random directions per type (the scales' spaces are unrelated),
    so matching must come from co-occurrence, not from centroid distances.
    """
    rng = np.random.default_rng(seed)
    dirs = {s: rng.normal(size=(k, d)) * 3 for s in ("micro", "meso", "macro", "cells")}
    out, truth = [], []
    for i in range(n_tiles):
        # each meso patch has one type; its micro patches share it; the macro takes meso 0
        meso_t = rng.integers(0, k, size=4)
        micro_t = meso_t[MICRO_TO_MESO]
        crops = np.concatenate(
            [
                dirs["micro"][micro_t] + rng.normal(scale=0.3, size=(16, d)),
                dirs["meso"][meso_t] + rng.normal(scale=0.3, size=(4, d)),
                dirs["macro"][meso_t[:1]] + rng.normal(scale=0.3, size=(1, d)),
            ]
        ).astype(np.float32)
        n = 12
        cm = rng.integers(0, 16, size=n)
        nodes = (dirs["cells"][micro_t[cm]] + rng.normal(scale=0.3, size=(n, d))).astype(np.float32)
        out.append(
            TileResult(
                tile_id=f"r0_c{i}",
                index=i,
                he={"micro": crops[0], "meso": crops[16], "macro": crops[20]},
                he_crops=crops,
                nodes={"micro": nodes},
                cell_index=np.arange(i * n, (i + 1) * n),
                cell_micro=cm,
            )
        )
        truth.append((micro_t, meso_t, cm))
    return out, truth


def test_cluster_colours_match_across_scales_and_refits() -> None:
    k = 3
    results, truth = _structured_results(k=k)
    cs = fit_clusters(results, k)
    assert set(cs.centroids) == {"he_micro", "he_meso", "he_macro", "cells_micro"}
    micro_map, meso_map, macro_map, cell_map = {}, {}, {}, {}
    for r, (micro_t, meso_t, cm) in zip(results, truth, strict=False):
        lab = cs.tile_labels(r)
        for t, lbl in zip(micro_t, lab["he_micro"], strict=False):
            micro_map.setdefault(int(t), set()).add(int(lbl))
        for t, lbl in zip(meso_t, lab["he_meso"], strict=False):
            meso_map.setdefault(int(t), set()).add(int(lbl))
        macro_map.setdefault(int(meso_t[0]), set()).add(int(lab["he_macro"][0]))
        for t, lbl in zip(micro_t[cm], lab["cells_micro"], strict=False):
            cell_map.setdefault(int(t), set()).add(int(lbl))
    # every region type gets one cluster number, and the same number at every scale
    for m in (micro_map, meso_map, macro_map, cell_map):
        assert all(len(v) == 1 for v in m.values()), m
    ref = {t: next(iter(v)) for t, v in micro_map.items()}
    assert sorted(ref.values()) == list(range(k))
    for m in (meso_map, macro_map, cell_map):
        assert {t: next(iter(v)) for t, v in m.items()} == ref

    # refit (other order, other seed: k-means alone would renumber): colours hold
    fresh = fit_clusters(results[::-1], k, seed=7)
    cs2 = fit_clusters(results[::-1], k, previous=cs, seed=7)
    assert fresh.generation == 0
    assert cs2.generation == cs.generation + 1
    for r in results[:10]:
        a, b = cs.tile_labels(r), cs2.tile_labels(r)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    rgba = cluster_colour(np.array([0, 1, -1]))
    assert rgba.shape == (3, 4) and rgba[2, 3] == 0 and not np.allclose(rgba[0], rgba[1])


def test_cluster_errors() -> None:
    results, _ = _structured_results(n_tiles=3)
    with pytest.raises(SigmmaError, match="at least 1"):
        fit_clusters(results, 0)
    with pytest.raises(SigmmaError, match="unknown clustering"):
        fit_clusters(results, 2, method="dbscan")


# -- the engine on a real tiny model and real tiles ---------------------------------------
@pytest.fixture(scope="module")
def real(embedded_bundle, tmp_path_factory):
    import torch

    from napari_sigmma.io import load_any
    from napari_sigmma.models.config import ModelConfig
    from napari_sigmma.models.sigmma import SigmmaModel
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.grid import make_tile_grid
    from napari_sigmma.tiles.paired import PairedSlide

    paired = PairedSlide.from_sdata(load_any(embedded_bundle), name="embedded")
    grid = make_tile_grid(paired)
    feat = NodeFeaturizer.fit_pca(paired.counts, paired.genes, n_components=8)
    torch.manual_seed(1)
    cfg = ModelConfig(
        backbone="vit_tiny", pretrained=False, embed_dim=16, hidden=16, head_hidden=32
    )
    model = SigmmaModel(cfg, feat.n_features, len(feat.genes))
    calls = {"n": 0}
    orig = model.backbone_features

    def counted(images):
        calls["n"] += 1
        return orig(images)

    model.backbone_features = counted
    n_cells = np.bincount(np.maximum(grid.locate(paired.cells_px), 0), minlength=len(grid))
    busy = [grid.tile_ids[i] for i in np.argsort(-n_cells)[:4]]
    return {
        "paired": paired,
        "grid": grid,
        "feat": feat,
        "model": model,
        "calls": calls,
        "ids": busy,
        "cache": tmp_path_factory.mktemp("engine-cache"),
    }


def _real_engine(real, **kw):
    from napari_sigmma.live.engine import EmbeddingEngine

    return EmbeddingEngine(
        real["model"], real["paired"], real["grid"], featurizer=real["feat"], device="cpu",
        cache_dir=real["cache"], **kw,
    )  # fmt: skip


def test_engine_results_batches_cache_and_restart(real) -> None:
    from napari_sigmma.tiles.graphs import cells_per_tile

    eng = _real_engine(real, batch_size=2, memory_items=2)
    ids = real["ids"][:3]
    calls0 = real["calls"]["n"]
    batches = list(eng.encode(ids))
    # 3 tiles in batches of 2: two forwards, each takes all crops of its batch at once
    assert [len(b) for b in batches] == [2, 1]
    assert real["calls"]["n"] - calls0 == 2
    res = {r.tile_id: r for b in batches for r in b}
    grid, paired = real["grid"], real["paired"]
    per_tile = cells_per_tile(paired.cells_px, grid)
    for t, r in res.items():
        i = grid.tile_ids.index(t)
        assert r.index == i and r.he_crops.shape == (21, 16)
        np.testing.assert_allclose(r.he["macro"], r.he_crops[20], rtol=1e-5, atol=1e-6)
        assert set(r.cell_index) == set(per_tile[i]) and r.st is not None
        for s in ("micro", "meso", "macro"):
            assert r.nodes[s].shape == (r.n_cells, 16)
            pairs, prob = r.edges[s]
            assert pairs.shape[1] == 2 and len(prob) == len(pairs)
            assert set(np.unique(pairs)) <= set(per_tile[i])  # global cell ids, this tile
            assert (pairs[:, 0] != pairs[:, 1]).all()
        # G_micro edges join cells of the same micro patch
        pos = {c: m for c, m in zip(r.cell_index, r.cell_micro, strict=False)}
        pairs = r.edges["micro"][0]
        assert all(pos[a] == pos[b] for a, b in pairs)
        assert r.attention.shape == (3, 14, 14)
        np.testing.assert_allclose(r.attention.reshape(3, -1).sum(1), 1.0, rtol=1e-4)
    # memory LRU bound held; a second pass comes from memory + disk, no forward
    assert len(eng.memory) == 2
    calls1 = real["calls"]["n"]
    again = [r for b in eng.encode(ids) for r in b]
    assert real["calls"]["n"] == calls1 and eng.stats.disk_hits >= 1
    for r in again:
        np.testing.assert_array_equal(r.he_crops, res[r.tile_id].he_crops)
    # restart: a new engine on the same cache folder
    eng2 = _real_engine(real)
    assert eng2.cached(ids) == ids
    assert [r.tile_id for b in eng2.encode(ids) for r in b] == ids
    assert real["calls"]["n"] == calls1
    # another model (different weights) does not see these results
    import copy

    other = copy.deepcopy(real["model"])
    with __import__("torch").no_grad():
        next(other.parameters()).add_(1.0)
    from napari_sigmma.live.engine import EmbeddingEngine, model_hash

    assert model_hash(other) != eng2.checkpoint_hash
    eng3 = EmbeddingEngine(other, real["paired"], real["grid"], featurizer=real["feat"],
                           device="cpu", cache_dir=real["cache"])  # fmt: skip
    assert eng3.cached(ids) == []


def test_engine_cancel_between_batches(real) -> None:
    import threading

    eng = _real_engine(real, batch_size=1)
    eng.disk = None
    cancel = threading.Event()
    got = []
    for batch in eng.encode(real["ids"], cancel):
        got.extend(batch)
        cancel.set()  # a pan: the next batch never starts
    assert len(got) == 1 and eng.stats.forward_batches == 1


def test_gene_head_fit_save_load(real, tmp_path) -> None:
    from napari_sigmma.analysis.genehead import GeneHead, fit_gene_head

    eng = _real_engine(real)
    results = [r for b in eng.encode(real["ids"]) for r in b]
    head = fit_gene_head(results, real["paired"], real["grid"], run="r1")
    assert "micro" in head.maps and "macro" in head.maps
    path = head.save(tmp_path / "gene_head.npz")
    with np.load(path, allow_pickle=False) as z:
        assert "macro__coef" in z.files
    back = GeneHead.load(path)
    assert back.genes == head.genes and back.run == "r1"
    tile, micro = back.predict_tile(results[0])
    t0, m0 = head.predict_tile(results[0])
    np.testing.assert_allclose(tile, t0)
    np.testing.assert_allclose(micro, m0)
    assert tile.shape == (len(head.genes),) and micro.shape == (16, len(head.genes))
    with pytest.raises(SigmmaError, match="not in the gene head"):
        head.gene_index(["NOPE"])
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(2))
    with pytest.raises(SigmmaError, match="gene head"):
        GeneHead.load(bad)


def test_gene_head_predicts_held_out_tiles(real) -> None:
    """Out of sample: embeddings that carry the tiles' measured expression (a random linear
    image of it plus noise, so the signal is known) must let the head predict tiles it never
    saw far better than the training mean; the same embeddings shuffled across tiles must
    not (so the margin is the signal, not a leak)."""
    from napari_sigmma.analysis.genehead import fit_gene_head, measured_expression

    paired, grid = real["paired"], real["grid"]
    n_cells = np.bincount(np.maximum(grid.locate(paired.cells_px), 0), minlength=len(grid))
    idx = np.flatnonzero(n_cells >= 3)  # the head's own min_cells
    assert len(idx) >= 30, len(idx)
    probe = fit_gene_head(_fake_results(idx, np.zeros((len(idx), 4))), paired, grid)
    y, _ = measured_expression(paired, grid, idx, genes=probe.genes, target_sum=probe.target_sum)
    rng = np.random.default_rng(0)
    x = y @ rng.normal(size=(y.shape[1], 48)) + 0.05 * rng.normal(size=(len(idx), 48))
    train, test = np.arange(len(idx)) % 2 == 0, np.arange(len(idx)) % 2 == 1

    def held_out_mae(emb: np.ndarray) -> float:
        head = fit_gene_head(_fake_results(idx[train], emb[train]), paired, grid, run="oos")
        pred = np.stack([head.predict_tile(r)[0] for r in _fake_results(idx[test], emb[test])])
        return float(np.abs(pred - y[test]).mean())

    floor = float(np.abs(y[test] - y[train].mean(0)).mean())
    signal = held_out_mae(x)
    shuffled = held_out_mae(x[rng.permutation(len(idx))])
    print(f"held-out MAE {signal:.4f}, shuffled {shuffled:.4f}, training-mean floor {floor:.4f}")
    assert signal < 0.5 * floor
    assert shuffled > 0.9 * floor


def _fake_results(idx: np.ndarray, emb: np.ndarray) -> list:
    from napari_sigmma.embed.result import TileResult

    return [
        TileResult(
            tile_id=f"t{i}",
            index=int(i),
            he={"macro": e.astype(np.float32)},
            he_crops=np.tile(e.astype(np.float32), (21, 1)),
        )
        for i, e in zip(idx, emb, strict=True)
    ]


def test_leiden_clusters_match_across_scales() -> None:
    results, truth = _structured_results(n_tiles=30, k=3)
    cs = fit_clusters(results, 3, method="leiden", resolution=0.3)
    assert cs.method == "leiden" and cs.n_clusters >= 3
    ref: dict[int, set] = {}
    meso: dict[int, set] = {}
    for r, (micro_t, meso_t, _) in zip(results, truth, strict=True):
        lab = cs.tile_labels(r)
        for t, lbl in zip(micro_t, lab["he_micro"], strict=True):
            ref.setdefault(int(t), set()).add(int(lbl))
        for t, lbl in zip(meso_t, lab["he_meso"], strict=True):
            meso.setdefault(int(t), set()).add(int(lbl))
    # each region type is one Leiden community, numbered alike at both scales
    assert all(len(v) == 1 for v in ref.values()) and all(len(v) == 1 for v in meso.values())
    assert {t: next(iter(v)) for t, v in meso.items()} == {t: next(iter(v)) for t, v in ref.items()}
