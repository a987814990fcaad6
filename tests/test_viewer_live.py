"""The live viewer in a real napari viewer (pytest-qt): overlays for exactly the visible
tiles, cache on revisit, cancel on pan, clean shutdown.

A real tiny model (vit_tiny, random init) runs on real tiles of the embedded sample. The
only instrumentation is a counter around the model's ``backbone_features`` (the encoder
forward), to prove that a revisit calls no encoder.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_sigmma.live.visible import visible_tiles

SIGMMA_KINDS = ("clusters", "cell_clusters", "edges", "attention", "gene_predicted")


class Counted:
    """Counts calls of a model's encoder forward (the real one runs)."""

    def __init__(self, model) -> None:
        self.n = 0
        self._orig = model.backbone_features
        model.backbone_features = self

    def __call__(self, images):
        self.n += 1
        return self._orig(images)


@pytest.fixture(scope="module")
def live(embedded_bundle, tmp_path_factory):
    import torch

    from napari_sigmma.analysis.genehead import fit_gene_head
    from napari_sigmma.io import load_any
    from napari_sigmma.live.engine import EmbeddingEngine
    from napari_sigmma.models.config import ModelConfig
    from napari_sigmma.models.sigmma import SigmmaModel
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.grid import make_tile_grid
    from napari_sigmma.tiles.paired import PairedSlide

    sdata = load_any(embedded_bundle)
    paired = PairedSlide.from_sdata(sdata, name="embedded")
    grid = make_tile_grid(paired)
    feat = NodeFeaturizer.fit_pca(paired.counts, paired.genes, n_components=16)
    torch.manual_seed(0)
    cfg = ModelConfig(
        backbone="vit_tiny", pretrained=False, embed_dim=32, hidden=32, head_hidden=64
    )
    model = SigmmaModel(cfg, feat.n_features, len(feat.genes))
    counter = Counted(model)
    n_cells = np.bincount(np.maximum(grid.locate(paired.cells_px), 0), minlength=len(grid))
    # a 2×2 block of tissue tiles with cells (region A), a far single tile (B), and a 3×3
    # neighbourhood elsewhere (C) for the cancel test
    rc = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(grid.rows, grid.cols, strict=False))}
    block = None
    for (r, c), _i in sorted(rc.items()):
        quad = [(r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1)]
        if all(q in rc and n_cells[rc[q]] >= 5 for q in quad):
            block = (r, c)
            break
    assert block is not None
    quad_ids = {
        f"r{r}_c{c}" for r, c in [(block[0] + a, block[1] + b) for a in (0, 1) for b in (0, 1)]
    }
    far = max(rc, key=lambda q: abs(q[0] - block[0]) + abs(q[1] - block[1]))
    # gene head: fitted on real encoded tiles outside the regions used below
    train_idx = [i for i in np.argsort(-n_cells)[:12] if grid.tile_ids[i] not in quad_ids][:4]
    trainer_engine = EmbeddingEngine(model, paired, grid, featurizer=feat, device="cpu")
    head = fit_gene_head(trainer_engine.encode_indices(train_idx), paired, grid, run="test-run")
    return {
        "sdata": sdata,
        "path": str(embedded_bundle),
        "paired": paired,
        "grid": grid,
        "feat": feat,
        "model": model,
        "counter": counter,
        "head": head,
        "quad": block,
        "quad_ids": quad_ids,
        "far": far,
        "cache": tmp_path_factory.mktemp("live-cache"),
        "n_cells": n_cells,
        "EmbeddingEngine": EmbeddingEngine,
    }


def _engine(live, **kw):
    return live["EmbeddingEngine"](
        live["model"],
        live["paired"],
        live["grid"],
        featurizer=live["feat"],
        device="cpu",
        cache_dir=live["cache"],
        gene_head=live["head"],
        run="test-run",
        **kw,
    )


def _viewer_with_he(make_napari_viewer, live):
    from napari_sigmma.viewer.layers import he_image_layer

    viewer = make_napari_viewer()
    data, kwargs, _ = he_image_layer(live["sdata"], sdata_path=live["path"])
    layer = viewer.add_image(data, **kwargs)
    return viewer, layer


