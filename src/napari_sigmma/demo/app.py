"""``napari-sigmma demo``: napari on the embedded sample with the plugin's widgets and the
live SIGMMA overlays of the demo model.

The demo model (vit_tiny, so the attention heads are a trained ViT's) is trained on the
embedded sample on first use, with progress printed, and cached. With ``screenshots`` set,
the viewer is shown (a screenshot needs a real, shown window; under Xvfb that is a virtual
screen), one screenshot per overlay kind is written there, and the program exits. The
screenshots are of the whole window: the legend panel (cell types, each scale's clusters
with what they are made of, the colour scales) is docked beside the canvas, and the
continuous layers (gene maps, attention) show their colourbars.

The gene-map screenshot shows the measured and the predicted map side by side on one colour
scale: each map's 1st–99th percentile range, joined (at most 1 % of either map is clipped
at either end), with the measured expression normalised as the gene head's targets are
(each cell scaled over all the head's genes). Two more show the cells and tiles coloured by
a table column (``cell_type``: a categorical legend) and by the mapped gene (a colourbar).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OVERLAY_SHOTS = {
    "02_clusters.png": ("clusters", "cell_clusters"),
    "03_learned_edges.png": ("edges",),
    "04_attention_heads.png": ("attention",),
    "05_gene_maps.png": ("gene_predicted", "gene_measured"),
}


#: the legend sections each screenshot opens (the others are collapsed to their titles)
LEGEND_FOCUS = {
    "02_clusters.png": ("micro clusters", "meso clusters"),
    "03_learned_edges.png": ("colour scales",),
    "04_attention_heads.png": ("colour scales",),
    "05_gene_maps.png": ("colour scales",),
    "08_cells_by_cell_type.png": ("cells & tiles by",),
    "09_cells_by_gene.png": ("colour scales",),
}


def _front(widget: Any) -> None:
    """Bring a docked widget's tab to the front."""
    widget.parent().raise_()
    _process_events(0.2)


def _focus_legend(legend: Any, prefixes: tuple[str, ...]) -> None:
    """Open the legend sections whose titles start with ``prefixes``; fold the others."""
    tree = legend.tree
    for i in range(tree.topLevelItemCount()):
        item = tree.topLevelItem(i)
        item.setExpanded(item.text(0).startswith(prefixes))
    tree.scrollToTop()


def _process_events(seconds: float = 0.5) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    """Run the Qt event loop until ``cond()`` holds or ``timeout`` seconds pass."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        QApplication.processEvents()
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def save_window_screenshot(viewer: Any, path: Path) -> Path:
    """Write a screenshot of the whole napari window (canvas and docks) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _process_events(0.5)
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    return path


def _overlay_layers(viewer: Any) -> list[Any]:
    return [ly for ly in viewer.layers if (ly.metadata or {}).get("sigmma_kind")]


def _show_only(viewer: Any, kinds: tuple[str, ...]) -> None:
    for layer in _overlay_layers(viewer):
        layer.visible = layer.metadata.get("sigmma_kind") in kinds


def _zoom_to_tissue(viewer: Any, dock: Any, *, tiles_across: int = 4) -> None:
    """Centre the camera on the densest tissue and zoom so a few tiles are on screen."""
    import numpy as np

    layer = next(ly for ly in viewer.layers if (ly.metadata or {}).get("element") == "he_image")
    cells = next(
        (ly for ly in viewer.layers if (ly.metadata or {}).get("element") == "table"), None
    )
    mpp = float(layer.scale[-1])
    if cells is not None and len(cells.data):
        # layer data are H&E pixels; the world (camera) is µm: data x scale + translate
        yx = np.asarray(cells.data)[:, -2:]
        centre = np.median(yx, axis=0) * np.asarray(cells.scale[-2:]) + np.asarray(
            cells.translate[-2:]
        )
    else:
        h, w = layer.data[0].shape[:2] if layer.multiscale else layer.data.shape[:2]
        centre = np.array([h / 2 * mpp, w / 2 * mpp])
    viewer.camera.center = tuple(centre)
    canvas_w = max(int(viewer.canvas.size[-1]), 400)  # (height, width)
    tile_um = 256 * 0.5
    viewer.camera.zoom = canvas_w / (tiles_across * tile_um)


