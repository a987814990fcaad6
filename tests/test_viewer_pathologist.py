"""What a pathologist sees, in a real napari viewer (pytest-qt) on the embedded sample.

- the cells layer has one distinct colour per cell type (Glasbey), the legend lists every
  cell type with its count, and clicking one shows only its cells (again: all);
- the scale bar is on and the layers are in µm;
- with the live view (a real tiny ViT, random weights, and a gene head fitted on real
  encoded tiles): every continuous SIGMMA layer has a visible colourbar, the legend lists
  each scale's clusters with their patch counts and composition and isolates one on click,
  opening the widgets changes no layer, a retrieval click made while a cluster layer is
  selected returns matches and leaves the selection as it was;
- the dock and Explore agree on k after a change in either (one session per viewer).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("napari")

CONTINUOUS = ("gene_predicted", "gene_measured", "attention")


@pytest.fixture(scope="module")
def tiny(embedded_bundle, tmp_path_factory):
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
    n_cells = np.bincount(np.maximum(grid.locate(paired.cells_px), 0), minlength=len(grid))
    dense = [int(i) for i in np.argsort(-n_cells)[:4]]
    engine = EmbeddingEngine(
        model, paired, grid, featurizer=feat, device="cpu",
        cache_dir=tmp_path_factory.mktemp("patho-cache"), run="patho-test",
    )  # fmt: skip
    head = fit_gene_head(engine.encode_indices(dense), paired, grid, run="patho-test")
    engine.set_gene_head(head)
    return SimpleNamespace(
        sdata=sdata, path=str(embedded_bundle), paired=paired, grid=grid, engine=engine,
        head=head, best=dense[0],
    )  # fmt: skip


def _open_sample(make_napari_viewer, path):
    viewer = make_napari_viewer()
    viewer.open(path, plugin="napari-sigmma")
    he = next(ly for ly in viewer.layers if ly.metadata.get("element") == "he_image")
    cells = next(ly for ly in viewer.layers if ly.metadata.get("element") == "table")
    return viewer, he, cells


def _click(viewer, world) -> None:
    """A left click through napari's viewer-level mouse dispatch (what the canvas does
    whatever layer is selected)."""
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    ev = SimpleNamespace(
        position=tuple(world), type="mouse_press", button=1, modifiers=(), is_dragging=False,
        handled=False, view_direction=None, dims_displayed=[0, 1], pos=(0, 0), delta=(0, 0),
    )  # fmt: skip
    mouse_press_callbacks(viewer, ev)
    ev.type = "mouse_release"
    mouse_release_callbacks(viewer, ev)


def test_palette_has_30_distinct_colours() -> None:
    from napari_sigmma.viewer.palette import category_colours

    rgb = category_colours(40)
    assert len({tuple(np.round(c, 3)) for c in rgb}) == 40
    # distinct to the eye: every pair differs by at least 0.1 in some channel
    d = np.abs(rgb[:, None] - rgb[None]).max(axis=2) + np.eye(40)
    assert d.min() >= 0.1


def test_cell_types_coloured_listed_and_isolated(make_napari_viewer, qtbot, embedded_bundle):
    viewer, he, cells = _open_sample(make_napari_viewer, str(embedded_bundle))
    types = np.asarray(cells.features["cell_type"].astype(str))
    names, counts = np.unique(types, return_counts=True)
    assert len(names) >= 5
    # one distinct face colour per cell type, and one type per colour
    face = np.round(np.asarray(cells.face_color), 4)
    colours = {tuple(c) for c in face}
    assert len(colours) == len(names)
    for name in names:
        assert len({tuple(c) for c in face[types == name]}) == 1
    # cells are small (the nuclei stay visible at working zoom): under a nucleus' size
    assert float(np.mean(cells.size)) * float(cells.scale[-1]) <= 4.0

    # the dock turns the scale bar on; the layers are in µm
    viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA")
    assert viewer.canvas.overlays.scale_bar.visible
    for layer in (he, cells):
        assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]

    _, legend = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA legend")
    listed = [c for c in legend.categories() if c[0] == "category"]
    assert [c[3] for c in listed] == list(names)
    assert [c[4] for c in listed] == [int(n) for n in counts]
    # click one: only its cells are shown; click it again: all are
    top = legend.tree.topLevelItem(0)
    pick = 2
    item = top.child(pick)
    legend.tree.itemClicked.emit(item, 0)
    assert np.array_equal(np.asarray(cells.shown), types == names[pick])
    drawn, _ = _shown_points(cells)  # what is drawn, not only the flag
    assert len(drawn) == int((types == names[pick]).sum())
    item = legend.tree.topLevelItem(0).child(pick)  # rebuilt after the click
    legend.tree.itemClicked.emit(item, 0)
    assert np.asarray(cells.shown).all()
    assert np.array_equal(np.round(np.asarray(cells.face_color), 4), face)  # colours back


def test_live_layers_legend_colourbars_and_retrieval_click(make_napari_viewer, qtbot, tiny):
    from napari_sigmma.viewer.controller import LiveController
    from napari_sigmma.viewer.legend import ROLE
    from napari_sigmma.viewer.overlays import layer_name
    from napari_sigmma.viewer.session import session_for

    t = tiny
    viewer, he, _cells = _open_sample(make_napari_viewer, t.path)
    x0, y0, x1, y1 = t.grid.bounds[t.best]
    viewer.camera.center = tuple(he.data_to_world(np.array([(y0 + y1) / 2, (x0 + x1) / 2])))
    viewer.camera.zoom = max(viewer.canvas.size) / (3 * (x1 - x0) * t.paired.he_mpp)
    ctl = LiveController(viewer, he, t.engine, k=4, debounce_ms=30, gene_head=t.head)
    session_for(viewer).controller = ctl
    qtbot.waitUntil(lambda: not ctl.busy and bool(ctl.overlays.shown_tiles()), timeout=120_000)
    sig = [ly for ly in viewer.layers if ly.metadata.get("sigmma_kind")]
    before = {ly.name: (ly.visible, ly.opacity) for ly in sig}

    # opening the widgets changes no layer
    _, explore = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA explore")
    _, legend = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA legend")
    _, retrieval = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA retrieval")
    assert explore.controller is ctl  # it found the live view through the session
    assert {ly.name: (ly.visible, ly.opacity) for ly in sig} == before

    # every continuous SIGMMA layer: napari's colourbar on, and a named scale in the legend
    cont = [ly for ly in viewer.layers if ly.metadata.get("sigmma_kind") in CONTINUOUS]
    kinds = {ly.metadata["sigmma_kind"] for ly in cont}
    assert {"gene_predicted", "gene_measured", "attention"} <= kinds
    for layer in cont:
        assert layer.colorbar.visible, layer.name
    legend.refresh()
    tops = [legend.tree.topLevelItem(i) for i in range(legend.tree.topLevelItemCount())]
    scales = [it for it in tops if it.text(0) == "colour scales"]
    assert scales, "no colour-scale section"
    rows = [scales[0].child(i).text(0) for i in range(scales[0].childCount())]
    gene = ctl.overlays.genes[0]
    assert f"gene {gene} (predicted)" in rows and f"gene {gene} (measured)" in rows
    assert any(r.startswith("attention head") for r in rows)
    assert "meso edge probability" in rows

    # the legend lists each scale's clusters with patch counts and what they are made of
    micro = layer_name("clusters", "micro")
    raster = np.asarray(viewer.layers[micro].data)
    clusters = [c for c in legend.categories() if c[0] == "cluster" and c[1] == micro]
    want = np.bincount(raster.ravel(), minlength=5)[1:5]
    assert [c[4] for c in clusters] == [int(v) for v in want]
    assert {c[1] for c in legend.categories() if c[0] == "cluster"} == {
        layer_name("clusters", s) for s in ("micro", "meso", "macro")
    }
    present = [c for c in clusters if c[4] > 0]
    keys = {("cluster", micro, c[2]) for c in present}
    made_of = [
        top.child(j).text(2)
        for top in tops
        for j in range(top.childCount())
        if tuple(top.child(j).data(0, ROLE) or ()) in keys
    ]
    assert made_of and all("%" in m for m in made_of)  # cell types with their share
    # click a cluster: only its patches are shown; again: all
    key = ("cluster", micro, present[0][2])
    legend.toggle(key)
    layer = viewer.layers[micro]
    assert layer.show_selected_label and layer.selected_label == present[0][2] + 1
    legend.toggle(key)
    assert not layer.show_selected_label

    # a retrieval click while a cluster layer is selected: matches, selection unchanged
    retrieval.attach_live()
    viewer.layers.selection.active = layer
    selected = set(viewer.layers.selection)
    world = he.data_to_world(np.array([(y0 + y1) / 2, (x0 + x1) / 2]))
    _click(viewer, world)
    assert retrieval.last_query.get("tile_index") == t.best
    assert len(retrieval.matches) > 0
    assert viewer.layers.selection.active is layer and set(viewer.layers.selection) == selected
    # each match with its percentile among every candidate
    pct = float(retrieval.table.item(0, 2).text())
    assert 0.0 <= pct <= 100.0
    assert "partner ranks" in retrieval.status.text()
    retrieval.close_workers()
    ctl.close()


def test_widgets_agree_on_k(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    _, dock = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA")
    _, explore = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA explore")
    _, retrieval = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA retrieval")
    assert dock.k.value() == explore.k.value()
    dock.k.setValue(13)
    assert explore.k.value() == 13
    explore.k.setValue(5)
    assert dock.k.value() == 5
    # one scale for the live view and retrieval: the live view's default
    assert retrieval.scale.currentText() == "micro"
    # "H&E" on a button: Qt takes a single "&" as a mnemonic and shows "HE"
    assert "H&&E" in retrieval.cells_button.text()
    # a second viewer has its own session
    other = make_napari_viewer()
    _, dock2 = other.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA")
    assert dock2.session is not dock.session and dock2.k.value() == 8


# -- hover, colour by, isolation on the cells, model change, gene-map scale (issue 16) --------
def _live(make_napari_viewer, qtbot, t, *, k: int = 4):
    """A live view on the embedded sample, zoomed on the densest tile, drawn."""
    from napari_sigmma.viewer.controller import LiveController
    from napari_sigmma.viewer.session import session_for

    viewer, he, cells = _open_sample(make_napari_viewer, t.path)
    x0, y0, x1, y1 = t.grid.bounds[t.best]
    viewer.camera.center = tuple(he.data_to_world(np.array([(y0 + y1) / 2, (x0 + x1) / 2])))
    viewer.camera.zoom = max(viewer.canvas.size) / (3 * (x1 - x0) * t.paired.he_mpp)
    ctl = LiveController(viewer, he, t.engine, k=k, debounce_ms=30, gene_head=t.head)
    session_for(viewer).controller = ctl
    # drawn: tiles shown and the clusters fitted (the refit worker starts once the encode
    # worker has ended, so "not busy" alone can fall in the gap between the two)
    qtbot.waitUntil(
        lambda: not ctl.busy and bool(ctl.overlays.shown_tiles()) and ctl.clusters is not None,
        timeout=120_000,
    )
    _settle(qtbot, ctl)
    return viewer, he, cells, ctl


def _settle(qtbot, ctl) -> None:
    qtbot.waitUntil(lambda: not ctl.busy, timeout=60_000)
    ctl.overlays.flush()


def _shown_points(layer) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(y, x)`` and RGBA of the points a points layer draws: the points napari
    hands to the renderer (``_view_indices``: napari 0.9 puts every point of a 2-D layer
    there, whatever ``shown`` says) that are not transparent."""
    idx = np.asarray(layer._view_indices, dtype=np.int64)
    face = np.asarray(layer.face_color)[idx]
    keep = face[:, 3] > 0
    return np.asarray(layer.data)[idx][keep], face[keep]


