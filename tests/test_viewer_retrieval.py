"""Retrieval and explore widgets in a real napari viewer (pytest-qt) with a tiny SIGMMA model
trained (briefly, once per module) on the embedded sample through the real trainer.

HE→ST: a simulated click (napari's own mouse-callback dispatch with an event at a world
position) on an H&E tile draws the query outline and numbered match rectangles and fills
the table; the table is checked against an independent numpy cosine ranking, and the rank of
the tile's own ST partner is measured over every tile. ST→HE: a polygon over cells (and a
points selection) returns H&E tiles. Explore: k, opacity, edge threshold, attention head and
scale toggles change the overlay layers without any encoder call.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("napari")

from _train_data import tiny_cfg

SCALE = "micro"


class Counted:
    """Counts calls of the model's encoder forwards (the real ones run)."""

    def __init__(self, model) -> None:
        self.n = 0
        for name in ("backbone_features", "encode_graph"):
            orig = getattr(model, name)

            def call(*a, _orig=orig, **k):
                self.n += 1
                return _orig(*a, **k)

            setattr(model, name, call)


@pytest.fixture(scope="module")
def trained(embedded_bundle, tmp_path_factory):
    from napari_sigmma.io import load_any
    from napari_sigmma.live.run import fit_run_gene_head, load_live_run
    from napari_sigmma.tiles.paired import PairedSlide
    from napari_sigmma.train.loop import train

    root = tmp_path_factory.mktemp("retrieval-run")
    cfg = tiny_cfg(
        embedded_bundle, root / "run", root / "features", epochs=8, batch_size=8, grad_accum=1,
        lr=3e-3, split_fractions=(1.0, 0.0, 0.0), patience=8,
    )  # fmt: skip
    result = train(cfg)
    assert result.status == "completed"
    run = load_live_run(root / "run")
    sdata = load_any(embedded_bundle)
    paired = PairedSlide.from_sdata(sdata, name="embedded")
    engine = run.engine(paired, device="cpu", cache_dir=root / "cache", batch_size=8)
    counter = Counted(engine.model)
    return SimpleNamespace(
        run=run, sdata=sdata, paired=paired, engine=engine, counter=counter,
        path=str(embedded_bundle), fit_head=fit_run_gene_head,
    )  # fmt: skip


def _viewer_with_he(make_napari_viewer, t):
    from napari_sigmma.viewer.layers import cells_layer, he_image_layer

    viewer = make_napari_viewer()
    data, kwargs, _ = he_image_layer(t.sdata, sdata_path=t.path)
    layer = viewer.add_image(data, **kwargs)
    pdata, pkw, _ = cells_layer(t.sdata, sdata_path=t.path)
    cells = viewer.add_points(pdata, **pkw)
    return viewer, layer, cells


def _click(viewer, world) -> None:
    """A left click (press, release, no move) through napari's viewer-level callback
    dispatch (what the canvas calls whatever layer is selected)."""
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    ev = SimpleNamespace(
        position=tuple(world), type="mouse_press", button=1, modifiers=(), is_dragging=False,
        handled=False, view_direction=None, dims_displayed=[0, 1], pos=(0, 0), delta=(0, 0),
    )  # fmt: skip
    mouse_press_callbacks(viewer, ev)
    ev.type = "mouse_release"
    mouse_release_callbacks(viewer, ev)


def _own_ranks(se, scale):
    """0-based rank of each tile's own ST embedding among all ST embeddings (HE query)."""
    ids = sorted(se.st[scale])
    he = np.stack([se.he[scale][i] for i in ids])
    st = np.stack([se.st[scale][i] for i in ids])
    he /= np.linalg.norm(he, axis=1, keepdims=True)
    st /= np.linalg.norm(st, axis=1, keepdims=True)
    sim = he @ st.T
    return ids, (sim > np.diag(sim)[:, None]).sum(axis=1), sim


