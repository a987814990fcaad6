"""Retrieval core (no Qt): stores and indices from tile results, HE→ST / ST→HE queries,
persistence, cell selection → tile, and the composition / top-gene summaries on the real
embedded sample."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sigmma.embed.result import TileResult
from napari_sigmma.errors import SigmmaError
from napari_sigmma.retrieval.query import (
    RetrievalStore,
    SlideEmbeddings,
    cells_in_polygon,
    composition,
    format_pairs,
    tile_cells,
    tile_of_cells,
    top_genes,
)


@pytest.fixture(scope="module")
def slide(embedded_bundle):
    from napari_sigmma.io import load_any
    from napari_sigmma.tiles.grid import make_tile_grid
    from napari_sigmma.tiles.paired import PairedSlide

    paired = PairedSlide.from_sdata(load_any(embedded_bundle), name="embedded")
    return paired, make_tile_grid(paired)


def _results(grid, n, dim=8, seed=0, st_missing=()):
    """Tile results whose ST embedding is a noisy copy of the HE one (a 'trained' pair)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        he = {s: rng.normal(size=dim).astype(np.float32) for s in ("micro", "meso", "macro")}
        st = None
        if i not in st_missing:
            st = {s: (v + 0.05 * rng.normal(size=dim)).astype(np.float32) for s, v in he.items()}
        out.append(
            TileResult(
                tile_id=grid.tile_ids[i], index=i, he=he, he_crops=np.zeros((21, dim)), st=st
            )
        )
    return out


def test_he_to_st_finds_partner_and_grows(slide):
    paired, grid = slide
    store = RetrievalStore(use_faiss=False)
    res = _results(grid, 12, st_missing={3})
    store.add_results("a", paired, grid, res[:6])
    assert len(store.index("st", "macro")) == 5  # tile 3 has no ST embedding
    store.add_results("a", paired, grid, res[6:])
    assert len(store.index("st", "macro")) == 11  # grown, nothing added twice
    store.add_results("a", paired, grid, res[6:8])  # re-encoded tiles: still once
    assert len(store.index("st", "macro")) == 11
    for scale in ("micro", "meso", "macro"):
        m = store.query_he_to_st("a", 7, scale, k=4)
        assert [x.rank for x in m] == [1, 2, 3, 4]
        assert m[0].tile_index == 7 and m[0].tile_id == grid.tile_ids[7]
        assert m[0].similarity > 0.95 > m[1].similarity
        b = grid.bounds[7]
        assert m[0].box_px == pytest.approx(tuple(b))
        assert m[0].center_um == pytest.approx(
            ((b[0] + b[2]) / 2 * paired.he_mpp, (b[1] + b[3]) / 2 * paired.he_mpp)
        )
    back = store.query_st_to_he("a", 5, "meso", k=3)
    assert back[0].tile_index == 5
    with pytest.raises(SigmmaError, match="no macro ST"):
        store.query_st_to_he("a", 3, "macro")


def test_reference_slide_and_persistence(slide, tmp_path):
    paired, grid = slide
    store = RetrievalStore(use_faiss=False)
    store.add_results("a", paired, grid, _results(grid, 6, seed=1))
    ref = _results(grid, 6, seed=2)
    store.add_results("ref", paired, grid, ref)
    store.index("st", "macro")
    # a query with a reference slide's HE embedding lands on that slide's partner
    m = store.query(ref[4].he["macro"], target="st", scale="macro", k=2)
    assert (m[0].slide, m[0].tile_index) == ("ref", 4)
    path = store.save_slide("ref", tmp_path)
    loaded = SlideEmbeddings.load(path, paired, grid)
    assert loaded.name == "ref" and len(loaded) == 6
    np.testing.assert_array_equal(loaded.vector("st", "meso", 2), ref[2].st["meso"])
    store2 = RetrievalStore(use_faiss=False)
    store2.add_slide(loaded)
    assert store2.query(ref[1].he["micro"], target="st", scale="micro", k=1)[0].tile_index == 1
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(SigmmaError, match=r"bad\.npz"):
        SlideEmbeddings.load(tmp_path / "bad.npz")


def test_from_embed_tiles_output(slide):
    from napari_sigmma.embed.memory import TileEmbeddings

    paired, grid = slide
    rng = np.random.default_rng(0)
    he = {s: rng.normal(size=(4, 8)).astype(np.float32) for s in ("micro", "meso", "macro")}
    st = {s: v.copy() for s, v in he.items()}
    for v in st.values():
        v[1] = np.nan  # a tile without enough cells
    emb = TileEmbeddings(
        indices=np.array([2, 5, 7, 9]),
        tile_ids=[grid.tile_ids[i] for i in (2, 5, 7, 9)],
        he=he,
        st=st,
        valid=np.array([True, False, True, True]),
        n_cells=np.array([10, 0, 10, 10]),
    )
    se = SlideEmbeddings("e", paired, grid)
    assert se.add_tile_embeddings(emb) == 4
    assert sorted(se.st["macro"]) == [2, 7, 9]
    store = RetrievalStore(use_faiss=False)
    store.add_slide(se)
    assert store.query_he_to_st("e", 9, "macro", k=1)[0].tile_index == 9


