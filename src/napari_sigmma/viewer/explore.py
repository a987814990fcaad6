"""SIGMMA explore widget: change what the live overlays show without re-encoding anything.

Every control acts on the layers the live view already has (found by their metadata
``"sigmma_kind"``) or through the live controller's public settings (``set_k`` refits the
clusters on cached embeddings; ``set_genes`` maps other genes with the gene head). No
control calls an encoder.

- gene: which gene's maps exist, and whether the predicted or the measured one is shown;
- clusters k and which scales (micro / meso / macro) are visible;
- edge probability threshold: learned meso / macro edges below it are hidden (alpha 0; the
  overlays encode ``p`` in the edge alpha, ``0.15 + 0.85 (p − 0.5) / 0.5``, which is read
  back here);
- attention head (the attention layer's first axis);
- opacity of every SIGMMA overlay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_sigmma.constants import SCALES

if TYPE_CHECKING:
    import napari

SCALED_KINDS = ("clusters", "cell_clusters", "edges")
OVERLAY_KINDS = (
    "clusters",
    "cell_clusters",
    "edges",
    "attention",
    "gene_predicted",
    "gene_measured",
)
NO_LIVE_TEXT = "Turn on the live view in the SIGMMA dock, then press 'Connect'."


def edge_prob_from_alpha(alpha: np.ndarray) -> np.ndarray:
    """Invert the overlays' edge alpha ``0.15 + 0.85 (p − 0.5) / 0.5`` to ``p``."""
    return 0.5 + 0.5 * (np.asarray(alpha, dtype=np.float64) - 0.15) / 0.85


