"""Hover: the status bar says what is under the cursor on the SIGMMA layers.

napari's own status names the active layer, the cursor's coordinates and that layer's raw
value (a cluster is only "8"). While the live view runs, :class:`HoverStatus` adds, for
the point under the cursor:

- the **cluster** of the patch there (at the scale of the active SIGMMA layer, else the
  session's scale) with its short description — the most frequent cell types of the cells
  under that cluster's patches in view, as the legend lists them
  (:func:`napari_sigmma.viewer.legend.describe_clusters`);
- the **cell** there (the nearest centroid within :data:`CELL_RADIUS_UM`): its id, its
  cell type, its graph-node cluster at that scale when its tile is encoded, and its value of
  the column or gene the cells are coloured by;
- the active SIGMMA layer's **value**, in words: the gene and whether it is predicted or
  measured, the attention head, the learned edges at that cell, the tile's value of the
  colour-by column.

It listens to the viewer's ``status`` event (napari computes the cursor status in a
thread and sets it on the main thread) and appends its text to it once. Its main-thread
work per cursor move is a few array look-ups: the tile and patch from the position (O(1)),
the cells of that one tile (the tile's encoded result, or a per-tile index built once), the
cluster descriptions from a cache rebuilt at most once per live-view draw. ``ms`` records
each update's cost.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

#: a cell is "under the cursor" when its centroid is this close (about a cell's radius)
CELL_RADIUS_UM = 8.0
#: marker key of a status this module has already completed
MARK = "sigmma"
SCALED = ("clusters", "cell_clusters", "edges")


class HoverStatus:
    """Adds the SIGMMA description of the point under the cursor to napari's status.

    Parameters
    ----------
    viewer
        The napari viewer (the real one, not the plugin proxy).
    overlays
        The live view's :class:`~napari_sigmma.viewer.overlays.LiveOverlays`.
    image_layer
        The H&E layer (its data are the level-0 pixels the overlays refer to).
    scale
        Callable returning the scale used for layers without one (the session's).
    """

    def __init__(self, viewer: Any, overlays: Any, image_layer: Any, *, scale: Any = None) -> None:
        self.viewer = viewer
        self.overlays = overlays
        self.image_layer = image_layer
        self._scale = scale or (lambda: "micro")
        self.ms: list[float] = []
        self._busy = False
        self._desc: dict[str, dict[int, str]] = {}
        self._types: np.ndarray | None = None
        self._tile_table: np.ndarray | None = None
        self._per_tile: list[np.ndarray] | None = None
        viewer.events.status.connect(self._on_status)

    def close(self) -> None:
        """Stop listening (the live view ends)."""
        if self.viewer is not None:
            self.viewer.events.status.disconnect(self._on_status)
        self.viewer = None

    def invalidate(self, *_: Any) -> None:
        """Forget the cluster descriptions (new tiles drawn or clusters refitted)."""
        self._desc.clear()

    # -- the status event ----------------------------------------------------------------------
    def _on_status(self, _event: Any = None) -> None:
        viewer = self.viewer
        if self._busy or viewer is None or self.overlays.viewer is None:
            return
        status = viewer.status
        if isinstance(status, dict):
            if MARK in status or not status.get("coordinates"):
                return
        elif not (isinstance(status, str) and " » " in status):
            return  # a message, not a cursor status
        t0 = time.perf_counter()
        try:
            text = self.text_at(viewer.cursor.position, viewer.layers.selection.active)
        except Exception:  # a status handler must never raise into napari's event loop
            text = ""
        if text:
            if isinstance(status, dict):
                new: Any = dict(status)
                new["coordinates"] = f"{status['coordinates']} | {text}"
                new["value"] = f"{status.get('value', '')} | {text}"
                new[MARK] = text
            else:
                new = f"{status} | {text}"
            self._busy = True
            try:
                viewer.status = new
            finally:
                self._busy = False
        self.ms.append((time.perf_counter() - t0) * 1000)
        del self.ms[:-2000]

    # -- the text ------------------------------------------------------------------------------
    def text_at(self, world: Any, layer: Any = None) -> str:
        """What the SIGMMA layers show at world position ``world`` (``(…, y, x)``), with
        ``layer``'s value when it is a SIGMMA layer; ``""`` outside the slide's tiles."""
        from napari_sigmma.viewer.overlays import layer_name

        ov = self.overlays
        grid = ov.grid
        pos = np.asarray(world, dtype=np.float64)
        if pos.size < 2:
            return ""
        # napari's data coordinate p is the centre of level-0 pixel p, which covers [p, p + 1)
        # of the grid's and the cells' coordinates
        y, x = (float(v) + 0.5 for v in self.image_layer.world_to_data(pos)[-2:])
        s = float(grid.tile_size)
        r, c = int(np.floor((y - grid.origin[1]) / s)), int(np.floor((x - grid.origin[0]) / s))
        if not (0 <= r < grid.n_rows and 0 <= c < grid.n_cols):
            return ""
        tile = int(self._table()[r, c])
        meta = (getattr(layer, "metadata", None) or {}) if layer is not None else {}
        kind = meta.get("sigmma_kind")
        scale = meta.get("scale") if kind in SCALED else None
        scale = scale or self._scale()
        parts: list[str] = []
        # the patch's cluster, and what it is made of
        lab = self._raster_value(layer_name("clusters", scale), x, y)
        if lab is not None and int(lab) > 0:
            desc = self._describe(scale).get(int(lab), "")
            parts.append(f"{scale} cluster {int(lab)}" + (f" ({desc})" if desc else ""))
        # the cell under the cursor
        result = ov.tiles.get(grid.tile_ids[tile]) if tile >= 0 else None
        cell = self._cell_at(x, y, tile, result)
        if cell >= 0:
            parts.append(self._cell_text(cell, result, scale))
        # the active layer's value
        if kind is not None:
            value = self._value_text(layer, kind, x, y, cell, result, scale)
            if value:
                parts.append(value)
        return " · ".join(parts)

    def _table(self) -> np.ndarray:
        if self._tile_table is None:
            g = self.overlays.grid
            t = np.full((g.n_rows, g.n_cols), -1, dtype=np.int64)
            t[np.asarray(g.rows), np.asarray(g.cols)] = np.arange(len(g))
            self._tile_table = t
        return self._tile_table

    def _raster_value(self, name: str, x: float, y: float, raster: Any = None) -> Any:
        """Value of a whole-grid raster (``n_rows * k, n_cols * k``) at level-0 ``(x, y)``."""
        ov = self.overlays
        data = ov._rasters.get(name) if raster is None else raster
        if data is None:
            return None
        g = ov.grid
        per = data.shape[0] // max(g.n_rows, 1)
        if per < 1 or data.shape[1] != g.n_cols * per:
            return None
        step = float(g.tile_size) / per
        rr = int(np.floor((y - g.origin[1]) / step))
        cc = int(np.floor((x - g.origin[0]) / step))
        if 0 <= rr < data.shape[0] and 0 <= cc < data.shape[1]:
            return data[rr, cc]
        return None

    def _describe(self, scale: str) -> dict[int, str]:
        """``{cluster number: "type 60%, type 20%"}``, rebuilt once per live-view draw."""
        desc = self._desc.get(scale)
        if desc is None:
            from napari_sigmma.viewer.legend import describe_clusters

            desc = {}
            for d in describe_clusters(self.overlays, scale, genes=False):
                if d["types"]:
                    desc[d["cluster"] + 1] = ", ".join(f"{n} {100 * v:.0f}%" for n, v in d["types"])
            self._desc[scale] = desc
        return desc

    def _cells_of(self, tile: int, result: Any) -> np.ndarray:
        if result is not None:
            return np.asarray(result.cell_index, dtype=np.int64)
        if tile < 0:
            return np.zeros(0, np.int64)
        if self._per_tile is None:  # once per live view (tiles not encoded yet)
            from napari_sigmma.tiles.graphs import cells_per_tile

            self._per_tile = cells_per_tile(self.overlays.paired.cells_px, self.overlays.grid)
        return self._per_tile[tile]

    def _cell_at(self, x: float, y: float, tile: int, result: Any) -> int:
        cells = self._cells_of(tile, result)
        if cells.size == 0:
            return -1
        xy = np.asarray(self.overlays.paired.cells_px)[cells]
        d2 = (xy[:, 0] - x) ** 2 + (xy[:, 1] - y) ** 2
        i = int(np.argmin(d2))
        radius = CELL_RADIUS_UM / float(self.overlays.frame.he_mpp)
        return int(cells[i]) if d2[i] <= radius * radius else -1

    def _cell_types(self) -> np.ndarray | None:
        if self._types is None:
            obs = getattr(self.overlays.paired, "obs", None)
            if obs is None or "cell_type" not in getattr(obs, "columns", ()):
                self._types = np.zeros(0, dtype=object)
            else:
                self._types = np.asarray(obs["cell_type"].astype(str))
        return self._types if self._types.size else None

    def _cell_text(self, cell: int, result: Any, scale: str) -> str:
        ov = self.overlays
        ids = getattr(ov.paired, "cell_ids", None)
        name = str(ids[cell]) if ids is not None and len(ids) > cell else str(cell)
        types = self._cell_types()
        text = f"cell {name}" + (f": {types[cell]}" if types is not None else "")
        node = self._cell_cluster(cell, result, scale)
        if node >= 0:
            text += f", {scale} cell cluster {node + 1}"
        cb = ov.cell_colours
        if cb is not None:
            text += f", {cb.name} {cb.label(cb.values[cell])}"
        return text

    def _cell_cluster(self, cell: int, result: Any, scale: str) -> int:
        cs = self.overlays.clusters
        key = f"cells_{scale}"
        if result is None or cs is None or key not in cs.centroids or scale not in result.nodes:
            return -1
        j = np.flatnonzero(np.asarray(result.cell_index) == cell)
        if j.size == 0:
            return -1
        return int(cs.predict(key, result.nodes[scale][j[:1]])[0])

    def _value_text(
        self, layer: Any, kind: str, x: float, y: float, cell: int, result: Any, scale: str
    ) -> str:
        ov = self.overlays
        meta = layer.metadata
        if kind in ("gene_predicted", "gene_measured"):
            v = self._raster_value(layer.name, x, y)
            which = kind.split("_", 1)[1]
            if v is None or not np.isfinite(v):
                return f"{meta.get('gene')} {which}: no value here"
            return f"{meta.get('gene')} {which}: {float(v):.3g} (log1p)"
        if kind == "attention":
            stack = getattr(ov, "_att_stack", None)
            v = None
            if getattr(ov, "_att_full", False) and stack is not None:
                v = self._raster_value(layer.name, x, y, raster=stack[ov.att_head])
            if v is None:
                v = layer.get_value(self.image_layer.data_to_world([y - 0.5, x - 0.5]), world=True)
            head = meta.get("head", 0)
            return f"attention head {head}: {float(v):.2f}" if v is not None else ""
        if kind == "edges":
            if cell < 0 or result is None or scale not in result.edges:
                return ""
            pairs, prob = result.edges[scale]
            mine = (pairs[:, 0] == cell) | (pairs[:, 1] == cell)
            n = int(mine.sum())
            if scale == "micro":
                return f"{n} proximity edges at this cell"
            best = f", most probable p = {float(prob[mine].max()):.2f}" if n else ""
            return f"{n} learned {scale} edges at this cell{best}"
        if kind == "tile_colour":
            cb = ov.cell_colours
            v = self._raster_value(layer.name, x, y)
            if cb is None or v is None:
                return ""
            if cb.categorical:
                return f"tile: mostly {cb.label(int(v) - 1)}" if int(v) > 0 else "tile: no cells"
            if not np.isfinite(v):
                return "tile: no cells"
            how = "log1p of the mean" if cb.source == "gene" else "mean"
            return f"tile {cb.name} ({how}): {cb.label(v)}"
        return ""