def test_cells_selection_and_summaries(slide):
    paired, grid = slide
    loc = grid.locate(paired.cells_px)
    counts = np.bincount(loc[loc >= 0], minlength=len(grid))
    t = int(np.argmax(counts))
    rows = tile_cells(paired, grid, t)
    assert rows.size == counts[t] > 0
    x0, y0, x1, y1 = grid.bounds[t]
    # a polygon slightly inside the tile: its cells all belong to that tile
    pad = 0.1 * (x1 - x0)
    poly = np.array(
        [[x0 + pad, y0 + pad], [x1 - pad, y0 + pad], [x1 - pad, y1 - pad], [x0 + pad, y1 - pad]]
    )
    sel = cells_in_polygon(paired, poly)
    assert 0 < sel.size <= rows.size and set(sel) <= set(rows)
    assert tile_of_cells(paired, grid, sel) == t
    with pytest.raises(SigmmaError):
        tile_of_cells(paired, grid, sel, has_st=[t + 1000])
    comp = composition(paired, grid, t)
    truth = paired.obs["cell_type"].astype(str).to_numpy()[rows]
    vals, c = np.unique(truth, return_counts=True)
    assert comp[0] == (vals[np.argmax(c)], pytest.approx(c.max() / rows.size))
    assert sum(f for _, f in composition(paired, grid, t, top=100)) == pytest.approx(1.0)
    # without cell types: cluster labels given per cell
    labels = np.zeros(paired.n_cells, np.int64)
    labels[rows[: rows.size // 2 + 1]] = 3
    paired_obs = paired.obs
    try:
        paired.obs = paired_obs.drop(columns=["cell_type"])
        cl = composition(paired, grid, t, labels=labels)
    finally:
        paired.obs = paired_obs
    assert cl[0][0] == "cluster 3"
    genes = top_genes(paired, grid, t, n=5)
    assert len(genes) == 5
    import scipy.sparse as sp

    m = sp.csr_matrix(paired.counts)[rows].toarray().astype(np.float64)
    m = np.log1p(m / m.sum(axis=1, keepdims=True).clip(1e-12) * 100)
    best = np.argsort(-m.mean(axis=0), kind="stable")[:5]
    assert [g for g, _ in genes] == [paired.genes[i] for i in best]
    assert [v for _, v in genes] == pytest.approx(m.mean(axis=0)[best], rel=1e-4)
    assert format_pairs(comp, percent=True).endswith("%")
    assert format_pairs([]) == "—"


def test_prepare_builds_in_a_worker_and_queries_never_build(slide):
    """A store made with ``build_in_query=False`` (as the viewer's): above ``ivf_min_size`` a
    query searches exactly without building; ``prepare`` in a worker thread builds the IVF
    of the indices that are due, while another thread adds tiles and queries."""
    import threading

    paired, grid = slide
    n = min(len(grid), 40)
    store = RetrievalStore(use_faiss=False, ivf_min_size=n + 1, build_in_query=False)
    store.add_results("a", paired, grid, _results(grid, n, seed=3))
    assert not store.needs_build()  # n < the threshold
    store.add_results("b", paired, grid, _results(grid, n, seed=4))
    assert store.needs_build() and store.needs_build(scales=["macro"], modalities=["st"])
    se = store.slide("b")
    m = store.query_he_to_st("b", 3, "macro", k=5)
    st = store.index("st", "macro")
    assert not st.is_ivf and not st.builds  # answered exactly, nothing built
    assert (m[0].slide, m[0].tile_index) == ("b", 3)
    worker = threading.Thread(
        target=store.prepare, kwargs={"scales": ["macro"]}, name="prepare-worker"
    )
    worker.start()
    # meanwhile this thread adds a slide and queries (both must work during the build)
    store.add_results("c", paired, grid, _results(grid, 5, seed=5))
    m = store.query_he_to_st("b", 4, "macro", k=1)
    assert (m[0].slide, m[0].tile_index) == ("b", 4)
    worker.join(60)
    assert not worker.is_alive()
    for mod in ("he", "st"):
        idx = store.index(mod, "macro")
        assert idx.is_ivf and {b["thread"] for b in idx.builds} == {"prepare-worker"}
    assert not store.index("st", "micro").is_ivf  # other scales were not asked for
    assert store.needs_build() and not store.needs_build(scales=["macro"])
    assert store.prepare() > 0 and not store.needs_build()
    assert store.index("st", "micro").last_build_thread == threading.current_thread().name
    assert len(store.index("st", "macro")) == 2 * n + 5
    # the IVF finds each tile's ST partner (a noisy copy of its HE embedding)
    for i in (0, n // 2, n - 1):
        v = se.vector("he", "macro", i)
        assert store.query(v, target="st", scale="macro", k=1)[0].tile_index == i