def run_demo(
    *,
    out: str | os.PathLike[str] | None = None,
    screenshots: str | os.PathLike[str] | None = None,
    train_epochs: int | None = None,
) -> int:
    """Open napari on the embedded sample with the SIGMMA docks and live overlays.

    Parameters
    ----------
    out
        Cache folder for the generated sample and the demo model (default: the project
        cache, ``$SIGMMA_CACHE`` or ``~/.cache/napari-sigmma``).
    screenshots
        If given, write screenshots here and exit instead of handing over to the user.
    train_epochs
        Epochs for the demo model when it has to be trained.

    Returns
    -------
    int
        Process exit code.
    """
    import napari

    from napari_sigmma.demo.model import demo_model
    from napari_sigmma.samples.embedded import embedded_sample

    sample = embedded_sample(cache_dir=out)
    print(f"embedded sample: {sample}", flush=True)
    t0 = time.monotonic()
    ckpt = demo_model(cache_dir=out, epochs=train_epochs)
    print(f"demo model: {ckpt} ({time.monotonic() - t0:.0f} s)", flush=True)

    viewer = napari.Viewer(title="napari-sigmma demo", show=True)
    viewer.window.resize(1700, 1000)
    viewer.open(str(sample), plugin="napari-sigmma")
    _, dock = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA")
    _, training = viewer.window.add_plugin_dock_widget(
        "napari-sigmma", "SIGMMA training", tabify=True
    )
    # the legend says what each colour means: a tab beside the dock and the training form,
    # with the whole right-hand column (the training form is too tall to share it), brought
    # to the front once the overlays are drawn
    _, legend = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA legend", tabify=True)
    _front(dock)
    folder = Path(screenshots) if screenshots is not None else None
    written: list[Path] = []
    if folder is not None:
        written.append(save_window_screenshot(viewer, folder / "01_sample_and_dock.png"))

    dock.set_checkpoint(str(ckpt))
    _zoom_to_tissue(viewer, dock)
    dock.live.setChecked(True)
    if folder is None:
        _front(legend)
        napari.run()
        return 0

    def ready() -> bool:
        now = time.monotonic()
        if now - state["said"] > 10:
            state["said"] = now
            kinds = sorted({ly.metadata["sigmma_kind"] for ly in _overlay_layers(viewer)})
            print(f"  live: {dock.live_status.text()!r} overlays={kinds}", flush=True)
        return (
            dock.controller is not None
            and len(_overlay_layers(viewer)) >= 5
            and not dock.controller.busy
        )

    state = {"said": time.monotonic()}
    ok = wait_for(ready, timeout=600)
    if not ok:
        print(f"live overlays did not finish: {dock.live_status.text()}", flush=True)
    _process_events(1.0)
    _front(legend)
    for name, kinds in OVERLAY_SHOTS.items():
        _show_only(viewer, kinds)
        legend.refresh()
        _focus_legend(legend, LEGEND_FOCUS[name])
        if "gene_measured" in kinds:
            # measured and predicted side by side in napari's grid view (one camera)
            from napari_sigmma.viewer.legend import side_by_side

            side_by_side(viewer, True)
            _process_events(2.0)
            written.append(save_window_screenshot(viewer, folder / name))
            side_by_side(viewer, False)
            continue
        written.append(save_window_screenshot(viewer, folder / name))
    written.extend(_colour_by_screenshots(viewer, dock, legend, folder))
    for layer in _overlay_layers(viewer):
        layer.visible = True
    written.extend(_retrieval_screenshot(viewer, folder))
    written.extend(_training_screenshot(viewer, training, folder, out))
    for path in written:
        print(f"screenshot: {path}", flush=True)
    training.close_answer = True
    dock.live.setChecked(False)  # stops the controller and its workers
    _close_cleanly(viewer)
    return 0 if ok else 1