def _look_at(viewer, live, x_tiles: float, y_tiles: float, span_tiles: float) -> None:
    """Centre the camera on a grid position (in tiles) showing ``span_tiles`` tiles across
    the larger canvas side (so at most that many along either axis)."""
    g, mpp = live["grid"], live["paired"].he_mpp
    s = g.tile_size * mpp
    viewer.camera.center = (g.origin[1] * mpp + y_tiles * s, g.origin[0] * mpp + x_tiles * s)
    viewer.camera.zoom = max(viewer.canvas.size) / (span_tiles * s)


def _tiles_of_layer(layer, live) -> set[str]:
    """Tiles that a layer really draws, read back from its data (not from bookkeeping)."""
    g = live["grid"]
    kind = layer.metadata["sigmma_kind"]
    if kind in ("cell_clusters", "edges"):
        if len(layer.data) == 0:
            return set()
        if kind == "cell_clusters":
            yx = np.asarray(layer.data)[np.asarray(layer.shown, bool)]
        else:
            alpha = np.asarray(layer.edge_color)[:, 3]
            yx = np.asarray(layer.data)[alpha > 0][:, 0, :]
        world = np.array([layer.data_to_world(p) for p in yx]).reshape(-1, 2)
        xy0 = world[:, ::-1] / live["paired"].he_mpp  # H&E shown at scale he_mpp
        idx = g.locate(xy0)
        assert (idx >= 0).all()
        return {g.tile_ids[i] for i in np.unique(idx)}
    data = np.asarray(layer.data)
    if data.ndim == 3:  # attention: heads first
        data = data.max(axis=0)
    per = data.shape[0] // g.n_rows
    out = set()
    for i, (r, c) in enumerate(zip(g.rows, g.cols, strict=False)):
        block = data[r * per : (r + 1) * per, c * per : (c + 1) * per]
        drawn = np.isfinite(block) & (block != 0) if block.dtype.kind == "f" else block != 0
        if drawn.any():
            out.add(g.tile_ids[i])
    return out


def _wait_idle(qtbot, ctl, timeout: int = 180_000) -> None:
    # ``busy`` covers running workers, batches posted to the main thread and not drawn yet,
    # and queued layer updates: when it is False, the layers are final (no extra spin)
    qtbot.waitUntil(lambda: not ctl.busy and not ctl._timer.isActive(), timeout=timeout)


def test_no_model_state_keeps_data_layers(make_napari_viewer, live) -> None:
    from napari_sigmma.viewer.controller import NO_MODEL_STATUS, LiveController

    viewer, layer = _viewer_with_he(make_napari_viewer, live)
    ctl = LiveController(viewer, layer, None)
    assert ctl.status == NO_MODEL_STATUS and "train" in ctl.status
    assert [ly.name for ly in viewer.layers] == [layer.name]
    ctl.close()


