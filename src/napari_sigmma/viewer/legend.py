"""SIGMMA legend: one panel that says what every colour on the canvas means.

- **Cell types** (the reader's cells layer): colour, name and count; click one to show only
  its cells, click it again to show all.
- **Clusters** of each scale (the live view's image-embedding clusters): colour, name, the
  number of patches in view, and what the cluster is made of on the ST side — the most
  frequent cell types and the most enriched genes of the cells under its patches — so a
  pathologist can name it. Click one to show only its patches (napari's
  ``show_selected_label``) and, in that scale's SIGMMA cells layer, its cells; click again
  to restore.
- **Colour by**: the categories of the table column the cells and tiles are coloured by
  (:mod:`napari_sigmma.viewer.colour_by`), with the cells in view; click one to show only
  its cells. A numeric column or a gene is listed with the colour scales.
- **Colour scales** of the continuous layers: each gene map (predicted and measured) and
  the attention head, with its range and unit (the layers also show napari's own canvas
  colourbar), and the learned-edge probability (drawn as edge opacity).

The panel reads the layers and the viewer's :class:`~napari_sigmma.viewer.session.Session`;
opening it changes no layer. It refreshes after the live view draws, at most every
``refresh_ms``, and only while it is visible.

:func:`side_by_side` puts the measured gene maps beside the rest in napari's grid view.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QSize, Qt, QTimer
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QLabel, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget

from napari_sigmma.constants import SCALES

if TYPE_CHECKING:
    import napari

CONTINUOUS_KINDS = ("gene_predicted", "gene_measured", "attention")
ROLE = Qt.ItemDataRole.UserRole
#: most frequent cell types / most enriched genes named per cluster
TOP_TYPES, TOP_GENES = 3, 3


def sigmma_layers(viewer: Any, kinds: tuple[str, ...]) -> list[Any]:
    return [
        ly
        for ly in viewer.layers
        if (getattr(ly, "metadata", {}) or {}).get("sigmma_kind") in kinds
    ]


def cells_layers(viewer: Any) -> list[Any]:
    """The reader's cells layers that carry a categorical legend."""
    return [ly for ly in viewer.layers if "legend" in (getattr(ly, "metadata", {}) or {})]


# -- cluster descriptions ------------------------------------------------------------------------
def describe_clusters(overlays: Any, scale: str, *, genes: bool = True) -> list[dict[str, Any]]:
    """For each cluster of ``scale`` shown now: its patches in view and what the cells under
    them are (top cell types with their share, top genes by enrichment over all the cells
    in view: mean log1p expression in the cluster minus the mean over every cell in view;
    ``genes=False`` skips the genes, the costly part).

    Returns one dict per cluster ``{"cluster", "patches", "cells", "types", "genes"}``.
    """
    from napari_sigmma.viewer.overlays import PER_SIDE, layer_name

    raster = getattr(overlays, "_rasters", {}).get(layer_name("clusters", scale))
    if raster is None or overlays.clusters is None:
        return []
    labels = np.asarray(raster)
    k = int(overlays.clusters.n_clusters)
    patches = np.bincount(labels.ravel(), minlength=k + 1)[1 : k + 1]
    # each cell → its patch in the cluster raster (H&E level-0 px → raster index)
    grid, paired = overlays.grid, overlays.paired
    step = float(grid.tile_size) / PER_SIDE[scale]
    xy = np.asarray(paired.cells_px, dtype=np.float64)
    col = np.floor((xy[:, 0] - float(grid.origin[0])) / step).astype(np.int64)
    row = np.floor((xy[:, 1] - float(grid.origin[1])) / step).astype(np.int64)
    inside = (row >= 0) & (row < labels.shape[0]) & (col >= 0) & (col < labels.shape[1])
    cell_lab = np.zeros(len(xy), np.int64)
    cell_lab[inside] = labels[row[inside], col[inside]]
    cells = np.flatnonzero(cell_lab > 0)
    types = None
    obs = getattr(paired, "obs", None)
    if obs is not None and "cell_type" in getattr(obs, "columns", ()):
        types = np.asarray(obs["cell_type"].astype(str))
    expr = None
    if genes and cells.size and getattr(paired, "counts", None) is not None:
        expr = _log1p_mean_by(paired.counts, cells, cell_lab[cells] - 1, k)
    out = []
    for c in range(k):
        mine = cells[cell_lab[cells] == c + 1]
        entry: dict[str, Any] = {
            "cluster": c,
            "patches": int(patches[c]),
            "cells": int(mine.size),
            "types": [],
            "genes": [],
        }
        if types is not None and mine.size:
            names, counts = np.unique(types[mine], return_counts=True)
            order = np.lexsort((names, -counts))[:TOP_TYPES]
            entry["types"] = [(str(names[i]), float(counts[i] / mine.size)) for i in order]
        if expr is not None and mine.size:
            means, overall = expr
            diff = means[c] - overall
            order = np.lexsort((np.arange(diff.size), -diff))[:TOP_GENES]
            entry["genes"] = [(str(paired.genes[i]), float(diff[i])) for i in order if diff[i] > 0]
        out.append(entry)
    return out


