"""Embedding a slide straight into a SpatialData .zarr, batch by batch (issue 8).

A tiny SIGMMA model is trained once on the embedded sample (the real trainer). The streamed
store must read back equal to the in-memory path (``embed_tiles`` +
``embeddings_to_sdata``), also when graphs are prepared in several chunks and the zarr
chunks are smaller than a batch; a cancelled run must leave no store and not touch an
existing one; the row writer must hold one chunk, not the array.
"""

from __future__ import annotations

import threading
import tracemalloc
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from _embed_data import tiny_embedded_run
from napari_sigmma.errors import Cancelled, SigmmaError


@pytest.fixture(scope="module")
def model_and_slide(embedded_bundle, sigmma_cache):
    from napari_sigmma.io import load_any
    from napari_sigmma.tiles.grid import make_tile_grid
    from napari_sigmma.tiles.paired import PairedSlide
    from napari_sigmma.train.checkpoint import (
        graph_settings,
        load_checkpoint,
        model_from_checkpoint,
    )

    cfg, ckpt_path = tiny_embedded_run(embedded_bundle, sigmma_cache)  # shared, trained once
    ckpt = load_checkpoint(ckpt_path)
    model, featurizer = model_from_checkpoint(ckpt, path=ckpt_path)
    paired = PairedSlide.from_sdata(load_any(embedded_bundle), name="embedded")
    grid = make_tile_grid(paired, tile_px=cfg.tile_px, target_mpp=cfg.target_mpp)
    return SimpleNamespace(
        ckpt=ckpt_path,
        data=embedded_bundle,
        model=model.eval(),
        featurizer=featurizer,
        settings=graph_settings(cfg),
        paired=paired,
        grid=grid,
    )


def _stream(m, out: Path, **kw):
    from napari_sigmma.embed.stream import embed_slide_streaming

    return embed_slide_streaming(
        m.model, m.paired, m.grid, out, featurizer=m.featurizer, settings=m.settings,
        device="cpu", **kw,
    )  # fmt: skip


def test_streamed_store_equals_the_in_memory_result(model_and_slide, tmp_path):
    from napari_sigmma.embed.memory import embed_tiles, embeddings_to_sdata
    from napari_sigmma.io.store import read_sdata
    from napari_sigmma.tiles.graphs import cells_per_tile

    m = model_and_slide
    # every sample tile has cells: require the median count so some tiles get no ST side
    per_tile = [c.size for c in cells_per_tile(m.paired.cells_px, m.grid)]
    m = SimpleNamespace(
        **{**vars(m), "settings": replace(m.settings, min_cells=int(np.median(per_tile)) + 1)}
    )
    emb = embed_tiles(
        m.model, m.paired, m.grid, featurizer=m.featurizer, settings=m.settings,
        batch_size=4, device="cpu",
    )  # fmt: skip
    ref = embeddings_to_sdata(emb, m.paired, m.grid, attrs={"slide": "embedded"})
    assert emb.complete and emb.valid.sum() > 5 and (~emb.valid).sum() > 0

    # zarr chunks of 5 rows (batches of 4 straddle them), graphs prepared 8 tiles at a time
    res = _stream(m, tmp_path / "s.zarr", batch_size=4, chunk_rows=5, chunk_tiles=8,
                  attrs={"slide": "embedded"})  # fmt: skip
    assert res.n_tiles == len(m.grid) and res.n_valid == int(emb.valid.sum())
    got = read_sdata(res.path)
    assert set(got.tables) == set(ref.tables) and set(got.shapes) == set(ref.shapes)
    for key, t_ref in ref.tables.items():
        t = got.tables[key]
        assert list(t.obs_names) == list(t_ref.obs_names)
        for col in t_ref.obs.columns:
            assert (
                t.obs[col].astype(str).to_numpy() == t_ref.obs[col].astype(str).to_numpy()
            ).all()
        assert set(t.obsm) == set(t_ref.obsm)
        for k, v in t_ref.obsm.items():
            np.testing.assert_allclose(np.asarray(t.obsm[k]), np.asarray(v), atol=1e-6, err_msg=k)
    for key, g in ref.shapes.items():
        assert got.shapes[key].geometry.equals(g.geometry)
    st = got.tables["tile_embeddings"].obsm["st_macro"]
    valid = got.tables["tile_embeddings"].obs["valid"].to_numpy()
    assert np.isnan(st[~valid]).all() and np.isfinite(st[valid]).all()