def test_overlays_for_exactly_the_visible_tiles_then_cache(make_napari_viewer, qtbot, live) -> None:
    from napari_sigmma.viewer.controller import LiveController

    viewer, layer = _viewer_with_he(make_napari_viewer, live)
    engine = _engine(live, batch_size=2)
    r, c = live["quad"]
    _look_at(viewer, live, c + 1.0, r + 1.0, 1.5)
    ctl = LiveController(viewer, layer, engine, k=3, debounce_ms=50, gene_head=live["head"])
    expected = live["quad_ids"]
    assert set(ctl.visible) == expected  # the camera geometry, checked independently
    _wait_idle(qtbot, ctl)
    assert ctl.overlays.shown_tiles() == expected
    assert ctl.clusters is not None

    sig = [ly for ly in viewer.layers if ly.name.startswith("SIGMMA")]
    kinds = {ly.metadata["sigmma_kind"] for ly in sig}
    assert set(SIGMMA_KINDS) <= kinds
    for ly in sig:
        ly.visible = True  # a user ticking every eye: hidden layers catch up
    valid = {t for t in expected if live["n_cells"][live["grid"].tile_ids.index(t)] >= 3}
    for ly in sig:
        meta = ly.metadata
        assert meta["run"] == "test-run" and meta["sdata_element"] in ("he_image", "table")
        if meta["sigmma_kind"] == "gene_measured":
            # data, shown for the whole slide, on the H&E where the predicted map is (the
            # grid view puts them side by side: Home keeps framing the slide), on the
            # predicted map's colour scale, both with a colourbar
            pred = next(p for p in sig if p.metadata["sigmma_kind"] == "gene_predicted")
            np.testing.assert_allclose(ly.extent.world, pred.extent.world)
            assert tuple(ly.contrast_limits) == tuple(pred.contrast_limits)
            assert ly.colorbar.visible and pred.colorbar.visible
            continue
        want = valid if meta["sigmma_kind"] in ("cell_clusters", "edges") else expected
        if meta["sigmma_kind"] == "edges" and meta["scale"] != "micro":
            # added edges exist only where the edge layer accepted some
            assert _tiles_of_layer(ly, live) <= want
            continue
        assert _tiles_of_layer(ly, live) == want, ly.name
    # same colours across scales: the labels layers share one colour map
    lab = [ly for ly in sig if ly.metadata["sigmma_kind"] == "clusters"]
    assert lab[0].colormap.color_dict.keys() == lab[1].colormap.color_dict.keys()

    # pan away (one far tile), then back: the region comes from memory, no encoder call
    fr, fc = live["far"]
    _look_at(viewer, live, fc + 0.5, fr + 0.5, 0.8)
    assert ctl.visible == [f"r{fr}_c{fc}"]
    _wait_idle(qtbot, ctl)
    assert ctl.overlays.shown_tiles() == {f"r{fr}_c{fc}"}
    before = live["counter"].n
    t0 = time.perf_counter()
    _look_at(viewer, live, c + 1.0, r + 1.0, 1.5)
    ms = (time.perf_counter() - t0) * 1000
    assert ctl.overlays.shown_tiles() == expected  # taken from memory in the camera event
    # no encoding is scheduled: what is left are layer updates queued for the next turns
    assert not ctl._timer.isActive() and not ctl._workers
    assert ms < 2000
    qtbot.waitUntil(lambda: not ctl.busy, timeout=10_000)
    assert live["counter"].n == before
    for ly in sig:
        if ly.visible and ly.metadata["sigmma_kind"] in ("clusters", "cell_clusters"):
            want = valid if ly.metadata["sigmma_kind"] == "cell_clusters" else expected
            assert _tiles_of_layer(ly, live) == want, ly.name
    ctl.close()

    # a restart (new engine, same disk cache): the region comes from disk, still no forward
    engine2 = _engine(live)
    assert set(engine2.cached(sorted(expected))) == expected
    ctl2 = LiveController(viewer, layer, engine2, k=3, debounce_ms=50, gene_head=live["head"])
    _wait_idle(qtbot, ctl2)
    assert ctl2.overlays.shown_tiles() == expected
    assert engine2.stats.disk_hits >= len(expected)
    assert live["counter"].n == before
    ctl2.close()


def test_pan_cancels_stale_work(make_napari_viewer, qtbot, live) -> None:
    from napari_sigmma.viewer.controller import LiveController

    viewer, layer = _viewer_with_he(make_napari_viewer, live)
    engine = _engine(live, batch_size=1)
    g = live["grid"]
    # a 3×3 neighbourhood away from the cached quad
    fr, fc = live["far"]
    _look_at(viewer, live, fc + 0.5, fr + 0.5, 2.6)
    ctl = LiveController(viewer, layer, engine, k=3, debounce_ms=30)
    wanted = [t for t in ctl.visible if t not in engine.memory]
    assert len(wanted) >= 3
    qtbot.waitUntil(lambda: engine.stats.forward_batches >= 1, timeout=120_000)
    # pan to the cached quad: the stale worker stops at its next batch boundary
    r, c = live["quad"]
    _look_at(viewer, live, c + 1.0, r + 1.0, 1.5)
    _wait_idle(qtbot, ctl, timeout=60_000)
    assert engine.stats.encoded_tiles < len(wanted)
    assert ctl.overlays.shown_tiles() == live["quad_ids"]
    assert not set(wanted) <= set(engine.memory.keys())
    ctl.close()
    assert len(g)