def test_he_click_to_st_matches_and_st_to_he(make_napari_viewer, qtbot, trained, tmp_path):
    from napari.layers import Shapes

    from napari_sigmma.retrieval.query import RETRIEVAL_FILE, SlideEmbeddings
    from napari_sigmma.viewer.retrieval import (
        COL,
        RESULTS_LAYER,
        RetrievalWidget,
        save_retrieval_screenshot,
    )

    t = trained
    viewer, layer, cells = _viewer_with_he(make_napari_viewer, t)
    w = RetrievalWidget(viewer)
    qtbot.addWidget(w)
    w.set_engine(t.engine, layer)
    w.scale.setCurrentText(SCALE)
    w.top_k.setValue(5)
    grid = t.engine.grid
    # whole slide in a worker, with progress; the index is saved next to the disk cache
    worker = w.encode_all()
    assert worker is not None
    # not waitSignal(worker.finished): a worker that ends before the wait connects is missed
    qtbot.waitUntil(lambda: not w.busy and w.encode_button.isEnabled(), timeout=240_000)
    se = w.store.slide(t.paired.name)
    assert len(se) == len(grid)
    saved = Path(t.engine.disk.folder) / RETRIEVAL_FILE
    assert saved.is_file() and len(SlideEmbeddings.load(saved)) == len(grid)

    ids, ranks, sim = _own_ranks(se, SCALE)
    top1 = float(np.mean(ranks == 0))
    print(f"\n{SCALE}: own-partner top-1 {top1:.2f} over {len(ids)} tiles, median rank "
          f"{np.median(ranks) + 1:.0f} (chance top-1 {1 / len(ids):.3f})")  # fmt: skip
    # well above chance after the brief training (chance: median rank ~ n / 2)
    assert np.median(ranks) + 1 <= len(ids) / 4 and top1 > 1.0 / len(ids)

    # click the centre of the tile whose partner is ranked best (first such tile)
    q = ids[int(np.argmin(ranks))]
    x0, y0, x1, y1 = grid.bounds[q]
    world = layer.data_to_world(np.array([(y0 + y1) / 2, (x0 + x1) / 2]))
    n_before = t.counter.n
    _click(viewer, world)
    assert t.counter.n == n_before  # everything was indexed: the click encodes nothing
    assert w.last_query["direction"] == "he→st" and w.last_query["tile_index"] == q
    # the table against an independent ranking of the same embeddings
    j = ids.index(q)
    want = [ids[i] for i in np.argsort(-sim[j], kind="stable")[:5]]
    got = [m.tile_index for m in w.matches]
    assert got == want
    assert w.matches[0].tile_index == q  # the tile's own ST partner comes first
    assert w.table.rowCount() == 5
    col = COL
    assert w.table.item(0, 0).text() == "1"
    assert w.table.item(0, col["slide"]).text() == t.paired.name
    assert float(w.table.item(0, 1).text()) == pytest.approx(sim[j, j], abs=1e-3)
    assert "%" in w.table.item(0, col["cell types"]).text()  # cell types of the sample
    assert w.table.item(0, col["top genes"]).text() != "—"
    # each similarity with its percentile among every candidate ST tile (numpy check)
    pct = 100 * np.mean(sim[j] < sim[j, j] - 1e-6)
    assert float(w.table.item(0, col["percentile"]).text()) == pytest.approx(pct, abs=0.1)
    assert "own ST partner ranks 1 of" in w.status.text()
    res = next(ly for ly in viewer.layers if ly.name == RESULTS_LAYER)
    assert len(res.data) == 1 + 5  # query outline + 5 numbered matches
    labels = list(res.features["label"])
    assert labels[0] == "query" and labels[1].startswith("1: ")
    # the match rectangle lies inside its tile
    box = np.asarray(res.data[1])
    assert box[:, 1].min() >= x0 and box[:, 1].max() <= x1
    # clicking a row moves the camera there
    w.table.cellClicked.emit(2, 0)
    m = w.matches[2]
    cx, cy = (m.box_px[0] + m.box_px[2]) / 2, (m.box_px[1] + m.box_px[3]) / 2
    np.testing.assert_allclose(
        viewer.camera.center[-2:], layer.data_to_world(np.array([cy, cx]))[-2:], rtol=1e-6
    )
    # a drag is not a click: no new query
    w.last_query = {}
    from napari.utils.interactions import (
        mouse_move_callbacks,
        mouse_press_callbacks,
        mouse_release_callbacks,
    )

    ev = SimpleNamespace(position=tuple(world), type="mouse_press", button=1, modifiers=(),
                         is_dragging=False, handled=False)  # fmt: skip
    mouse_press_callbacks(viewer, ev)
    ev.type, ev.is_dragging = "mouse_move", True
    mouse_move_callbacks(viewer, ev)
    ev.type = "mouse_release"
    mouse_release_callbacks(viewer, ev)
    assert w.last_query == {}

    # a reference slide (here the same bundle again, encoded by the same model in its own
    # engine): its copy of the tile is found as well, with the same similarity
    ref_name = w.add_reference(t.path, blocking=True)
    assert ref_name != t.paired.name
    assert len(w.store.slide(ref_name)) == len(grid)
    top2 = w.query_tile(q)[:2]
    assert {(m.slide, m.tile_index) for m in top2} == {(t.paired.name, q), (ref_name, q)}
    assert top2[0].similarity == pytest.approx(top2[1].similarity, abs=1e-4)
    assert w.table.item(0, COL["slide"]).text() in (t.paired.name, ref_name)
    ref_row = next(i for i, m in enumerate(w.matches) if m.slide == ref_name)
    w.go_to(ref_row)
    assert "reference slide" in w.status.text()
    assert len(res.data) == 1 + sum(m.slide == t.paired.name for m in w.matches)

    # ST→HE: a polygon over the cells of a tile (drawn on a Shapes layer)
    loc = grid.locate(t.paired.cells_px)
    n_cells = np.bincount(loc[loc >= 0], minlength=len(grid))
    target = max(ids, key=lambda i: n_cells[i])
    x0, y0, x1, y1 = grid.bounds[target]
    pad = 0.15 * (x1 - x0)
    poly = np.array([[y0 + pad, x0 + pad], [y0 + pad, x1 - pad], [y1 - pad, x1 - pad],
                     [y1 - pad, x0 + pad]])  # fmt: skip
    shapes = Shapes([poly], shape_type="polygon", scale=layer.scale, name="selection")
    viewer.add_layer(shapes)
    viewer.layers.selection.active = shapes
    matches = w.query_selection()
    assert len(matches) == 5 and w.last_query["direction"] == "st→he"
    assert w.last_query["tile_index"] == target and w.last_query["n_cells"] > 0
    assert all(0 <= mt.tile_index < len(grid) for mt in matches)
    assert [mt.rank for mt in matches] == [1, 2, 3, 4, 5]
    back_ids = sorted(se.he[SCALE])
    he = np.stack([se.he[SCALE][i] for i in back_ids])
    v = se.st[SCALE][target]
    cos = he @ v / np.linalg.norm(he, axis=1) / np.linalg.norm(v)
    assert matches[0].tile_index == back_ids[int(np.argmax(cos))]
    # … or a selection of points in the cells layer
    rows = np.flatnonzero(loc == target)[:5]
    obs_index = np.asarray(cells.metadata["obs_index"])
    cells.selected_data = set(np.flatnonzero(np.isin(obs_index, rows)).tolist())
    viewer.layers.selection.active = cells
    assert set(w.selected_cells()) == set(rows)
    assert w.query_selection()[0].tile_index == matches[0].tile_index

    out = save_retrieval_screenshot(viewer, tmp_path / "retrieval.png")
    assert out.is_file() and out.stat().st_size > 1000
    w.close_workers()