def test_cancel_leaves_no_store_and_keeps_an_existing_one(model_and_slide, tmp_path):
    m = model_and_slide
    out = tmp_path / "e.zarr"
    first = _stream(m, out, batch_size=8, indices=np.arange(4))
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        cancel.set()  # after the first batch

    with pytest.raises(Cancelled):
        _stream(m, out, batch_size=4, overwrite=True, cancel=cancel, progress=progress)
    assert seen == [4]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert first.path == out
    assert not any(p.name.endswith(".partial.zarr") for p in tmp_path.iterdir())
    with pytest.raises(Cancelled):
        _stream(m, tmp_path / "new.zarr", cancel=lambda: True)
    assert not (tmp_path / "new.zarr").exists()
    # and without overwrite an existing store is refused before any work
    with pytest.raises(SigmmaError, match="already exists"):
        _stream(m, out)


def test_row_writer_holds_one_chunk(tmp_path):
    import zarr

    from napari_sigmma.embed.stream import _RowWriter

    n, d, chunk = 60_000, 64, 1024  # 15 MB of rows in all, 256 KB per chunk
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array(name="x", shape=(n, 0), dtype="float32")  # the placeholder it replaces
    w = _RowWriter(group, "x", n, chunk)
    rng = np.random.default_rng(0)
    gap = (20_000, 20_700)  # rows never written stay NaN
    tracemalloc.start()
    row = 0
    while row < n:
        b = int(rng.integers(1, 40))
        b = min(b, n - row, gap[0] - row if row < gap[0] else n)
        if row == gap[0]:
            row = gap[1]
            continue
        block = np.arange(row, row + b, dtype=np.float32)[:, None] + np.zeros(d, np.float32)
        w.write(row, block)
        row += b
    assert w.close()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * chunk * d * 4, peak  # a few chunks, not the 15 MB array
    back = np.asarray(zarr.open_array(str(tmp_path / "g.zarr" / "x"), mode="r")[:])
    assert back.shape == (n, d)
    rows = np.arange(n, dtype=np.float32)
    written = np.ones(n, bool)
    written[gap[0] : gap[1]] = False
    np.testing.assert_array_equal(back[written, 0], rows[written])
    np.testing.assert_array_equal(back[written, -1], rows[written])
    assert np.isnan(back[~written]).all()
    with pytest.raises(RuntimeError, match="in order"):
        w.write(0, np.zeros((1, d), np.float32))


def test_embed_memory_figures_in_child_processes(model_and_slide, tmp_path):
    from napari_sigmma.bench.scale import embed_memory, format_embed
    from napari_sigmma.io.store import read_sdata

    m = model_and_slide
    e = embed_memory(m.data, m.ckpt, tmp_path, n_tiles=(6, 12))
    assert [r["n_tiles"] for r in e["runs"]] == [6, 12] and e["tiles_ratio"] == 2.0
    for r in e["runs"]:
        assert r["grid_tiles"] == len(m.grid) and r["cells_embedded"] > 0
        assert r["peak_rss_embed_mb"] >= r["rss_before_embed_mb"] > 100
        assert r["loop_growth_mb"] >= 0 and r["store_mb"] > 0
        assert np.isfinite(r["loop_slope_mb_per_1000_tiles"])
        t = read_sdata(tmp_path / f"embed_{r['n_tiles']}.zarr").tables["tile_embeddings"]
        assert t.n_obs == r["n_tiles"] and np.isfinite(t.obsm["he_macro"]).all()
    # the tiles nearest the cells' centre: the 6 are among the 12
    six = read_sdata(tmp_path / "embed_6.zarr").tables["tile_embeddings"].obs["tile_id"]
    twelve = read_sdata(tmp_path / "embed_12.zarr").tables["tile_embeddings"].obs["tile_id"]
    assert set(six) < set(twelve)
    assert len(e["loop_growth_mb"]) == 2 and "batch-loop growth" in format_embed(e)