def _log1p_mean_by(
    counts: Any, rows: np.ndarray, groups: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group mean of log1p(counts scaled to 100 per cell) over ``rows``, and the mean
    over all ``rows``: ``(k, genes)``, ``(genes,)``."""
    import scipy.sparse as sp

    m = sp.csr_matrix(counts)[rows].astype(np.float32)
    tot = np.asarray(m.sum(axis=1)).ravel()
    m = sp.csr_matrix(sp.diags(np.where(tot > 0, 100.0 / np.maximum(tot, 1e-12), 0.0)) @ m)
    m.data = np.log1p(m.data)
    onehot = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (groups, np.arange(len(rows)))), shape=(k, len(rows))
    )
    n = np.maximum(np.asarray(onehot.sum(axis=1)).ravel(), 1.0)
    means = np.asarray((onehot @ m).todense()) / n[:, None]
    overall = np.asarray(m.mean(axis=0)).ravel()
    return means, overall


def _pairs(pairs: list[tuple[str, float]], *, percent: bool) -> str:
    if percent:
        return ", ".join(f"{n} {100 * v:.0f}%" for n, v in pairs)
    return ", ".join(n for n, _ in pairs)


# -- swatches --------------------------------------------------------------------------------------
def _swatch(rgb: Any, size: int = 12) -> QIcon:
    pm = QPixmap(size, size)
    c = np.clip(np.asarray(rgb, dtype=float)[:3] * 255, 0, 255).astype(int)
    pm.fill(QColor(int(c[0]), int(c[1]), int(c[2])))
    return QIcon(pm)


def _gradient(rgba: np.ndarray, width: int = 48, height: int = 12) -> QIcon:
    """An icon of a colour ramp (``rgba``: ``(n, 4)`` in [0, 1]) over white."""
    from qtpy.QtGui import QImage

    x = np.linspace(0, 1, width)
    ramp = np.stack([np.interp(x, np.linspace(0, 1, len(rgba)), rgba[:, i]) for i in range(4)], 1)
    rgb = ramp[:, :3] * ramp[:, 3:4] + (1 - ramp[:, 3:4])  # composite over white
    img = np.ascontiguousarray(
        np.repeat((rgb * 255).astype(np.uint8)[None], height, axis=0)
    )  # (h, w, 3)
    qimg = QImage(img.data, width, height, 3 * width, QImage.Format.Format_RGB888).copy()
    return QIcon(QPixmap.fromImage(qimg))


# -- the panel -----------------------------------------------------------------------------------
class LegendWidget(QWidget):
    """Dock widget listing every category and colour scale of the SIGMMA layers.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    refresh_ms
        Shortest time between two refreshes triggered by the live view.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, *, refresh_ms: int = 500) -> None:
        super().__init__()
        from napari_sigmma.viewer.session import session_for

        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.isolated: tuple[str, str, int] | None = None  # (group, layer/scale, index)
        self._saved_face: dict[str, np.ndarray] = {}  # colours of an isolated points layer
        self.setObjectName("sigmma-legend")
        self.tree = QTreeWidget()
        self.tree.setColumnCount(3)
        self.tree.setHeaderLabels(["category", "count", "made of"])
        self.tree.setIconSize(QSize(48, 12))
        self.tree.setRootIsDecorated(True)
        self.tree.itemClicked.connect(lambda item, _col: self.toggle(item))
        self.hint = QLabel("Click a category to show only it; click again to show all.")
        self.hint.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<b>SIGMMA legend</b>"))
        layout.addWidget(self.hint)
        layout.addWidget(self.tree, 1)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(int(refresh_ms))
        self._timer.timeout.connect(self.refresh)
        self._controller: Any = None
        self.viewer.layers.events.inserted.connect(self._soon)
        self.viewer.layers.events.removed.connect(self._soon)
        self.session.events.controller.connect(self._follow)
        self._follow(self.session.controller)
        self.refresh()

    # -- wiring ------------------------------------------------------------------------------
    def _follow(self, ctrl: Any) -> None:
        if self._controller is not None:
            try:
                self._controller.shown.disconnect(self._soon)
                self._controller.clusters_changed.disconnect(self._soon)
            except (RuntimeError, TypeError):
                pass
        self._controller = ctrl
        if ctrl is not None:
            ctrl.shown.connect(self._soon)
            ctrl.clusters_changed.connect(self._soon)
        self._soon()

    def _soon(self, *_: Any) -> None:
        try:
            if not self._timer.isActive():
                self._timer.start()
        except RuntimeError:  # deleted with its dock; a layer event came late
            pass

    def closeEvent(self, event: Any) -> None:
        self._timer.stop()
        for emitter in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            emitter.disconnect(self._soon)
        self.session.events.controller.disconnect(self._follow)
        self._follow(None)
        super().closeEvent(event)

    # -- content -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the lists from the layers (keeps an isolated category isolated)."""
        self.tree.clear()
        for layer in cells_layers(self.viewer):
            self._add_categories(layer)
        overlays = self._overlays()
        if overlays is not None and getattr(overlays, "cell_colours", None) is not None:
            if overlays.cell_colours.categorical:
                self._add_colour_categories(overlays)
        if overlays is not None and overlays.clusters is not None:
            order = [self.session.scale, *(s for s in SCALES if s != self.session.scale)]
            for scale in order:
                self._add_clusters(overlays, scale)
        self._add_scales()
        self.tree.expandToDepth(0)
        for col in range(3):
            self.tree.resizeColumnToContents(col)

    def _add_categories(self, layer: Any) -> None:
        leg = layer.metadata["legend"]
        top = QTreeWidgetItem([f"{leg.get('title', 'categories')} ({layer.name})", "", ""])
        self.tree.addTopLevelItem(top)
        for i, (name, colour, count) in enumerate(
            zip(leg["names"], leg["colours"], leg["counts"], strict=True)
        ):
            item = QTreeWidgetItem([str(name), str(count), ""])
            item.setIcon(0, _swatch(QColor(colour).getRgbF()))
            item.setData(0, ROLE, ("category", layer.name, i))
            top.addChild(item)
            self._mark(item)

    def _overlays(self) -> Any:
        return getattr(self.session.controller, "overlays", None)

    def _add_colour_categories(self, overlays: Any) -> None:
        """The categories the cells (and tiles) are coloured by, with the cells in view."""
        from napari_sigmma.viewer.overlays import layer_name

        cb = overlays.cell_colours
        shown = [np.asarray(r.cell_index) for r in overlays.tiles.values()]
        cells = np.concatenate(shown) if shown else np.zeros(0, np.int64)
        counts = cb.counts(cells)
        name = layer_name(f"tiles by {cb.name}")
        top = QTreeWidgetItem([f"cells & tiles by {cb.name}", "cells", ""])
        top.setToolTip(0, "SIGMMA cells layers and " + name)
        self.tree.addTopLevelItem(top)
        for i, (cat, rgb) in enumerate(zip(cb.names, cb.colours, strict=True)):
            item = QTreeWidgetItem([str(cat), str(int(counts[i])), ""])
            item.setIcon(0, _swatch(rgb))
            item.setData(0, ROLE, ("colour", name, i))
            top.addChild(item)
            self._mark(item)

    def _add_clusters(self, overlays: Any, scale: str) -> None:
        from napari_sigmma.viewer.overlays import layer_name
        from napari_sigmma.viewer.palette import category_colours

        desc = describe_clusters(overlays, scale)
        if not desc:
            return
        name = layer_name("clusters", scale)
        top = QTreeWidgetItem([f"{scale} clusters ({name})", "patches", "cell types · genes"])
        self.tree.addTopLevelItem(top)
        rgb = category_colours(len(desc))
        for d in desc:
            made = _pairs(d["types"], percent=True)
            if d["genes"]:
                made += (" · " if made else "") + _pairs(d["genes"], percent=False)
            item = QTreeWidgetItem([f"cluster {d['cluster'] + 1}", str(d["patches"]), made])
            item.setIcon(0, _swatch(rgb[d["cluster"]]))
            item.setToolTip(
                2,
                f"{d['cells']} cells under its {d['patches']} patches in view; genes: most "
                "enriched over the cells in view (mean log1p difference)",
            )
            item.setData(0, ROLE, ("cluster", name, d["cluster"]))
            top.addChild(item)
            self._mark(item)

    def _add_scales(self) -> None:
        from napari_sigmma.viewer.overlays import EDGE_RGB, layer_name

        rows = []
        for layer in sigmma_layers(self.viewer, CONTINUOUS_KINDS):
            meta = layer.metadata
            if meta["sigmma_kind"] == "attention":
                what = f"attention head {meta.get('head', 0)}"
            else:
                what = f"gene {meta.get('gene')} ({meta['sigmma_kind'].split('_', 1)[1]})"
            lo, hi = (float(v) for v in layer.contrast_limits)
            ramp = np.asarray(layer.colormap.map(np.linspace(0, 1, 32)), dtype=float)
            rows.append((what, f"{lo:.2g} – {hi:.2g}", meta.get("units", ""), ramp, layer))
        for scale in ("meso", "macro"):
            layer = next(
                (ly for ly in self.viewer.layers if ly.name == layer_name("edges", scale)), None
            )
            if layer is None:
                continue
            ramp = np.zeros((2, 4))
            ramp[:, :3] = EDGE_RGB[scale]
            ramp[:, 3] = (0.15, 1.0)
            rows.append(
                (f"{scale} edge probability", "0.5 – 1", "learned edges: opacity", ramp, layer)
            )
        overlays = self._overlays()
        cb = getattr(overlays, "cell_colours", None)
        if cb is not None and not cb.categorical:
            from napari.utils.colormaps import ensure_colormap

            from napari_sigmma.viewer.colour_by import NUMERIC_COLORMAP

            ramp = np.asarray(ensure_colormap(NUMERIC_COLORMAP).map(np.linspace(0, 1, 32)))
            layer = self._layer(layer_name(f"tiles by {cb.name}"))
            what = f"cells & tiles by {'gene ' if cb.source == 'gene' else ''}{cb.name}"
            lo, hi = cb.limits
            if layer is not None:
                rows.append((what, f"{lo:.2g} – {hi:.2g}", cb.units, ramp, layer))
        if not rows:
            return
        top = QTreeWidgetItem(["colour scales", "range", "unit"])
        self.tree.addTopLevelItem(top)
        for what, rng, unit, ramp, layer in rows:
            item = QTreeWidgetItem([what, rng, unit])
            item.setIcon(0, _gradient(ramp))
            item.setToolTip(0, layer.name + ("" if layer.visible else " (hidden)"))
            top.addChild(item)

    def _mark(self, item: QTreeWidgetItem) -> None:
        if self.isolated is not None and item.data(0, ROLE) == self.isolated:
            font = item.font(0)
            font.setBold(True)
            item.setFont(0, font)

    # -- isolate ------------------------------------------------------------------------------
    def categories(self) -> list[tuple[str, str, int, str, int]]:
        """``(group, layer name, index, name, count)`` of every listed category."""
        out = []
        for i in range(self.tree.topLevelItemCount()):
            top = self.tree.topLevelItem(i)
            for j in range(top.childCount()):
                item = top.child(j)
                key = item.data(0, ROLE)
                if key is not None:
                    out.append((key[0], key[1], int(key[2]), item.text(0), int(item.text(1))))
        return out

    def toggle(self, item_or_key: Any) -> None:
        """Show only this category (or, if it is the one isolated, show all again)."""
        key = item_or_key.data(0, ROLE) if isinstance(item_or_key, QTreeWidgetItem) else item_or_key
        if key is None:
            return
        key = (key[0], key[1], int(key[2]))
        if self.isolated is not None:
            self._restore(self.isolated)
            if self.isolated == key:
                self.isolated = None
                self.refresh()
                return
        self._isolate(key)
        self.isolated = key
        self.refresh()

    def _layer(self, name: str) -> Any:
        return next((ly for ly in self.viewer.layers if ly.name == name), None)

    def _isolate(self, key: tuple[str, str, int]) -> None:
        """Show only one category: the reader's cells of one type; one cluster's patches
        and, in that scale's SIGMMA cells layer, its cells; the cells and tiles of one
        category of the colour-by column."""
        group, name, index = key
        layer = self._layer(name)
        overlays = self._overlays()
        if group == "cluster" and overlays is not None and layer is not None:
            overlays.isolate_cells("cluster", layer.metadata.get("scale"), index)
        elif group == "colour" and overlays is not None:
            overlays.isolate_cells("category", None, index)
        if layer is None:
            return
        if group == "category":
            leg = layer.metadata["legend"]
            values = np.asarray(layer.features[leg["column"]].astype(str))
            keep = values == leg["names"][index]
            # napari 0.9 draws every point of a 2-D layer whatever ``shown`` says: the
            # others are made transparent too (their colours are kept to restore them)
            face = self._saved_face.setdefault(name, np.array(layer.face_color, copy=True))
            face = face.copy()
            face[~keep, 3] = 0.0
            layer.face_color = face
            layer.shown = keep
        else:
            layer.show_selected_label = True
            layer.selected_label = index + 1
            layer.visible = True

    def _restore(self, key: tuple[str, str, int]) -> None:
        group, name, _ = key
        overlays = self._overlays()
        if group in ("cluster", "colour") and overlays is not None:
            overlays.isolate_cells(None)
        layer = self._layer(name)
        if layer is None:
            return
        if group == "category":
            saved = self._saved_face.pop(name, None)
            if saved is not None and len(saved) == len(layer.data):
                layer.face_color = saved
            layer.shown = np.ones(len(layer.data), bool)
        else:
            layer.show_selected_label = False