def test_explore_changes_layers_without_encoding(make_napari_viewer, qtbot, trained):
    from napari_sigmma.viewer.controller import LiveController
    from napari_sigmma.viewer.explore import ExploreWidget, edge_prob_from_alpha

    t = trained
    eng = t.engine
    list(eng.encode(list(eng.grid.tile_ids)))  # cached when the retrieval test ran
    head = t.run.gene_head or t.fit_head(t.run, t.paired, engine=eng, save=False)
    viewer, layer, _ = _viewer_with_he(make_napari_viewer, t)
    # look at a 3×3 tile area around the tile with most cells
    g = eng.grid
    loc = g.locate(t.paired.cells_px)
    best = int(np.argmax(np.bincount(loc[loc >= 0], minlength=len(g))))
    x0, y0, x1, y1 = g.bounds[best]
    viewer.camera.center = tuple(layer.data_to_world(np.array([(y0 + y1) / 2, (x0 + x1) / 2])))
    viewer.camera.zoom = max(viewer.canvas.size) / (3 * (x1 - x0) * t.paired.he_mpp)
    n0 = t.counter.n
    ctl = LiveController(viewer, layer, eng, k=4, debounce_ms=30, gene_head=head)
    qtbot.waitUntil(lambda: not ctl.busy and bool(ctl.overlays.shown_tiles()), timeout=60_000)
    w = ExploreWidget(viewer)
    qtbot.addWidget(w)
    w.set_controller(ctl)
    assert w.gene.count() == len(head.genes)

    # opacity: every overlay layer
    w.opacity.setValue(25)
    sig = w.layers()
    assert sig and all(ly.opacity == pytest.approx(0.25) for ly in sig)
    # scales: meso on, micro off
    w.scale_boxes["meso"].setChecked(True)
    w.scale_boxes["micro"].setChecked(False)
    assert all(ly.visible for ly in w.layers("clusters", scale="meso"))
    assert not any(ly.visible for ly in w.layers(("clusters", "cell_clusters"), scale="micro"))
    # edge threshold: learned meso edges below p hidden, restored when lowered
    meso = w.layers("edges", scale="meso")[0]
    meso.visible = True
    ctl.refresh(immediate=True)
    qtbot.waitUntil(lambda: not ctl.busy, timeout=30_000)
    qtbot.waitUntil(lambda: bool((np.asarray(meso.edge_color)[:, 3] > 0).any()), timeout=10_000)
    alpha0 = np.asarray(meso.edge_color)[:, 3].copy()
    drawn = alpha0 > 0
    assert drawn.any()
    p = edge_prob_from_alpha(alpha0[drawn])
    # the spin box has 3 decimals: the median rounded up hides at least half of the edges
    thr = float(np.ceil(np.median(p) * 1000) / 1000)
    w.threshold.setValue(thr)
    alpha1 = np.asarray(meso.edge_color)[:, 3]
    assert np.all(alpha1[drawn][p < thr] == 0) and np.all(alpha1[drawn][p >= thr] > 0)
    assert meso.metadata["n_hidden_by_threshold"] == int((p < thr).sum()) > 0
    w.threshold.setValue(0.0)
    np.testing.assert_allclose(np.asarray(meso.edge_color)[:, 3], alpha0, atol=1e-6)
    # attention head
    # (the tiny model's backbone is a CNN, which has no attention: a heads × y × x layer as
    # the overlays make it for a ViT stands in)
    att = w.layers("attention")
    if not att:
        viewer.add_image(
            np.random.default_rng(0).random((3, 8, 8)).astype(np.float32), name="SIGMMA attention",
            metadata={"sigmma_kind": "attention", "heads": 3}, scale=(1, *layer.scale[-2:]),
        )  # fmt: skip
        w.reapply()
        att = w.layers("attention")
    heads = att[0].data.shape[0]
    assert w.head.maximum() == heads - 1
    w.head.setValue(heads - 1)
    assert viewer.dims.current_step[viewer.dims.ndim - 3] == heads - 1
    assert att[0].visible and w.head_label.text() == f"head {heads - 1}"
    # gene: predicted vs measured
    gene = head.genes[-1]
    w.gene.setCurrentText(gene)
    w.gene_kind.setCurrentText("measured")
    gl = w.layers(("gene_predicted", "gene_measured"))
    assert {ly.metadata["gene"] for ly in gl} == {gene}
    assert [ly.metadata["sigmma_kind"] for ly in gl if ly.visible] == ["gene_measured"]
    # k: refit on cached embeddings
    w.k.setValue(6)
    # the refit's result reaches the main thread after its worker is done: wait for it
    qtbot.waitUntil(
        lambda: ctl.clusters is not None and ctl.clusters.n_clusters == 6, timeout=30_000
    )
    assert ctl.k == 6
    assert t.counter.n == n0  # no encoder call for any of it
    ctl.close()