def test_closing_viewer_mid_inference_leaves_no_thread(make_napari_viewer, qtbot, live) -> None:
    import dask.array as da
    from qtpy.QtCore import QThreadPool

    from napari_sigmma.viewer.controller import LiveController

    viewer, layer = _viewer_with_he(make_napari_viewer, live)
    # threads that exist anyway: Qt's, and dask's shared pool (napari reads the H&E with it)
    da.ones(8, chunks=1).sum().compute()
    qtbot.wait(50)
    before = {t.ident for t in threading.enumerate()}
    engine = _engine(live, batch_size=1)
    engine.memory.clear()
    engine.disk = None  # force encoding
    _look_at(viewer, live, live["grid"].n_cols / 2, live["grid"].n_rows / 2, 3.0)
    ctl = LiveController(viewer, layer, engine, k=3, debounce_ms=10)
    assert len(ctl.visible) > 1
    qtbot.waitUntil(lambda: ctl.busy, timeout=10_000)
    qtbot.waitUntil(lambda: engine.stats.prepare_seconds > 0, timeout=60_000)
    viewer.close()  # mid-inference
    assert ctl.closed and not ctl.busy
    assert QThreadPool.globalInstance().activeThreadCount() == 0
    # no thread is left running our code or the model (idle pools that libraries keep for
    # their I/O, e.g. dask's or zarr's, may remain: they run nothing)
    import sys
    import traceback

    frames = sys._current_frames()
    busy = []
    for t in threading.enumerate():
        if t.ident in before or t.ident not in frames or t is threading.current_thread():
            continue
        stack = "".join(traceback.format_stack(frames[t.ident]))
        if "napari_sigmma" in stack or "/torch/" in stack:
            busy.append((t.name, stack))
    assert busy == []
    assert engine.stats.encoded_tiles < len(ctl.visible)


def test_visible_tiles_follow_the_camera(make_napari_viewer, live) -> None:
    """The controller's view box is the camera's: it agrees with the tiles geometry."""
    from napari_sigmma.viewer.controller import view_box_level0

    viewer, layer = _viewer_with_he(make_napari_viewer, live)
    g = live["grid"]
    _look_at(viewer, live, 2.5, 3.5, 0.5)
    x0, y0, x1, y1 = view_box_level0(viewer, layer)
    s = g.tile_size
    assert x0 > g.origin[0] + 2 * s and x1 < g.origin[0] + 3 * s
    assert y0 > g.origin[1] + 3 * s and y1 < g.origin[1] + 4 * s
    ids = visible_tiles(g, (x0, y0, x1, y1))
    assert ids in ([], ["r3_c2"])


def test_refits_run_beside_the_encoder_and_cover_every_tile(
    make_napari_viewer, qtbot, live
) -> None:
    """Clusters are refitted while tiles are encoded (in a helper thread of the worker),
    and after the last batch the clusters cover every encoded tile; the cluster map then
    labels every shown tile with a cluster of the final fit."""
    from napari_sigmma.viewer.controller import LiveController

    viewer, layer = _viewer_with_he(make_napari_viewer, live)
    engine = _engine(live, batch_size=2)
    g = live["grid"]
    r, c = live["quad"]
    _look_at(viewer, live, c + 1.0, r + 1.0, 4.0)
    fit_threads: list[str] = []
    ctl = LiveController(
        viewer,
        layer,
        engine,
        k=3,
        debounce_ms=50,
        refit_growth=1.2,
        refit_min_new=2,
        refit_interval_s=0.0,
    )
    fit = ctl._maybe_fit

    def recording_fit(cancel, **kw):  # the real fit, noting the thread it ran in
        out = fit(cancel, **kw)
        if out is not None:
            fit_threads.append(threading.current_thread().name)
        return out

    ctl._maybe_fit = recording_fit
    n_visible = len(ctl.visible)
    assert n_visible >= 8
    _wait_idle(qtbot, ctl)
    assert len(engine.memory) >= n_visible
    assert ctl.clusters is not None and ctl.clusters.n_tiles == len(engine.memory)
    assert len(fit_threads) >= 3 and "sigmma-refit" in fit_threads
    labels = np.asarray(viewer.layers["SIGMMA clusters macro"].data)
    for t in ctl.overlays.shown_tiles():
        i = g.tile_ids.index(t)
        assert labels[g.rows[i], g.cols[i]] > 0, t  # macro: one label per tile
    left = [t.name for t in threading.enumerate() if t.name == "sigmma-refit"]
    assert not left
    ctl.close()
