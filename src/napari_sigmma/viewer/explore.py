"""SIGMMA explore widget: change what the live overlays show without re-encoding anything.

Every control acts on the layers the live view already has (found by their metadata
``"sigmma_kind"``) or through the live controller's public settings (``set_k`` refits the
clusters on cached embeddings; ``set_genes`` maps other genes with the gene head). No
control calls an encoder.

- gene: which gene's maps exist, and whether the predicted or the measured one is shown;
- colour cells by: the SIGMMA clusters, any column of the cell table or any gene (type to
  filter); the cells layers and a ``SIGMMA tiles by <name>`` layer take its colours, with a
  categorical legend or a colourbar (:mod:`napari_sigmma.viewer.colour_by`);
- clusters k and which scales (micro / meso / macro) are visible;
- edge probability threshold: learned meso / macro edges below it are hidden (alpha 0; the
  overlays encode ``p`` in the edge alpha, ``0.15 + 0.85 (p − 0.5) / 0.5``, which is read
  back here);
- attention head (shown only while the attention layer is);
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
    "tile_colour",
)
NO_LIVE_TEXT = "Turn on the live view in the SIGMMA dock, then press 'Connect'."


def edge_prob_from_alpha(alpha: np.ndarray) -> np.ndarray:
    """Invert the overlays' edge alpha ``0.15 + 0.85 (p − 0.5) / 0.5`` to ``p``."""
    return 0.5 + 0.5 * (np.asarray(alpha, dtype=np.float64) - 0.15) / 0.85