def test_queries_never_build_the_ivf_on_the_gui_thread(make_napari_viewer, qtbot, trained):
    """With the store above its IVF threshold, clicks query exactly (or through an IVF a
    worker built) and never build on the main thread: every build the indices record ran in
    a worker thread (the whole-slide worker, or the one a query starts)."""
    import threading

    from napari_sigmma.retrieval.query import SlideEmbeddings
    from napari_sigmma.viewer.retrieval import RetrievalWidget

    t = trained
    grid = t.engine.grid
    main = threading.main_thread().name
    viewer, layer, _ = _viewer_with_he(make_napari_viewer, t)
    # one slide stays below the threshold, it and two noisy copies are above it
    w = RetrievalWidget(viewer, ivf_min_size=len(grid) + 1)
    qtbot.addWidget(w)
    w.set_engine(t.engine, layer)
    w.scale.setCurrentText(SCALE)
    w.top_k.setValue(5)
    # (tiles cached by the first test: the worker may end before a waitSignal would connect)
    assert w.encode_all() is not None
    qtbot.waitUntil(lambda: not w.busy, timeout=240_000)
    se = w.store.slide(t.paired.name)
    assert len(se) == len(grid) and not w.store.needs_build()
    rng = np.random.default_rng(0)
    for c in range(2):
        copy = SlideEmbeddings(f"copy {c}", None, None)
        for s in ("micro", "meso", "macro"):
            for mod in ("he", "st"):
                src = getattr(se, mod)[s]
                getattr(copy, mod)[s] = {
                    i: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32)
                    for i, v in src.items()
                }
        w.store.add_slide(copy)  # on the main thread, as a reference's results are added
    st_index = w.store.index("st", SCALE)
    assert w.store.needs_build() and not st_index.is_ivf and not st_index.builds

    # a click now: answered exactly (checked against numpy over all three slides), no build
    ids, ranks, _ = _own_ranks(se, SCALE)
    q = ids[int(np.argmin(ranks))]
    x0, y0, x1, y1 = grid.bounds[q]
    world = layer.data_to_world(np.array([(y0 + y1) / 2, (x0 + x1) / 2]))
    _click(viewer, world)
    assert w.last_query["tile_index"] == q
    keys = [(name, i) for name in w.store.slides for i in sorted(w.store.slides[name].st[SCALE])]
    st = np.stack([w.store.slides[name].st[SCALE][i] for name, i in keys])
    st /= np.linalg.norm(st, axis=1, keepdims=True)
    v = se.he[SCALE][q] / np.linalg.norm(se.he[SCALE][q])
    want = [keys[i] for i in np.argsort(-(st @ v), kind="stable")[:5]]
    assert [(m.slide, m.tile_index) for m in w.matches] == want
    assert all(b["thread"] != main for b in st_index.builds)
    # … and the click started a worker that builds the due indices
    assert w._prepare_worker is not None or st_index.builds
    qtbot.waitUntil(lambda: not w.busy and not w.store.needs_build(), timeout=60_000)
    assert st_index.is_ivf and len(st_index) > len(grid)
    he_index = w.store.index("he", SCALE)
    builds = st_index.builds + he_index.builds
    assert builds and all(b["thread"] != main for b in builds)
    n_builds = len(st_index.builds)
    _click(viewer, world)  # through the IVF now; nothing is built
    assert len(st_index.builds) == n_builds
    got = [(m.slide, m.tile_index) for m in w.matches]
    assert got == [(s, i) for s, i, _ in st_index.query(v, 5)]
    assert len(set(got) & set(want)) >= 3  # the IVF (16 lists, half probed) ≈ exact
    assert all(b["thread"] != main for b in st_index.builds)
    w.close_workers()

    # the whole-slide worker's generator adds the tiles and builds the due indices in the
    # worker's own thread, after a (None, done, total) progress item
    from napari_sigmma.retrieval.query import RetrievalStore
    from napari_sigmma.viewer.retrieval import _encode_all

    store = RetrievalStore(ivf_min_size=16, build_in_query=False)
    items: list = []
    job = threading.Thread(
        target=lambda: items.extend(_encode_all(t.engine, threading.Event(), store, "s", [SCALE])),
        name="encode-worker",
    )
    job.start()
    job.join(120)
    assert not job.is_alive() and items[-1][0] is None and items[-1][1] == len(grid)
    for mod in ("he", "st"):
        idx = store.index(mod, SCALE)
        assert idx.is_ivf and idx.last_build_thread == "encode-worker"
    assert not store.index("st", "macro").is_ivf  # only the scales asked for