def _colour_by_screenshots(viewer: Any, dock: Any, legend: Any, folder: Path) -> list[Path]:
    """The micro cells and the tiles coloured by ``cell_type`` (legend) and by the mapped
    gene (colourbar), through the shared session (what Explore's "Colour cells by" sets)."""
    from napari_sigmma.viewer.session import session_for

    ctrl = dock.controller
    if ctrl is None or ctrl.overlays is None:
        return []
    session = session_for(viewer)
    gene = ctrl.overlays.genes[0] if ctrl.overlays.genes else None
    # the reader's cells layer (coloured by cell type) would hide what the colours say
    table_cells = [ly for ly in viewer.layers if (ly.metadata or {}).get("element") == "table"]
    was = [ly.visible for ly in table_cells]
    for layer in table_cells:
        layer.visible = False
    shots = []
    for name, what in (("08_cells_by_cell_type.png", "cell_type"), ("09_cells_by_gene.png", gene)):
        if what is None or what not in (*ctrl.paired.obs.columns, *ctrl.paired.genes):
            continue
        session.colour_by = what
        for layer in _overlay_layers(viewer):
            meta = layer.metadata
            layer.visible = meta.get("sigmma_kind") == "tile_colour" or (
                meta.get("sigmma_kind") == "cell_clusters" and meta.get("scale") == "micro"
            )
        wait_for(lambda: not ctrl.busy, timeout=120)
        legend.refresh()
        _focus_legend(legend, LEGEND_FOCUS[name])
        shots.append(save_window_screenshot(viewer, folder / name))
    session.colour_by = ""
    for layer, visible in zip(table_cells, was, strict=True):
        layer.visible = visible
    return shots


def _close_cleanly(viewer: Any) -> None:
    """Let background workers (a model loader may still run) end before the process does."""
    from napari.qt.threading import WorkerBase

    WorkerBase.await_workers(msecs=120_000)
    _process_events(0.2)
    viewer.close()


def _retrieval_screenshot(viewer: Any, folder: Path) -> list[Path]:
    """Click-equivalent HE→ST query on the tile at the centre of the view, then screenshot."""
    from napari_sigmma.viewer.retrieval import save_retrieval_screenshot

    _, retrieval = viewer.window.add_plugin_dock_widget(
        "napari-sigmma", "SIGMMA retrieval", tabify=True
    )
    if not retrieval.attach_live():
        print("retrieval: no live engine, skipped", flush=True)
        return []
    retrieval.encode_all(blocking=True)  # every tile's ST embedding is a candidate
    matches = retrieval.query_at_world(viewer.camera.center[-2:])
    print(f"retrieval: {len(matches)} matches, best similarity {matches[0].similarity:.2f}")
    # the H&E and the match rectangles only
    hidden = [
        ly
        for ly in viewer.layers
        if ly.visible and ly.name != "SIGMMA retrieval" and ly.metadata.get("element") != "he_image"
    ]
    for layer in hidden:
        layer.visible = False
    retrieval.parent().raise_()
    shot = save_retrieval_screenshot(
        viewer, str(folder / "07_retrieval_result.png"), canvas_only=False
    )
    # that call zoomed to the query and its matches: let the pyramid load, then shoot again
    _process_events(2.0)
    shot = save_window_screenshot(viewer, shot)
    for layer in hidden:
        layer.visible = True
    return [shot]


def _training_screenshot(viewer: Any, training: Any, folder: Path, out: Any) -> list[Path]:
    """Start a short run from the training widget, screenshot it mid-run, cancel it."""
    from napari_sigmma.samples.cmu import cache_root

    run = Path(out or cache_root()) / "demo_widget_run"
    # a scratch run, cancelled mid-way every time: start it afresh (the widget refuses a
    # folder that already holds a checkpoint unless asked to resume)
    shutil.rmtree(run, ignore_errors=True)
    training.out.setText(str(run))
    training.epochs.setValue(2)
    training.fast.setChecked(True)
    # the screenshot is of the run itself: keep the demo model in the live view afterwards
    # (the widget would otherwise ask, in a modal dialog, whether to switch)
    training.switch_answer = False
    training.parent().raise_()
    training.start()
    wait_for(lambda: len(training.losses) >= 3 or not training.running, timeout=600)
    shot = save_window_screenshot(viewer, folder / "06_training_widget_mid_run.png")
    training.cancel(wait=True, timeout=120)
    return [shot]