class ExploreWidget(QWidget):
    """Dock widget with the display settings of the SIGMMA overlays.

    Its settings are the viewer's :class:`~napari_sigmma.viewer.session.Session`: ``k``,
    the genes, the attention head and the shown scales agree with the dock and every other
    widget. Opening it (or connecting it to the live view) changes no layer; each control
    changes layers when it is used.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        from napari_sigmma.viewer.session import GENE_VIEWS, session_for

        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.controller: Any = None
        self._edge_saved: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._watched_att: set[int] = set()

        self.setObjectName("sigmma-explore")
        self.status = QLabel(NO_LIVE_TEXT)
        self.status.setWordWrap(True)
        self.connect_button = QPushButton("Connect")
        self.connect_button.clicked.connect(lambda: self.attach_live())
        # searchable: type to filter the gene list; "Add" maps several genes at once
        self.gene = QComboBox()
        self.gene.setEditable(True)
        self.gene.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.gene.setToolTip(
            "Gene mapped by the gene head (predicted) and measured: type to filter the list"
        )
        self.gene.activated.connect(lambda _i: self._on_gene(self.gene.currentText()))
        self.gene.currentTextChanged.connect(self._on_gene_text)
        self.add_gene = QPushButton("Add")
        self.add_gene.setToolTip("Map this gene too (several genes at once)")
        self.add_gene.clicked.connect(lambda: self.add_genes([self.gene.currentText()]))
        self.genes_label = QLabel("")
        self.genes_label.setWordWrap(True)
        # colour cells (and tiles) by a column or a gene: searchable like the gene list
        self.colour_by = QComboBox()
        self.colour_by.setEditable(True)
        self.colour_by.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.colour_by.setToolTip(
            "Colour the SIGMMA cells and tiles by their clusters, a column of the cell table "
            "or a gene (type to filter); categories get a legend, numbers a colourbar"
        )
        self.colour_by.activated.connect(
            lambda _i: self.set_colour_by(self.colour_by.currentText())
        )
        self.colour_by.currentTextChanged.connect(self._on_colour_text)
        self.gene_kind = QComboBox()
        self.gene_kind.addItems(list(GENE_VIEWS))
        self.gene_kind.setCurrentText(self.session.gene_view)
        self.gene_kind.setToolTip(
            "both: measured and predicted side by side (napari's grid view, one colour "
            "scale; Home frames the slide in each)"
        )
        self.gene_kind.currentTextChanged.connect(self._on_gene_kind)
        self.k = QSpinBox()
        self.k.setRange(2, 40)
        self.k.setValue(int(self.session.k))
        self.k.valueChanged.connect(self.set_k)
        self.scale_boxes: dict[str, QCheckBox] = {}
        scales_row = QHBoxLayout()
        for s in SCALES:
            box = QCheckBox(s)
            box.setChecked(s in self.session.scales_shown)
            box.toggled.connect(lambda on, sc=s: self._on_scale_box(sc, on))
            self.scale_boxes[s] = box
            scales_row.addWidget(box)
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        # three decimals: a sampler that has not polarised scores everything near 0.5
        # (the diagnostics' score_std), and two decimals could not split those edges
        self.threshold.setSingleStep(0.01)
        self.threshold.setDecimals(3)
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
        self.head.setValue(int(self.session.head))

        form = QFormLayout()
        gene_row = QHBoxLayout()
        gene_row.addWidget(self.gene, 1)
        gene_row.addWidget(self.add_gene)
        form.addRow("Gene", gene_row)
        form.addRow("", self.genes_label)
        form.addRow("Gene map", self.gene_kind)
        form.addRow("Colour cells by", self.colour_by)
        form.addRow("Clusters k", self.k)
        form.addRow("Scales", scales_row)
        form.addRow("Edge p ≥", self.threshold)
        head_row = QHBoxLayout()
        head_row.addWidget(self.head, 1)
        head_row.addWidget(self.head_label)
        self.head_caption = QLabel("Attention head")
        form.addRow(self.head_caption, head_row)
        form.addRow("Overlay opacity", self.opacity)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<b>SIGMMA explore</b>"))
        layout.addWidget(self.connect_button)
        layout.addLayout(form)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self._update_head_visible()

        ev = self.session.events
        ev.k.connect(self._on_session_k)
        ev.scales_shown.connect(self._on_session_scales)
        ev.genes.connect(self._on_session_genes)
        ev.colour_by.connect(self._on_session_colour_by)
        ev.controller.connect(self._on_session_controller)
        if self.session.controller is not None:
            self.set_controller(self.session.controller)

    # -- wiring --------------------------------------------------------------------------------
    def attach_live(self) -> bool:
        """Connect to the live view's controller (the viewer session's)."""
        from napari_sigmma.viewer.retrieval import find_live_controller

        ctrl = find_live_controller(self.viewer)
        if ctrl is None:
            self.status.setText(NO_LIVE_TEXT)
            return False
        self.set_controller(ctrl)
        return True

    def _on_session_controller(self, ctrl: Any) -> None:
        if ctrl is not None and ctrl is not self.controller:
            self.set_controller(ctrl)
        elif ctrl is None:
            self.controller = None
            self.status.setText(NO_LIVE_TEXT)

    def set_controller(self, controller: Any) -> None:
        """Use ``controller`` (a LiveController). Reads its state; changes no layer."""
        if self.controller is not None and self.controller is not controller:
            try:
                self.controller.shown.disconnect(self._after_draw)
            except (RuntimeError, TypeError):
                pass
        self.controller = controller
        if self.session.controller is None:  # the viewer's live view from now on
            self.session.controller = controller
        controller.shown.connect(self._after_draw)
        head = getattr(controller.engine, "gene_head", None)
        self.gene.blockSignals(True)
        self.gene.clear()
        if head is not None:
            self.gene.addItems(list(head.genes))
            from qtpy.QtCore import Qt as _Qt

            completer = self.gene.completer()
            if completer is not None:  # type to filter: match anywhere in the name
                completer.setFilterMode(_Qt.MatchFlag.MatchContains)
                completer.setCompletionMode(completer.CompletionMode.PopupCompletion)
            shown = getattr(controller.overlays, "genes", None) or []
            if shown:
                self.gene.setCurrentText(shown[0])
        self.gene.blockSignals(False)
        self._fill_colour_by(controller)
        self._show_genes(getattr(controller.overlays, "genes", None) or [])
        self._set_spin(self.k, int(controller.k))
        self.status.setText("Connected to the live view.")
        self._update_head_range()

    def _after_draw(self, _ids: Any = None) -> None:
        """After the live view drew: only what keeps the user's settings true on new
        layers and tiles (never a visibility or opacity change of its own)."""
        self._update_head_range()
        if float(self.threshold.value()) > 0:
            self.apply_edge_threshold()

    @staticmethod
    def _set_spin(spin: Any, value: int) -> None:
        if spin.value() != value:
            spin.blockSignals(True)
            spin.setValue(value)
            spin.blockSignals(False)

    def _on_session_k(self, k: int) -> None:
        self._set_spin(self.k, int(k))

    def _on_session_scales(self, scales: tuple[str, ...]) -> None:
        for s, box in self.scale_boxes.items():
            if box.isChecked() != (s in scales):
                box.blockSignals(True)
                box.setChecked(s in scales)
                box.blockSignals(False)

    def _on_session_genes(self, genes: tuple[str, ...]) -> None:
        self._show_genes(list(genes))

    def _show_genes(self, genes: list[str]) -> None:
        self.genes_label.setText("Mapped: " + ", ".join(genes) if genes else "")

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
        """Apply every setting to the current layers (the user asked for it)."""
        for s, box in self.scale_boxes.items():
            self.set_scale_visible(s, box.isChecked())
        self.set_opacity(self.opacity.value() / 100.0)
        self.apply_gene_visibility()
        self._update_head_range()
        self.apply_edge_threshold()

    # -- settings ----------------------------------------------------------------------------------
    def set_k(self, k: int) -> None:
        """Number of clusters (shared: the session refits the live view's clusters)."""
        self.session.k = int(k)

    def _on_gene_text(self, gene: str) -> None:
        # typing filters; a complete gene name (chosen or typed) maps it
        if gene and self.gene.findText(gene) >= 0:
            self._on_gene(gene)

    def _on_gene(self, gene: str) -> None:
        if not gene or self.gene.findText(gene) < 0:
            return
        self.session.genes = (gene,)
        self.apply_gene_visibility()

    def add_genes(self, genes: list[str]) -> None:
        """Map ``genes`` as well as the ones mapped now."""
        known = [g for g in genes if g and self.gene.findText(g) >= 0]
        if known:
            self.session.genes = tuple(dict.fromkeys([*self.session.genes, *known]))
            self.apply_gene_visibility()

    def _fill_colour_by(self, controller: Any) -> None:
        from qtpy.QtCore import Qt as _Qt

        from napari_sigmma.viewer.colour_by import CLUSTERS, colour_options

        paired = getattr(controller, "paired", None)
        self.colour_by.blockSignals(True)
        self.colour_by.clear()
        self.colour_by.addItem(CLUSTERS)
        if paired is not None:
            columns, genes = colour_options(paired)
            self.colour_by.addItems(columns)
            self.colour_by.addItems(genes)
        completer = self.colour_by.completer()
        if completer is not None:  # type to filter: match anywhere in the name
            completer.setFilterMode(_Qt.MatchFlag.MatchContains)
            completer.setCompletionMode(completer.CompletionMode.PopupCompletion)
        self.colour_by.setCurrentText(self.session.colour_by or CLUSTERS)
        self.colour_by.blockSignals(False)

    def _on_colour_text(self, name: str) -> None:
        # typing filters; a complete name (chosen or typed) colours by it
        if name and self.colour_by.findText(name) >= 0:
            self.set_colour_by(name)

    def set_colour_by(self, name: str) -> None:
        """Colour the live view's cells and tiles by table column or gene ``name`` (the
        clusters for :data:`~napari_sigmma.viewer.colour_by.CLUSTERS`), through the shared
        session; the cells layers of the shown scales are shown (that is what gets
        coloured)."""
        from napari_sigmma.viewer.colour_by import CLUSTERS

        value = "" if name == CLUSTERS else str(name)
        self.session.colour_by = value
        if value:
            for s in self.session.scales_shown:
                for layer in self.layers("cell_clusters", scale=s):
                    layer.visible = True

    def _on_session_colour_by(self, name: str) -> None:
        from napari_sigmma.viewer.colour_by import CLUSTERS

        text = name or CLUSTERS
        if self.colour_by.currentText() != text and self.colour_by.findText(text) >= 0:
            self.colour_by.blockSignals(True)
            self.colour_by.setCurrentText(text)
            self.colour_by.blockSignals(False)

    def _on_gene_kind(self, which: str) -> None:
        self.session.gene_view = which
        self.apply_gene_visibility()

    def _on_scale_box(self, scale: str, on: bool) -> None:
        shown = [s for s in SCALES if s in self.session.scales_shown and s != scale]
        if on:
            shown.append(scale)
        self.session.scales_shown = tuple(s for s in SCALES if s in shown)
        self.set_scale_visible(scale, on)

    def apply_gene_visibility(self) -> None:
        """Show the chosen genes' predicted and/or measured maps; hide other gene maps.
        ``both`` shows them side by side in napari's grid view."""
        from napari_sigmma.viewer.legend import side_by_side

        which = self.gene_kind.currentText()
        genes = set(self.session.genes) or {self.gene.currentText()}
        for layer in self.layers(("gene_predicted", "gene_measured")):
            kind = layer.metadata["sigmma_kind"].split("_", 1)[1]
            layer.visible = bool(layer.metadata.get("gene") in genes and which in (kind, "both"))
        side_by_side(self.viewer, which == "both")

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
        """Head slider range from the attention layer; shown only while attention is."""
        att = self.layers("attention")
        heads = 1
        if att:
            meta = att[0].metadata
            heads = int(meta.get("heads") or (att[0].data.shape[0] if att[0].ndim == 3 else 1))
            for layer in att:
                if id(layer) not in self._watched_att:
                    self._watched_att.add(id(layer))
                    layer.events.visible.connect(lambda _e: self._update_head_visible())
        if self.head.maximum() != heads - 1:
            self.head.setRange(0, max(heads - 1, 0))
        self._update_head_visible()

    def _update_head_visible(self) -> None:
        try:
            on = any(ly.visible for ly in self.layers("attention"))
            for w in (self.head, self.head_label, self.head_caption):
                w.setVisible(on)
        except RuntimeError:  # the widget is deleted; the layer outlived it
            pass

    def set_head(self, head: int) -> None:
        """Show attention head ``head`` (the live overlays' 2-D attention layer, or the
        first axis of a 3-D attention layer)."""
        self.head_label.setText(f"head {int(head)}")
        self.session.head = int(head)
        overlays = getattr(self.controller, "overlays", None)
        if overlays is not None:
            overlays.set_attention_head(int(head))
        att = self.layers("attention")
        if not att:
            return
        layer = att[0]
        layer.visible = True
        dims = self.viewer.dims
        if layer.ndim >= 3 and dims.ndim >= 3:
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