class ExploreWidget(QWidget):
    """Dock widget with the display settings of the SIGMMA overlays.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.controller: Any = None
        self._edge_saved: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        self.setObjectName("sigmma-explore")
        self.status = QLabel(NO_LIVE_TEXT)
        self.status.setWordWrap(True)
        self.connect_button = QPushButton("Connect")
        self.connect_button.clicked.connect(lambda: self.attach_live())
        self.gene = QComboBox()
        self.gene.setToolTip("Gene mapped by the gene head (predicted) and measured")
        self.gene.currentTextChanged.connect(self._on_gene)
        self.gene_kind = QComboBox()
        self.gene_kind.addItems(["predicted", "measured", "both", "none"])
        self.gene_kind.currentTextChanged.connect(lambda _t: self.apply_gene_visibility())
        self.k = QSpinBox()
        self.k.setRange(2, 40)
        self.k.setValue(8)
        self.k.valueChanged.connect(self.set_k)
        self.scale_boxes: dict[str, QCheckBox] = {}
        scales_row = QHBoxLayout()
        for s in SCALES:
            box = QCheckBox(s)
            box.setChecked(s == "micro")
            box.toggled.connect(lambda on, sc=s: self.set_scale_visible(sc, on))
            self.scale_boxes[s] = box
            scales_row.addWidget(box)
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setDecimals(2)
        self.threshold.setValue(0.0)
        self.threshold.setToolTip("Hide learned edges with probability below this")
        self.threshold.valueChanged.connect(lambda _v: self.apply_edge_threshold())
        self.head = QSlider(Qt.Orientation.Horizontal)
        self.head.setRange(0, 0)
        self.head.valueChanged.connect(self.set_head)
        self.head_label = QLabel("head 0")
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(60)
        self.opacity.valueChanged.connect(lambda v: self.set_opacity(v / 100.0))

        form = QFormLayout()
        form.addRow("Gene", self.gene)
        form.addRow("Gene map", self.gene_kind)
        form.addRow("Clusters k", self.k)
        form.addRow("Scales", scales_row)
        form.addRow("Edge p ≥", self.threshold)
        head_row = QHBoxLayout()
        head_row.addWidget(self.head, 1)
        head_row.addWidget(self.head_label)
        form.addRow("Attention head", head_row)
        form.addRow("Overlay opacity", self.opacity)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<b>SIGMMA explore</b>"))
        layout.addWidget(self.connect_button)
        layout.addLayout(form)
        layout.addWidget(self.status)
        layout.addStretch(1)

    # -- wiring --------------------------------------------------------------------------------
    def attach_live(self) -> bool:
        """Connect to the SIGMMA dock's live controller."""
        from napari_sigmma.viewer.retrieval import find_live_controller

        ctrl = find_live_controller(self.viewer)
        if ctrl is None:
            self.status.setText(NO_LIVE_TEXT)
            return False
        self.set_controller(ctrl)
        return True

    def set_controller(self, controller: Any) -> None:
        """Use ``controller`` (a LiveController); re-apply the settings as it draws."""
        self.controller = controller
        controller.shown.connect(lambda _ids: self.reapply())
        head = getattr(controller.engine, "gene_head", None)
        self.gene.blockSignals(True)
        self.gene.clear()
        if head is not None:
            self.gene.addItems(list(head.genes))
            shown = getattr(controller.overlays, "genes", None) or []
            if shown:
                self.gene.setCurrentText(shown[0])
        self.gene.blockSignals(False)
        self.k.blockSignals(True)
        self.k.setValue(int(controller.k))
        self.k.blockSignals(False)
        self.status.setText("Connected to the live view.")
        self.reapply()

    def layers(
        self, kind: str | tuple[str, ...] | None = None, scale: str | None = None
    ) -> list[Any]:
        """SIGMMA overlay layers (metadata ``sigmma_kind``), optionally of ``kind`` / ``scale``."""
        kinds = (kind,) if isinstance(kind, str) else (kind or OVERLAY_KINDS)
        out = []
        for layer in self.viewer.layers:
            meta = getattr(layer, "metadata", {}) or {}
            if meta.get("sigmma_kind") not in kinds:
                continue
            if scale is not None and meta.get("scale") != scale:
                continue
            out.append(layer)
        return out

    def reapply(self) -> None:
        """Apply every setting to the current layers (after the live view drew)."""
        for s, box in self.scale_boxes.items():
            self.set_scale_visible(s, box.isChecked())
        self.set_opacity(self.opacity.value() / 100.0)
        self.apply_gene_visibility()
        self._update_head_range()
        self.apply_edge_threshold()

    # -- settings ----------------------------------------------------------------------------------
    def set_k(self, k: int) -> None:
        """Number of clusters (the controller refits on cached embeddings)."""
        if self.controller is not None:
            self.controller.set_k(int(k))

    def _on_gene(self, gene: str) -> None:
        if self.controller is None or not gene:
            return
        self.controller.set_genes([gene])
        self.apply_gene_visibility()

    def apply_gene_visibility(self) -> None:
        """Show the chosen gene's predicted and/or measured map; hide other gene maps."""
        which = self.gene_kind.currentText()
        gene = self.gene.currentText()
        for layer in self.layers(("gene_predicted", "gene_measured")):
            kind = layer.metadata["sigmma_kind"].split("_", 1)[1]
            layer.visible = bool(layer.metadata.get("gene") == gene and which in (kind, "both"))

    def set_scale_visible(self, scale: str, visible: bool) -> None:
        """Show or hide the clusters / cells / edges layers of ``scale``."""
        for layer in self.layers(SCALED_KINDS, scale=scale):
            layer.visible = bool(visible)
        if visible:
            self.apply_edge_threshold()

    def set_opacity(self, opacity: float) -> None:
        """Opacity of every SIGMMA overlay layer."""
        for layer in self.layers():
            layer.opacity = float(opacity)

    def _update_head_range(self) -> None:
        att = self.layers("attention")
        heads = int(att[0].data.shape[0]) if att else 1
        if self.head.maximum() != heads - 1:
            self.head.setRange(0, max(heads - 1, 0))

    def set_head(self, head: int) -> None:
        """Show attention head ``head`` (the attention layer's first axis)."""
        self.head_label.setText(f"head {int(head)}")
        att = self.layers("attention")
        if not att:
            return
        layer = att[0]
        layer.visible = True
        dims = self.viewer.dims
        if dims.ndim >= 3:
            step = list(dims.current_step)
            step[dims.ndim - 3] = int(head)
            dims.current_step = tuple(step)

    def apply_edge_threshold(self) -> None:
        """Hide learned edges below the threshold (alpha 0), restore those above it."""
        thr = float(self.threshold.value())
        for layer in self.layers("edges"):
            if not len(layer.data):
                continue
            colours = np.array(layer.edge_color, dtype=np.float32, copy=True)
            alpha = colours[:, 3]
            saved = self._edge_saved.get(layer.name)
            if saved is not None and saved[0].shape == alpha.shape:
                hidden, orig = saved
                # slots we hid and nobody rewrote since: their true alpha comes back
                back = hidden & (alpha == 0)
                alpha[back] = orig[back]
            if layer.metadata.get("scale") == "micro":
                prob = np.where(alpha > 0, 1.0, 0.0)  # proximity edges: p = 1
            else:
                prob = edge_prob_from_alpha(alpha)
            hide = (alpha > 0) & (prob < thr)
            self._edge_saved[layer.name] = (hide, alpha.copy())
            alpha[hide] = 0.0
            colours[:, 3] = alpha
            layer.edge_color = colours
            layer.metadata["edge_threshold"] = thr
            layer.metadata["n_hidden_by_threshold"] = int(hide.sum())