# -- measured and predicted side by side ----------------------------------------------------------
_SIDE: weakref.WeakKeyDictionary[Any, _SideBySide] = weakref.WeakKeyDictionary()


class _SideBySide:
    """napari's grid view with two boxes: everything else (H&E, overlays, predicted gene
    maps) on the left, the measured gene maps on the right, one camera for both (so Home
    frames the slide in each). The grid groups consecutive layers (``stride``), so the
    measured maps are kept last in the layer list while it is on."""

    def __init__(self, viewer: Any) -> None:
        # weakly: this object is the value of a dict keyed (weakly) by the viewer
        self._viewer = weakref.ref(viewer)
        self.on = False
        self._busy = False
        viewer.layers.events.inserted.connect(self._arrange)

    @property
    def viewer(self) -> Any:
        return self._viewer()

    def set(self, on: bool) -> None:
        if self.viewer is None:
            return
        grid = self.viewer.canvas.grid
        if not on:
            if self.on:
                grid.enabled = False
            self.on = False
            return
        self.on = True
        self._arrange()

    def _arrange(self, *_: Any) -> None:
        if not self.on or self._busy or self.viewer is None:
            return
        layers = self.viewer.layers
        measured = sigmma_layers(self.viewer, ("gene_measured",))
        if not measured:
            return
        self._busy = True
        try:
            for ly in measured:  # keep them last, in their order
                layers.move(layers.index(ly), len(layers))
            grid = self.viewer.canvas.grid
            n_other = len(layers) - len(measured)
            grid.stride = max(n_other, len(measured), 1)
            grid.shape = (1, -1)
            grid.enabled = True
        finally:
            self._busy = False


def side_by_side(viewer: Any, on: bool) -> None:
    """Show the measured gene maps beside the others in napari's grid view (``on``), or
    go back to one view."""
    real = getattr(viewer, "__wrapped__", viewer)
    sbs = _SIDE.get(real)
    if sbs is None:
        if not on:
            return
        sbs = _SIDE[real] = _SideBySide(real)
    sbs.set(on)
