"""The main SIGMMA dock widget: model state, device, and the entry points to the work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_sigmma.device import DEVICE_CHOICES

if TYPE_CHECKING:
    import napari

    from napari_sigmma.viewer.controller import LiveController

NO_MODEL_TEXT = (
    "No model loaded. The data layers work as usual; to see what SIGMMA learned, "
    "load a checkpoint here or train one (napari-sigmma train, or the training widget)."
)
NO_SLIDE_TEXT = (
    "Live SIGMMA needs an H&E layer opened by this plugin (File > Open a Xenium bundle, a "
    "HEST sample or a SpatialData .zarr, or File > Open Sample > SIGMMA)."
)


def find_he_layer(viewer: napari.Viewer) -> Any | None:
    """The H&E image layer the plugin's reader added (metadata ``element == "he_image"``)."""
    for layer in viewer.layers:
        meta = getattr(layer, "metadata", {}) or {}
        if meta.get("element") == "he_image" and meta.get("sdata_path"):
            return layer
    return None


class SigmmaDock(QWidget):
    """Dock widget that owns the plugin's model state for one viewer.

    Parameters
    ----------
    napari_viewer
        The viewer this dock belongs to (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.checkpoint: str | None = None
        self.controller: LiveController | None = None
        self._loader: Any = None

        self.setObjectName("sigmma-dock")
        title = QLabel("<b>SIGMMA</b> — H&amp;E ↔ spatial transcriptomics")
        self.status = QLabel(NO_MODEL_TEXT)
        self.status.setWordWrap(True)
        self.device = QComboBox()
        self.device.addItems(list(DEVICE_CHOICES))
        self.load_button = QPushButton("Load checkpoint…")
        self.load_button.clicked.connect(self._choose_checkpoint)
        self.live = QCheckBox("Live SIGMMA on the visible tiles")
        self.live.setToolTip(
            "Encode the tiles in view with the loaded model and show clusters, learned "
            "edges, attention heads and predicted genes"
        )
        self.live.toggled.connect(self._on_live_toggled)
        self.k = QSpinBox()
        self.k.setRange(2, 40)
        self.k.setValue(8)
        self.k.setToolTip("Number of clusters (k-means) at every scale")
        self.k.valueChanged.connect(self._on_k_changed)
        self.live_status = QLabel("")
        self.live_status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Device", self.device)
        form.addRow("Clusters k", self.k)
        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addLayout(form)
        layout.addWidget(self.load_button)
        layout.addWidget(self.status)
        layout.addWidget(self.live)
        layout.addWidget(self.live_status)
        layout.addStretch(1)

    # -- model ---------------------------------------------------------------------------------
    def _choose_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "SIGMMA checkpoint", "", "PyTorch checkpoints (*.pt *.pth)"
        )
        if path:
            self.set_checkpoint(path)

    def set_checkpoint(self, path: str) -> None:
        """Record the checkpoint to use and say so (live view restarts with it)."""
        self.checkpoint = path
        self.status.setText(f"Model: {path}")
        if self.live.isChecked():
            self.stop_live()
            self.start_live()

    # -- live view -----------------------------------------------------------------------------
    def _on_live_toggled(self, on: bool) -> None:
        if on:
            self.start_live()
        else:
            self.stop_live()

    def _on_k_changed(self, k: int) -> None:
        if self.controller is not None:
            self.controller.set_k(int(k))

    def _say(self, text: str) -> None:
        self.live_status.setText(text)

    def start_live(self) -> None:
        """Load the model and the slide in a worker, then follow the camera."""
        from napari.qt.threading import FunctionWorker

        layer = find_he_layer(self.viewer)
        if self.checkpoint is None:
            self._say(NO_MODEL_TEXT)
            self.viewer.status = NO_MODEL_TEXT
            return
        if layer is None:
            self._say(NO_SLIDE_TEXT)
            return
        self._say("Loading the model and the slide…")
        device = self.device.currentText()
        worker = FunctionWorker(_load_live, self.checkpoint, layer.metadata["sdata_path"], device)
        worker.returned.connect(lambda out, ly=layer: self._live_ready(ly, *out))
        worker.errored.connect(lambda err: self._say(f"Could not start: {err}"))
        self._loader = worker
        worker.start()

    def _live_ready(self, layer: Any, engine: Any, gene_head: Any) -> None:
        from napari_sigmma.viewer.controller import LiveController

        self._loader = None
        if not self.live.isChecked() or layer not in self.viewer.layers:
            return
        self.controller = LiveController(
            self.viewer, layer, engine, k=int(self.k.value()), gene_head=gene_head
        )
        self.controller.status_changed.connect(self._say)
        self._say(self.controller.status or "Live SIGMMA on.")

    def stop_live(self) -> None:
        """Stop the live view (workers cancelled; layers stay)."""
        if self.controller is not None:
            self.controller.close()
            self.controller = None
        self._say("")

    def closeEvent(self, event: Any) -> None:
        self.stop_live()
        super().closeEvent(event)


def _load_live(checkpoint: str, sdata_path: str, device: str) -> tuple[Any, Any]:
    """Worker: run, slide, grid, engine (disk cache next to the data)."""
    from napari_sigmma.analysis.liverun import load_live_run
    from napari_sigmma.analysis.tilecache import default_cache_root
    from napari_sigmma.io import load_any
    from napari_sigmma.tiles.paired import PairedSlide
    from napari_sigmma.train.trainer import _slide_names

    run = load_live_run(checkpoint)
    paired = PairedSlide.from_sdata(load_any(sdata_path), name=_slide_names([sdata_path])[0])
    engine = run.engine(paired, device=device, cache_dir=default_cache_root(sdata_path))
    return engine, run.gene_head
