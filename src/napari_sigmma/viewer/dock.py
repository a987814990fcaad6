"""The main SIGMMA dock widget: model state, device, and the entry points to the work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_sigmma.device import DEVICE_CHOICES

if TYPE_CHECKING:
    import napari

NO_MODEL_TEXT = (
    "No model loaded. The data layers work as usual; to see what SIGMMA learned, "
    "load a checkpoint here or train one (napari-sigmma train, or the training widget)."
)


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

        self.setObjectName("sigmma-dock")
        title = QLabel("<b>SIGMMA</b> — H&amp;E ↔ spatial transcriptomics")
        self.status = QLabel(NO_MODEL_TEXT)
        self.status.setWordWrap(True)
        self.device = QComboBox()
        self.device.addItems(list(DEVICE_CHOICES))
        self.load_button = QPushButton("Load checkpoint…")
        self.load_button.clicked.connect(self._choose_checkpoint)

        form = QFormLayout()
        form.addRow("Device", self.device)
        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addLayout(form)
        layout.addWidget(self.load_button)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _choose_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "SIGMMA checkpoint", "", "PyTorch checkpoints (*.pt *.pth)"
        )
        if path:
            self.set_checkpoint(path)

    def set_checkpoint(self, path: str) -> None:
        """Record the checkpoint to use and say so."""
        self.checkpoint = path
        self.status.setText(f"Model: {path}")