def _cells_at(t, yx: np.ndarray) -> np.ndarray:
    """Cell (row of the table) at each level-0 ``(y, x)`` (exact centroid match)."""
    index = {tuple(np.round(p, 6)): i for i, p in enumerate(t.paired.cells_px[:, ::-1])}
    return np.array([index[tuple(np.round(p, 6))] for p in yx], dtype=np.int64)


def _status_at(viewer, world, layer) -> str:
    """napari's own cursor status (what the status bar shows) with ``layer`` active."""
    viewer.layers.selection.active = layer
    viewer.mouse_over_canvas = True
    viewer.cursor.position = tuple(float(v) for v in world)
    viewer.update_status_from_cursor()
    status = viewer.status
    return status["coordinates"] if isinstance(status, dict) else str(status)


def test_hover_names_cluster_cell_type_and_value(make_napari_viewer, qtbot, tiny):
    import time

    from napari_sigmma.viewer.legend import describe_clusters
    from napari_sigmma.viewer.overlays import layer_name
    from napari_sigmma.viewer.palette import glasbey

    t = tiny
    viewer, he, _cells, ctl = _live(make_napari_viewer, qtbot, t)
    ov = ctl.overlays
    r = ov.tiles[t.grid.tile_ids[t.best]]
    types = np.asarray(t.paired.obs["cell_type"].astype(str))
    # a cell of the encoded tile, the cursor on its centroid
    cell = int(r.cell_index[len(r.cell_index) // 2])
    x, y = t.paired.cells_px[cell]
    world = he.data_to_world(np.array([y, x]))

    # the micro cluster layer: the cluster napari reads there, its composition, the cell type
    micro = viewer.layers[layer_name("clusters", "micro")]
    label = int(micro.get_value(world, world=True))
    assert label > 0
    desc = next(d for d in describe_clusters(ov, "micro", genes=False) if d["cluster"] == label - 1)
    top_type = desc["types"][0][0]
    text = _status_at(viewer, world, micro)
    assert f"micro cluster {label} ({top_type} " in text, text
    assert f"cell {t.paired.cell_ids[cell]}: {types[cell]}" in text, text

    # the SIGMMA cells layer: the cell's cluster is the one its point is coloured with
    pts = viewer.layers[layer_name("cells", "micro")]
    pts.visible = True
    _settle(qtbot, ctl)
    slot = pts.get_value(world, world=True)
    assert slot is not None
    rgb = np.asarray(pts.face_color)[slot][:3]
    colour_index = int(np.argmin(np.abs(glasbey() - rgb).sum(axis=1)))
    text = _status_at(viewer, world, pts)
    assert f"{types[cell]}, micro cell cluster {colour_index + 1}" in text, text

    # a gene map: the gene, predicted, and the value napari reads there
    gene = ov.genes[0]
    pred = viewer.layers[layer_name(f"gene {gene} predicted")]
    pred.visible = True
    _settle(qtbot, ctl)  # a shown layer is brought up to date
    value = float(pred.get_value(world, world=True))
    text = _status_at(viewer, world, pred)
    assert f"{gene} predicted: {value:.3g} (log1p)" in text, text
    assert f"micro cluster {label}" in text and types[cell] in text

    # attention: the head and its value
    att = viewer.layers[layer_name("attention")]
    att.visible = True
    _settle(qtbot, ctl)
    value = float(att.get_value(world, world=True))
    assert f"attention head 0: {value:.2f}" in _status_at(viewer, world, att)

    # a learned-edge layer: the edges at this cell, counted from the tile's result
    edges = viewer.layers[layer_name("edges", "meso")]
    pairs, _prob = r.edges["meso"]
    n = int(((pairs[:, 0] == cell) | (pairs[:, 1] == cell)).sum())
    text = _status_at(viewer, world, edges)
    assert f"{n} learned meso edges at this cell" in text, text
    assert "meso cluster" in text  # the cluster at the layer's own scale

    # the main-thread cost of the SIGMMA part of a status update, at 200 positions
    rng = np.random.default_rng(0)
    x0, y0, x1, y1 = t.grid.bounds[t.best]
    ctl.hover.ms.clear()
    t0 = time.perf_counter()
    for _ in range(200):
        p = he.data_to_world(np.array([rng.uniform(y0, y1), rng.uniform(x0, x1)]))
        assert "micro cluster" in _status_at(viewer, p, micro)
    total = (time.perf_counter() - t0) * 1000 / 200
    ms = np.asarray(ctl.hover.ms)
    assert ms.size >= 200
    print(
        f"hover: SIGMMA text median {np.median(ms):.3f} ms, p95 {np.percentile(ms, 95):.3f} ms, "
        f"max {ms.max():.2f} ms; whole status update {total:.2f} ms"
    )
    assert np.median(ms) < 5.0
    ctl.close()


def test_colour_cells_by_gene_and_column(make_napari_viewer, qtbot, tiny):
    import scipy.sparse as sp

    from napari_sigmma.viewer.colour_by import CLUSTERS
    from napari_sigmma.viewer.overlays import layer_name
    from napari_sigmma.viewer.palette import glasbey

    t = tiny
    viewer, _he, _cells, ctl = _live(make_napari_viewer, qtbot, t)
    _, explore = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA explore")
    _, legend = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA legend")
    items = [explore.colour_by.itemText(i) for i in range(explore.colour_by.count())]
    assert items[0] == CLUSTERS and "cell_type" in items and "cell_id" not in items
    assert set(t.paired.genes) <= set(items)
    pts = viewer.layers[layer_name("cells", "micro")]

    # a gene: the gene with the most varied expression among the cells in view
    cells_in_view = np.concatenate([r.cell_index for r in ctl.overlays.tiles.values()])
    counts = sp.csr_matrix(t.paired.counts)
    tot = np.asarray(counts.sum(axis=1)).ravel()
    norm = sp.diags(np.where(tot > 0, t.head.target_sum / np.maximum(tot, 1e-12), 0)) @ counts
    expr = np.log1p(np.asarray(norm.todense()))
    gene = t.paired.genes[int(np.argmax(expr[cells_in_view].std(axis=0)))]
    explore.colour_by.setCurrentText(gene)  # typed in full: colours by it
    assert explore.session.colour_by == gene
    _settle(qtbot, ctl)
    assert pts.visible  # the cells are what gets coloured
    yx, rgba = _shown_points(pts)
    cells = _cells_at(t, yx)
    assert len(cells) > 20
    e = expr[cells, t.paired.genes.index(gene)]
    # viridis' luminance rises with the value: the colours follow the expression
    lum = rgba[:, :3] @ np.array([0.2126, 0.7152, 0.0722])
    rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable")  # noqa: E731
    rho = np.corrcoef(rank(e), rank(lum))[0, 1]
    assert rho > 0.9, rho
    assert len({tuple(np.round(c, 3)) for c in rgba}) > 5
    # the tiles by that gene, with napari's colourbar; the legend names the gene's scale
    tiles = viewer.layers[layer_name(f"tiles by {gene}")]
    assert tiles.visible and tiles.colorbar.visible
    legend.refresh()
    scales = next(
        legend.tree.topLevelItem(i)
        for i in range(legend.tree.topLevelItemCount())
        if legend.tree.topLevelItem(i).text(0) == "colour scales"
    )
    rows = [scales.child(i).text(0) for i in range(scales.childCount())]
    assert f"cells & tiles by gene {gene}" in rows

    # a categorical column: one colour per category present, and the legend lists them all
    explore.colour_by.setCurrentText("cell_type")
    _settle(qtbot, ctl)
    assert layer_name(f"tiles by {gene}") not in viewer.layers  # replaced
    yx, rgba = _shown_points(pts)
    cells = _cells_at(t, yx)
    types = np.asarray(t.paired.obs["cell_type"].astype(str))
    present = sorted(set(types[cells]))
    assert len({tuple(np.round(c, 4)) for c in rgba}) == len(present) >= 3
    for name in present:  # one colour per type
        assert len({tuple(np.round(c, 4)) for c in rgba[types[cells] == name]}) == 1
    legend.refresh()
    listed = [c for c in legend.categories() if c[0] == "colour"]
    assert [c[3] for c in listed] == sorted(set(types))
    assert sum(c[4] for c in listed) == len(cells_in_view)
    # click one: only its cells; again: all
    pick = next(c for c in listed if c[3] == present[0])
    legend.toggle(pick[:3])
    yx_iso, _ = _shown_points(pts)
    assert set(types[_cells_at(t, yx_iso)]) == {present[0]}
    assert len(yx_iso) == int((types[cells] == present[0]).sum())
    legend.toggle(pick[:3])
    assert len(_shown_points(pts)[0]) == len(cells)

    # back to the clusters: cluster colours, the tiles layer gone
    explore.set_colour_by(CLUSTERS)
    _settle(qtbot, ctl)
    assert not any(ly.name.startswith(layer_name("tiles by ")) for ly in viewer.layers)
    _, rgba = _shown_points(pts)
    # every point in the colour of one of the k = 4 clusters
    dist = np.abs(rgba[:, None, :3] - glasbey()[None, :4].astype(np.float64)).max(axis=2)
    assert (dist.min(axis=1) < 1e-3).all()
    ctl.close()


def test_legend_cluster_isolates_its_cells(make_napari_viewer, qtbot, tiny):
    from napari_sigmma.viewer.overlays import layer_name
    from napari_sigmma.viewer.palette import glasbey

    t = tiny
    viewer, _he, _cells, ctl = _live(make_napari_viewer, qtbot, t)
    _, legend = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA legend")
    pts = viewer.layers[layer_name("cells", "micro")]
    pts.visible = True
    _settle(qtbot, ctl)
    _, rgba = _shown_points(pts)
    n_all = len(rgba)
    index = np.argmin(np.abs(rgba[:, None, :3] - glasbey()[None, :16]).sum(axis=2), axis=1)
    c = int(np.bincount(index).argmax())  # the cluster with most cells in view
    micro = layer_name("clusters", "micro")
    legend.refresh()
    assert ("cluster", micro, c) in [k[:3] for k in legend.categories()]
    legend.toggle(("cluster", micro, c))
    assert viewer.layers[micro].show_selected_label
    _, iso = _shown_points(pts)
    assert 0 < len(iso) < n_all
    assert len(iso) == int((index == c).sum())
    assert np.allclose(iso[:, :3], glasbey()[c], atol=1e-3)
    # other scales' cells are untouched; new tiles keep the isolation (the mask is the rule)
    legend.toggle(("cluster", micro, c))
    assert len(_shown_points(pts)[0]) == n_all
    assert not viewer.layers[micro].show_selected_label
    ctl.close()


def test_gene_maps_share_one_unsaturated_scale(make_napari_viewer, qtbot, tiny):
    from napari_sigmma.analysis.genehead import measured_expression
    from napari_sigmma.viewer.overlays import layer_name

    t = tiny
    viewer, _he, _cells, ctl = _live(make_napari_viewer, qtbot, t)
    gene = ctl.overlays.genes[0]
    pred = viewer.layers[layer_name(f"gene {gene} predicted")]
    meas = viewer.layers[layer_name(f"gene {gene} measured")]
    # the measured map is what the head was trained to predict: each cell scaled over all
    # the head's genes (scaling over the one gene put every cell with any of it at the top)
    expr, n = measured_expression(
        t.paired, t.grid, genes=t.head.genes, target_sum=t.head.target_sum, micro=True
    )
    j = t.head.gene_index([gene])[0]
    want = np.full(np.shape(meas.data), np.nan, np.float32)
    for k in range(len(t.grid)):
        rr, cc = int(t.grid.rows[k]), int(t.grid.cols[k])
        block = np.where(n[k] > 0, expr[k, :, j], np.nan).reshape(4, 4)
        want[rr * 4 : (rr + 1) * 4, cc * 4 : (cc + 1) * 4] = block
    np.testing.assert_allclose(np.asarray(meas.data), want, rtol=1e-5, atol=1e-5)
    v = want[np.isfinite(want)]
    assert np.mean(v >= v.max() - 0.02 * (v.max() - v.min())) < 0.1  # no plateau at the top
    assert tuple(pred.contrast_limits) == tuple(meas.contrast_limits)
    lo, hi = pred.contrast_limits
    for layer in (pred, meas):
        v = np.asarray(layer.data, dtype=np.float64)
        v = v[np.isfinite(v)]
        assert v.size > 0
        # at most 1 % of either map (one value of a small one) at either end of the scale
        most = max(1, int(np.ceil(0.01 * v.size)))
        assert int(np.sum(v > hi + 1e-6)) <= most, layer.name
        assert int(np.sum(v < lo - 1e-6)) <= most, layer.name
        # and the map uses the scale: not a sliver of it
        assert np.percentile(v, 99) - np.percentile(v, 1) >= 0.2 * (hi - lo), layer.name
    ctl.close()


def _perturbed_copy(src_run, dst_run, seed: int):
    """A copy of a run whose checkpoint holds other weights (another model, another hash)."""
    import shutil

    import torch

    from napari_sigmma.train.checkpoint import resolve_checkpoint

    if not dst_run.exists():
        shutil.copytree(src_run, dst_run)
    ckpt_path = resolve_checkpoint(dst_run)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(seed)
    for key, value in ckpt["model"].items():
        if value.is_floating_point() and value.ndim == 2:
            ckpt["model"][key] = value + 0.05 * torch.randn(value.shape, generator=gen)
    torch.save(ckpt, ckpt_path)
    return ckpt_path


def test_model_change_clears_stale_overlays(
    make_napari_viewer, qtbot, tiny_trained_run, synthetic_small, tmp_path
):
    from pathlib import Path

    from napari_sigmma.train.checkpoint import resolve_checkpoint

    run_a = Path(tiny_trained_run.run_dir)
    ckpt_a = resolve_checkpoint(run_a)
    ckpt_b = _perturbed_copy(run_a, tmp_path / "run_b", seed=1)
    viewer = make_napari_viewer()
    viewer.open(str(synthetic_small), plugin="napari-sigmma")
    _, dock = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA")
    _, retrieval = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA retrieval")

    def overlays() -> list:
        return [ly for ly in viewer.layers if ly.metadata.get("sigmma_kind")]

    def live_with(path) -> str:
        """Load ``path`` (the live view on), wait until its overlays are drawn; its hash."""
        dock.set_checkpoint(str(path))
        qtbot.waitUntil(
            lambda: (
                not dock.busy
                and dock.controller is not None
                and dock.controller.engine.checkpoint_hash == dock.run.checkpoint_hash
                and not dock.controller.busy
                and bool(dock.controller.overlays.shown_tiles())
            ),
            timeout=180_000,
        )
        return dock.run.checkpoint_hash

    dock.live.setChecked(True)
    hash_a = live_with(ckpt_a)
    assert retrieval.attach_live()
    retrieval.query_at_world(viewer.camera.center[-2:])  # a results overlay of model A
    assert {ly.metadata.get("checkpoint_hash") for ly in overlays()} == {hash_a}
    kinds_a = {ly.metadata["sigmma_kind"] for ly in overlays()}
    assert {"clusters", "retrieval"} <= kinds_a

    # another checkpoint: nothing of model A stays; the live view drew model B's overlays
    hash_b = live_with(ckpt_b)
    assert hash_b != hash_a
    hashes = {ly.metadata.get("checkpoint_hash") for ly in overlays()}
    assert hashes == {hash_b}, hashes
    assert "clusters" in {ly.metadata["sigmma_kind"] for ly in overlays()}
    # retrieval follows the new live view: a new query's overlay records model B
    assert retrieval.engine.checkpoint_hash == hash_b
    retrieval.query_at_world(viewer.camera.center[-2:])
    assert viewer.layers["SIGMMA retrieval"].metadata["checkpoint_hash"] == hash_b

    # the same file rewritten (a new run into the same folder): its new model replaces it
    _perturbed_copy(run_a, tmp_path / "run_b", seed=2)
    hash_c = live_with(ckpt_b)
    assert hash_c not in (hash_a, hash_b)
    assert {ly.metadata.get("checkpoint_hash") for ly in overlays()} <= {hash_c}

    # live off and on with the same model: the layers are replaced, never doubled
    names = sorted(ly.name for ly in overlays())
    dock.live.setChecked(False)
    dock.live.setChecked(True)
    qtbot.waitUntil(
        lambda: dock.controller is not None and not dock.controller.busy and not dock.busy,
        timeout=120_000,
    )
    assert sorted(ly.name for ly in overlays()) == names
    assert len({ly.name for ly in viewer.layers}) == len(viewer.layers)
    retrieval.close_workers()
    dock.close_workers()
