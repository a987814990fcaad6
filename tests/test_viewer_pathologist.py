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
    item = legend.tree.topLevelItem(0).child(pick)  # rebuilt after the click
    legend.tree.itemClicked.emit(item, 0)
    assert np.asarray(cells.shown).all()


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
