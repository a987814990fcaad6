"""napari layers built from the live engine's :class:`TileResult` objects.

Every layer lives in the H&E's physical frame (world = µm, H&E level-0 pixels × ``he_mpp``),
with the convention of :mod:`napari_sigmma.viewer.layers`: point and vector data are H&E
level-0 pixels ``(y, x)`` and the layer carries the H&E layer's own data→world transform
(``scale = (he_mpp, he_mpp)`` as the reader shows it); rasters' pixels are a known number of
level-0 pixels. Layers are
named ``SIGMMA <kind> <scale>`` and kept together above the H&E:

- ``SIGMMA clusters micro|meso|macro`` (Labels): image-embedding clusters at 4×4, 2×2, 1×1
  per tile; label ``i + 1`` = cluster ``i``, colours shared with every other cluster layer;
- ``SIGMMA cells micro|meso|macro`` (Points): graph node clusters, one point per cell;
- ``SIGMMA edges micro|meso|macro`` (Vectors): G_micro's proximity edges and the edges the
  meso / macro edge-addition layers added, opacity from the edge probability; thinned to
  the most probable ``max_edges``; hidden by default (see below);
- ``SIGMMA attention`` (Image, 2-D): CLS→patch attention of the last ViT block over each
  tile for one head (:meth:`LiveOverlays.set_attention_head`, the Explore slider; a 2-D
  layer adds no dims slider under the canvas), each head rescaled to [0, 1] within its
  tile, with a colourbar;
- ``SIGMMA gene <GENE> predicted`` / ``measured`` (Image): the ridge gene head's prediction
  (micro-patch resolution) and the measured log1p expression, both on the H&E, on one
  colour scale, each with a colourbar; seen side by side in napari's grid view (see
  :func:`napari_sigmma.viewer.legend.side_by_side`), which keeps Home framing the slide;
- ``SIGMMA tiles by <column or gene>`` (Image with a colourbar, or Labels for a
  categorical column): the cells' values per micro patch, while the cells layers are
  coloured by the same column or gene (:meth:`LiveOverlays.set_cell_colours`,
  :mod:`napari_sigmma.viewer.colour_by`).

Cluster and cell-type colours come from :mod:`napari_sigmma.viewer.palette` (Glasbey).

Only the tiles handed to :meth:`LiveOverlays.show` (the visible ones) are drawn; updates
write into the existing layers' data (no remove/re-add), so nothing flickers. At first only
the micro cluster map is visible: the cell and edge layers are one click away, and hidden
layers are brought up to date only when shown. Every visible points or vectors layer costs
each frame its paint and each batch its update (10–25 ms apiece with software OpenGL:
``napari-sigmma bench`` measured the stall during inference at 166 ms with the micro cells
and meso edges shown by default, 73 ms without them).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.analysis.clusters import ClusterSet
from napari_sigmma.constants import SCALES
from napari_sigmma.viewer.colour_by import (
    CLUSTERS,
    NUMERIC_COLORMAP,
    ColourBy,
    patch_means,
    robust_range,
    scaled_expression,
)
from napari_sigmma.viewer.colour_by import PER_SIDE as CB_PER_SIDE
from napari_sigmma.viewer.palette import glasbey, label_rgba

if TYPE_CHECKING:
    import napari

    from napari_sigmma.analysis.genehead import GeneHead
    from napari_sigmma.embed.result import TileResult
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide

PER_SIDE = {"micro": 4, "meso": 2, "macro": 1}
PREFIX = "SIGMMA"
EDGE_RGB = {"micro": (1.0, 1.0, 1.0), "meso": (0.1, 0.9, 1.0), "macro": (1.0, 0.25, 0.85)}
EDGE_WIDTH_UM = {"micro": 0.8, "meso": 0.6, "macro": 0.5}
CROPS = {"micro": slice(0, 16), "meso": slice(16, 20), "macro": slice(20, 21)}
# predicted tiles sampled for a gene's colour scale (16 values each)
GENE_RANGE_TILES = 4096
# largest attention raster kept for the whole grid (heads × rows·h × cols·w values)
ATTENTION_FULL_MAX = 16_000_000
CNN_ATTENTION_TEXT = (
    "No attention maps: the model's backbone is a CNN, which has no attention heads. "
    "Train with a ViT backbone (uni, uni2-h, vit_small, vit_tiny) to see them."
)


def layer_name(kind: str, scale: str | None = None) -> str:
    """``SIGMMA <kind>[ <scale>]``."""
    return f"{PREFIX} {kind}" + (f" {scale}" if scale else "")


@dataclass
class Frame:
    """The H&E layer's level-0 pixel → world transform, for layers drawn on it.

    Attributes
    ----------
    he_mpp
        µm per H&E level-0 pixel.
    scale, translate
        ``(y, x)`` of the H&E layer (world units per level-0 pixel, world offset).
    affine
        The H&E layer's affine (``None`` when it is the identity).
    """

    he_mpp: float
    scale: np.ndarray
    translate: np.ndarray
    affine: np.ndarray | None = None
    unit_names: tuple[str, str] = ("um", "um")

    @classmethod
    def from_layer(cls, layer: Any, he_mpp: float) -> Frame:
        a = np.asarray(layer.affine.affine_matrix, dtype=float)
        a2 = a[-3:, -3:]
        units = tuple(str(u) for u in getattr(layer, "units", ())[-2:])
        return cls(
            he_mpp=float(he_mpp),
            scale=np.asarray(layer.scale, dtype=float)[-2:],
            translate=np.asarray(layer.translate, dtype=float)[-2:],
            affine=None if np.allclose(a2, np.eye(3)) else a2,
            unit_names=units if len(units) == 2 else ("um", "um"),  # type: ignore[arg-type]
        )

    def units(self, ndim: int = 2) -> tuple[str, ...]:
        """Layer units: the H&E layer's (µm when its pixel size is known)."""
        return (*(["pixel"] * (ndim - 2)), *self.unit_names)

    def _affine(self, ndim: int) -> np.ndarray | None:
        if self.affine is None:
            return None
        m = np.eye(ndim + 1)
        m[-3:, -3:] = self.affine
        return m

    def px_kwargs(self, ndim: int = 2) -> dict[str, Any]:
        """``scale``/``translate``/``affine`` for layers whose data are level-0 px ``(y, x)``."""
        lead = [1.0] * (ndim - 2)
        kw: dict[str, Any] = {
            "scale": [*lead, *self.scale],
            "translate": [*([0.0] * (ndim - 2)), *self.translate],
            "units": self.units(ndim),
        }
        if (aff := self._affine(ndim)) is not None:
            kw["affine"] = aff
        return kw

    def raster_kwargs(
        self, px: float, origin_xy: Sequence[float] = (0.0, 0.0), ndim: int = 2
    ) -> dict[str, Any]:
        """Transform of a raster whose pixels are ``px`` level-0 pixels and whose pixel
        ``[0, 0]`` starts at level-0 ``origin_xy``.

        napari draws a layer's pixel ``i`` centred on data coordinate ``i`` (it spans
        ``i ± 0.5``), the H&E's level-0 pixel ``p`` (the area ``[p, p + 1)`` of the grid and
        cell coordinates) centred on ``p``: raster pixel ``i``, which covers level-0
        ``[o + i·px, o + (i + 1)·px)``, is centred on ``o + (i + 0.5)·px − 0.5``. Without
        that half-pixel shift a micro-patch map would sit half a patch up and left of the
        tissue it describes.
        """
        shift = float(px) / 2 - 0.5
        oy, ox = float(origin_xy[1]) + shift, float(origin_xy[0]) + shift
        lead = [1.0] * (ndim - 2)
        kw: dict[str, Any] = {
            "scale": [*lead, *(self.scale * px)],
            "translate": [*([0.0] * (ndim - 2)), *(self.scale * [oy, ox] + self.translate)],
            "units": self.units(ndim),
        }
        if (aff := self._affine(ndim)) is not None:
            kw["affine"] = aff
        return kw


def label_colormap(n: int) -> Any:
    """Labels colormap: label ``i + 1`` ↔ palette colour ``i``; 0 transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    pal = glasbey()
    colors: dict[int | None, Any] = {0: np.zeros(4, np.float32), None: np.zeros(4, np.float32)}
    for i in range(max(int(n), 64)):
        colors[i + 1] = np.r_[pal[i % len(pal)], 1.0].astype(np.float32)
    return DirectLabelColormap(color_dict=colors)


def category_colormap(rgb: np.ndarray) -> Any:
    """Labels colormap: label ``i + 1`` ↔ ``rgb[i]``; 0 transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[int | None, Any] = {0: np.zeros(4, np.float32), None: np.zeros(4, np.float32)}
    for i, c in enumerate(np.asarray(rgb, dtype=np.float32)):
        colors[i + 1] = np.r_[c[:3], 1.0].astype(np.float32)
    return DirectLabelColormap(color_dict=colors)


def attention_colormap() -> Any:
    """Inferno whose opacity rises with the value: weak attention leaves the H&E visible."""
    from napari.utils.colormaps import Colormap, ensure_colormap

    base = ensure_colormap("inferno")
    x = np.linspace(0.0, 1.0, 32)
    rgba = np.asarray(base.map(x), dtype=np.float32)
    rgba[:, 3] = np.clip(x * 1.1, 0.0, 0.8)
    return Colormap(colors=rgba, controls=x, name="sigmma attention")


def point_colours(labels: np.ndarray) -> np.ndarray:
    """RGBA per point from cluster labels (``-1``: neutral grey)."""
    return label_rgba(labels)


class LiveOverlays:
    """The SIGMMA layers of one viewer and slide, updated in place as results arrive.

    Parameters
    ----------
    viewer
        The napari viewer.
    frame
        H&E level-0 → world transform (see :meth:`Frame.from_layer`).
    grid, paired
        The slide's grid and cells.
    provenance
        Goes into every layer's ``metadata`` (``run``, ``checkpoint_hash``, ``slide``, …).
    max_edges
        Most edges drawn per scale (the most probable are kept).
    point_size_um
        Cell point diameter.
    """

    def __init__(
        self,
        viewer: napari.Viewer,
        frame: Frame,
        grid: TileGrid,
        paired: PairedSlide,
        *,
        provenance: dict[str, str] | None = None,
        max_edges: int = 30000,
        point_size_um: float = 3.5,
    ) -> None:
        self.viewer = viewer
        self.frame = frame
        self.grid = grid
        self.paired = paired
        self.provenance = dict(provenance or {})
        self.max_edges = int(max_edges)
        self.point_size_um = float(point_size_um)
        self.tiles: dict[str, TileResult] = {}
        self.clusters: ClusterSet | None = None
        self.gene_head: GeneHead | None = None
        self.genes: list[str] = []
        self.layers: dict[str, Any] = {}
        self.detail = True
        self._updating = False
        self._pending: list[tuple] = []
        self.messages: list[str] = []
        self._dirty: set[str] = set()
        self._pools: dict[str, _SlotPool] = {}
        # deferred drawing (set by the live controller): layer updates are queued by name
        # and applied a few milliseconds at a time (:meth:`drain`), so the GUI thread is
        # never held for a whole batch; ``on_pending`` is called when the queue fills
        self.deferred = False
        self.on_pending: Any = None
        self._queue: dict[str, None] = {}
        # (layer name, ms) of every layer update, for the benchmark and diagnostics
        self.apply_ms: list[tuple[str, float]] = []
        self._att_full = True
        self.att_head = 0
        self._att_stack: np.ndarray | None = None  # (heads, y, x); the layer shows one head
        self._attention_warned = False
        self._measured: dict[str, np.ndarray] = {}
        self._gene_limits: dict[str, tuple[float, float]] = {}
        self._rasters: dict[str, np.ndarray] = {}
        # what the cells are coloured by (None: their clusters), and which cells the
        # legend isolated: ("cluster", scale, c) or ("category", None, code)
        self.cell_colours: ColourBy | None = None
        self._colour_generation = 0
        self._isolated: tuple[str, str | None, int] | None = None
        # predicted values of every tile drawn so far, per gene (the shared colour scale)
        self._pred_seen: dict[str, dict[int, np.ndarray]] = {}
        self._measured_range: dict[str, tuple[float, float]] = {}
        self._cells_yx = np.asarray(paired.cells_px, dtype=np.float64)[:, ::-1]
        # first size of the point / edge slot pools: enough for ~64 tiles of cells, so the
        # layers rarely have to grow while panning
        mean_cells = paired.n_cells / max(len(grid), 1)
        self._pool_size = int(min(max(paired.n_cells, 16), max(2048, 96 * mean_cells)))

    # -- helpers ----------------------------------------------------------------------------
    def _meta(self, kind: str, element: str, **extra: Any) -> dict[str, Any]:
        return {
            "sigmma_kind": kind,
            "sdata_element": element,
            **self.provenance,
            **extra,
        }

    def _tile_px(self) -> float:
        return float(self.grid.tile_size)

    def _raster_shape(self, per_side: int) -> tuple[int, int]:
        return self.grid.n_rows * per_side, self.grid.n_cols * per_side

    def _rc(self, res: TileResult) -> tuple[int, int]:
        return int(self.grid.rows[res.index]), int(self.grid.cols[res.index])

    def _insert_below_points(self, layer: Any) -> None:
        """Keep the SIGMMA layers in one block: rasters under edges, edges under cells."""
        layers = self.viewer.layers
        names = [ly.name for ly in layers]
        first_sigmma = next((i for i, n in enumerate(names) if n.startswith(PREFIX)), None)
        if first_sigmma is None:
            layers.append(layer)
            return
        # rasters go below the first vector/points SIGMMA layer, others on top of the block
        if layer.name.startswith((layer_name("edges"), layer_name("cells"))):
            layers.append(layer)
        else:
            pos = next(
                (
                    i
                    for i, n in enumerate(names)
                    if n.startswith((layer_name("edges"), layer_name("cells")))
                ),
                len(names),
            )
            layers.insert(pos, layer)

    def _replace_stale(self, layer: Any) -> None:
        """Remove a layer of the same name that these overlays did not make: one left by
        an earlier live view (its tiles, clusters or model are not these). When it was made
        by the same model on the same slide (the live view was switched off and on), the
        new layer keeps its visibility and opacity."""
        old = next(
            (ly for ly in self.viewer.layers if ly.name == layer.name and ly is not layer), None
        )
        if old is None or old is self.layers.get(layer.name):
            return
        meta = getattr(old, "metadata", {}) or {}
        if all(meta.get(k) == self.provenance.get(k) for k in ("checkpoint_hash", "slide")):
            layer.visible, layer.opacity = old.visible, old.opacity
        self.viewer.layers.remove(old)

    # -- quiet updates ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _quiet(self, layer: Any) -> Iterator[None]:
        """Change a layer's data/transform without the viewer recomputing every layer's
        extent and the dims (the overlays never reach outside the H&E)."""
        cb = getattr(self.viewer, "_on_layers_change", None)
        if cb is None:
            yield
            return
        ev = layer.events
        with ev.data.blocker(cb), ev.translate.blocker(cb), ev.scale.blocker(cb):
            yield

    def _watch(self, layer: Any) -> None:
        layer.events.visible.connect(lambda e, ly=layer: self._on_visible(ly))

    def _on_visible(self, layer: Any) -> None:
        if not layer.visible:
            return
        if layer.name in self._dirty:
            self._apply(layer.name)

    def _touch(self, names: Iterable[str]) -> None:
        """Update the visible layers among ``names`` (now, or queued when ``deferred``);
        mark the hidden ones."""
        for name in names:
            layer = self.layers.get(name)
            if layer is None:
                continue
            if layer.visible or name.startswith(layer_name("edges")):
                if self.deferred:
                    self._enqueue(name)
                else:
                    self._apply(name)
            else:
                self._dirty.add(name)

    def _enqueue(self, name: str) -> None:
        # an update reads the overlays' state when it runs, so a layer queued twice is
        # updated once, with the latest tiles
        was_empty = not self._queue
        self._queue[name] = None
        if was_empty and self.on_pending is not None:
            self.on_pending()

    @property
    def pending(self) -> int:
        """Layer updates queued and not yet applied."""
        return len(self._queue)

    def drain(self, budget_ms: float = 15.0) -> int:
        """Apply queued layer updates for about ``budget_ms`` (at least one); returns how
        many are left. The caller runs it again on a later event-loop turn."""
        t0 = time.perf_counter()
        while self._queue:
            name = next(iter(self._queue))
            del self._queue[name]
            if name in self.layers:
                self._apply(name)
            if (time.perf_counter() - t0) * 1000 >= budget_ms:
                break
        return len(self._queue)

    def discard_pending(self) -> None:
        """Forget the queued layer updates (after one of them failed)."""
        self._queue.clear()

    def flush(self) -> None:
        """Apply every queued layer update now."""
        while self._queue:
            self.drain(float("inf"))

    def _apply(self, name: str) -> None:
        t0 = time.perf_counter()
        try:
            self._apply_now(name)
        finally:
            self.apply_ms.append((name, (time.perf_counter() - t0) * 1000))
            del self.apply_ms[:-500]

    def _apply_now(self, name: str) -> None:
        self._dirty.discard(name)
        self._queue.pop(name, None)
        layer = self.layers[name]
        kind = layer.metadata.get("sigmma_kind")
        if kind == "clusters":
            layer.refresh(thumbnail=False, extent=False, highlight=False)
        elif kind == "cell_clusters":
            self._apply_points(layer)
        elif kind == "edges":
            self._apply_edges(layer)
        elif kind == "attention":
            self._apply_attention(layer)
        elif kind in ("gene_predicted", "gene_measured"):
            layer.refresh(thumbnail=False, extent=False, highlight=False)

    # -- layer creation -------------------------------------------------------------------
    def _add(self, layer: Any) -> Any:
        self._replace_stale(layer)
        self.layers[layer.name] = layer
        self._insert_below_points(layer)
        self._watch(layer)
        return layer

    def _ensure_layers(self) -> None:
        from napari.layers import Labels, Points, Vectors

        if layer_name("clusters", "micro") in self.layers:
            return
        for s in SCALES:
            n = PER_SIDE[s]
            name = layer_name("clusters", s)
            data = np.zeros(self._raster_shape(n), dtype=np.int32)
            self._rasters[name] = data
            layer = Labels(
                data,
                name=name,
                opacity=0.45,
                visible=(s == "micro"),
                colormap=label_colormap(self.clusters.n_clusters if self.clusters else 0),
                metadata=self._meta("clusters", "he_image", scale=s),
                **self.frame.raster_kwargs(self._tile_px() / n, self.grid.origin),
            )
            layer.editable = False
            self._add(layer)
        for s in SCALES:
            layer = Points(
                np.zeros((0, 2)),
                name=layer_name("cells", s),
                size=self.point_size_um / self.frame.he_mpp,
                border_width=0,
                face_color="white",
                opacity=0.9,
                visible=False,
                metadata=self._meta("cell_clusters", "table", scale=s),
                **self.frame.px_kwargs(),
            )
            layer.editable = False
            self._add(layer)
        for s in SCALES:
            layer = Vectors(
                np.zeros((0, 2, 2)),
                name=layer_name("edges", s),
                edge_width=EDGE_WIDTH_UM[s] / self.frame.he_mpp,
                vector_style="line",
                edge_color=_hex(EDGE_RGB[s]),
                opacity=0.85,
                visible=False,
                metadata=self._meta("edges", "table", scale=s),
                **self.frame.px_kwargs(),
            )
            layer.editable = False
            self._add(layer)

    def _ensure_attention_layer(self, heads: int, h: int, w: int) -> Any:
        from napari.layers import Image

        name = layer_name("attention")
        layer = self.layers.get(name)
        if layer is not None and layer.metadata.get("heads") == heads:
            return layer
        if layer is not None:
            self.layers.pop(name)
            self.viewer.layers.remove(layer)
        # the whole grid at h×w per tile when that is small; else the visible tiles' box
        full = heads * self.grid.n_rows * h * self.grid.n_cols * w <= ATTENTION_FULL_MAX
        shape = (heads, self.grid.n_rows * h, self.grid.n_cols * w) if full else (heads, h, w)
        self._att_full = full
        self._att_stack = np.zeros(shape, np.float32)
        self.att_head = min(self.att_head, heads - 1)
        # one head at a time (2-D): no dims slider under the canvas, the head is chosen in
        # Explore (and only while attention is shown)
        layer = Image(
            self._att_stack[self.att_head],
            name=name,
            colormap=attention_colormap(),
            blending="translucent",
            contrast_limits=(0.0, 1.0),
            opacity=0.8,
            visible=False,
            interpolation2d="linear",
            metadata=self._meta(
                "attention", "he_image", heads=heads, head=self.att_head, patch_grid=(h, w),
                units="attention, rescaled to [0, 1] per tile",
            ),
            **self.frame.raster_kwargs(self._tile_px() / h, self.grid.origin),
        )  # fmt: skip
        _show_colourbar(layer)
        self._add(layer)
        return layer

    def set_attention_head(self, head: int) -> None:
        """Show attention head ``head`` in the attention layer."""
        self.att_head = max(int(head), 0)
        layer = self.layers.get(layer_name("attention"))
        if layer is None or self._att_stack is None:
            return
        self.att_head = min(self.att_head, self._att_stack.shape[0] - 1)
        layer.metadata["head"] = self.att_head
        with self._quiet(layer):
            layer.data = self._att_stack[self.att_head]

    # -- public API -------------------------------------------------------------------------
    def show(
        self,
        results: Iterable[TileResult],
        *,
        keep: Iterable[str] | None = None,
        detail: bool = True,
    ) -> None:
        """Draw ``results``; with ``keep`` given, tiles not in it are removed first.

        Parameters
        ----------
        results
            New or updated tiles.
        keep
            The current visible set: shown tiles outside it are cleared from every layer.
        detail
            Draw cells, edges and attention too (off when zoomed far out: rasters only).
        """
        if self._updating:  # a layer change re-entered us through a camera event
            self._pending.append((list(results), None if keep is None else list(keep), detail))
            return
        self._updating = True
        try:
            self._show(list(results), keep, detail)
            while self._pending:
                self._show(*self._pending.pop(0))
        finally:
            self._updating = False

    def show_with_clusters(
        self,
        results: Iterable[TileResult],
        clusters: ClusterSet,
        *,
        keep: Iterable[str] | None = None,
        detail: bool = True,
    ) -> None:
        """New tiles and a refitted cluster set in one pass (one upload per layer)."""
        self.clusters = clusters
        keep_list = None if keep is None else list(keep)
        kept = [r for t, r in self.tiles.items() if keep_list is None or t in set(keep_list)]
        fresh = {r.tile_id: r for r in [*kept, *results]}
        if self.tiles and clusters.n_clusters > 64:
            for s in SCALES:
                name = layer_name("clusters", s)
                if name in self.layers:
                    self.layers[name].colormap = label_colormap(clusters.n_clusters)
        self.show(list(fresh.values()), keep=keep_list, detail=detail)

    def _show(self, results: list[TileResult], keep: Iterable[str] | None, detail: bool) -> None:
        detail_changed = bool(detail) != self.detail
        self.detail = bool(detail)
        removed: list[TileResult] = []
        if keep is not None:
            keep_set = set(keep)
            for t in [t for t in self.tiles if t not in keep_set]:
                removed.append(self.tiles.pop(t))
        for r in results:
            self.tiles[r.tile_id] = r
        if not results and not removed and not detail_changed:
            return
        self._ensure_layers()
        self._write_clusters(results, removed)
        self._write_genes(results, removed)
        names = [layer_name(k, s) for k in ("cells", "edges") for s in SCALES]
        if any(r.attention is not None for r in [*results, *removed]) or detail_changed:
            if self._touch_attention_layer() is not None:
                names.append(layer_name("attention"))
        self._note_attention()
        self._touch(names)

    def set_genes(self, genes: Sequence[str], gene_head: GeneHead | None) -> None:
        """Show predicted and measured maps of ``genes`` (replacing earlier gene layers)."""
        self.gene_head = gene_head
        wanted = list(dict.fromkeys(genes)) if gene_head is not None else []
        if gene_head is not None:
            gene_head.gene_index(wanted)  # unknown genes raise before anything changes
        for g in self.genes:
            if g not in wanted:
                # a gene shown again later gets new layers: fill them again
                self._measured.pop(g, None)
                self._gene_limits.pop(g, None)
                for which in ("predicted", "measured"):
                    name = layer_name(f"gene {g} {which}")
                    layer = self.layers.pop(name, None)
                    self._rasters.pop(name, None)
                    self._dirty.discard(name)
                    if layer is not None and layer in self.viewer.layers:
                        self.viewer.layers.remove(layer)
        self.genes = wanted
        self._write_genes(list(self.tiles.values()), [])

    def clear(self) -> None:
        """Forget every shown tile (layers stay, emptied)."""
        self.show([], keep=[])

    # -- rasters ----------------------------------------------------------------------------
    def _write_raster(
        self, name: str, blocks: list[tuple[int, int, np.ndarray]], fill: Any
    ) -> None:
        """Write per-tile blocks ``(row, col, values (n, n))`` into a raster layer.

        Visible Labels layers get a partial texture update; others are written in place
        and refreshed when shown (visible ones: now, or queued when ``deferred``).
        """
        layer = self.layers[name]
        data = self._rasters[name]
        if not blocks:
            return
        n = blocks[0][2].shape[0]
        if layer.visible and layer.metadata.get("sigmma_kind") == "clusters":
            # a partial texture update: a few ms, cheaper than queueing a full refresh
            ys, xs, vs = [], [], []
            yy, xx = np.mgrid[0:n, 0:n]
            for rr, cc, vals in blocks:
                ys.append((rr * n + yy).ravel())
                xs.append((cc * n + xx).ravel())
                vs.append(np.asarray(vals).ravel())
            y, x, v = np.concatenate(ys), np.concatenate(xs), np.concatenate(vs)
            changed = data[y, x] != v
            if changed.any():
                layer.data_setitem((y[changed], x[changed]), v[changed].astype(data.dtype))
            return
        for rr, cc, vals in blocks:
            data[rr * n : (rr + 1) * n, cc * n : (cc + 1) * n] = vals
        if self.deferred:
            self._touch([name])
        elif layer.visible:
            layer.refresh(thumbnail=False, extent=False, highlight=False)
        else:
            self._dirty.add(name)

    def _write_clusters(self, added: list[TileResult], removed: list[TileResult]) -> None:
        cs = self.clusters
        for s in SCALES:
            n = PER_SIDE[s]
            key = f"he_{s}"
            blocks = [(*self._rc(r), np.zeros((n, n), np.int32)) for r in removed]
            for r in added:
                if cs is not None and key in cs.centroids:
                    lab = cs.predict(key, r.he_crops[CROPS[s]]) + 1
                else:
                    lab = np.zeros(n * n, np.int64)
                blocks.append((*self._rc(r), lab.reshape(n, n).astype(np.int32)))
            self._write_raster(layer_name("clusters", s), blocks, 0)

    def _apply_points(self, layer: Any) -> None:
        s = layer.metadata["scale"]
        pool = self._pools.get(layer.name) or self._pools.setdefault(
            layer.name,
            _SlotPool(
                layer, dims=1, initial=self._pool_size, mask=lambda p, sc=s: self._cell_mask(sc, p)
            ),
        )
        cs = self.clusters
        key = f"cells_{s}"
        gen = -1 if cs is None or key not in cs.centroids else cs.generation
        colours = self.cell_colours

        def build(r: TileResult) -> tuple[np.ndarray, ...]:
            pos = self._cells_yx[r.cell_index]
            lab = cs.predict(key, r.nodes[s]) if gen >= 0 else np.full(r.n_cells, -1)
            rgba = point_colours(lab) if colours is None else colours.rgba(r.cell_index)
            return pos, rgba, r.cell_index, lab

        want = {t: r for t, r in self.tiles.items() if s in r.nodes} if self.detail else {}
        pool.sync(want, build, generation=(gen, self._colour_generation))
        layer.metadata["n_cells"] = pool.n_shown
        layer.metadata["coloured_by"] = CLUSTERS if colours is None else colours.name

    # -- colour by a column or gene; click-to-isolate on the cells ---------------------------
    def set_cell_colours(self, colours: ColourBy | None) -> None:
        """Colour the cells (every scale's cells layer) by ``colours`` — a table column or a
        gene, :func:`napari_sigmma.viewer.colour_by.colour_by` — and show the tiles by it
        (layer ``SIGMMA tiles by <name>``: mean per micro patch with a colourbar, or the most
        frequent category); ``None``: back to the clusters (the tiles layer goes)."""
        self.cell_colours = colours
        self._colour_generation += 1
        if self._isolated is not None and self._isolated[0] == "category":
            self._isolated = None
            self._refilter()
        for name in [n for n in self.layers if n.startswith(layer_name("tiles by "))]:
            layer = self.layers.pop(name)
            self._rasters.pop(name, None)
            self._dirty.discard(name)
            if self.viewer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        if colours is not None:
            self._tiles_layer(colours)
        self._touch([layer_name("cells", s) for s in SCALES])

    def _tiles_layer(self, colours: ColourBy) -> Any:
        from napari.layers import Image, Labels

        name = layer_name(f"tiles by {colours.name}")
        raster = colours.tile_raster(self.paired, self.grid)
        self._rasters[name] = raster
        meta = self._meta(
            "tile_colour", "table", colour_by=colours.name, source=colours.source,
            categorical=colours.categorical, units=colours.units,
        )  # fmt: skip
        kw = self.frame.raster_kwargs(self._tile_px() / CB_PER_SIDE, self.grid.origin)
        if colours.categorical:
            layer = Labels(
                raster,
                name=name,
                opacity=0.6,
                colormap=category_colormap(colours.colours),
                metadata=meta,
                **kw,
            )
            layer.editable = False
        else:
            layer = Image(
                raster,
                name=name,
                colormap=NUMERIC_COLORMAP,
                contrast_limits=colours.limits,
                opacity=0.75,
                metadata=meta,
                **kw,
            )
            _show_colourbar(layer)
        return self._add(layer)

    def isolate_cells(self, kind: str | None, scale: str | None = None, value: int = -1) -> None:
        """Show only some cells in the cells layers: ``("cluster", scale, c)`` the cells of
        cluster ``c`` in that scale's layer, ``("category", None, code)`` the cells of one
        category of the colour-by column in every layer; ``None``: all again."""
        self._isolated = None if kind is None else (kind, scale, int(value))
        self._refilter()

    @property
    def isolated(self) -> tuple[str, str | None, int] | None:
        return self._isolated

    def _refilter(self) -> None:
        for pool in self._pools.values():
            pool.refilter()

    def _cell_mask(self, scale: str, pool: _SlotPool) -> np.ndarray | None:
        iso = self._isolated
        if iso is None:
            return None
        kind, iso_scale, value = iso
        if kind == "cluster":
            return pool.labels == value if iso_scale == scale else None
        colours = self.cell_colours
        if kind == "category" and colours is not None and colours.categorical:
            cells = pool.cells
            keep = np.zeros(cells.size, bool)
            ok = cells >= 0
            keep[ok] = colours.values[cells[ok]] == value
            return keep
        return None

    def _apply_edges(self, layer: Any) -> None:
        s = layer.metadata["scale"]
        tiles = self.tiles if self.detail else {}
        want = {t: r for t, r in tiles.items() if s in r.edges}
        total = sum(len(r.edges[s][1]) for r in want.values())
        per_tile = max(16, self.max_edges // max(len(want), 1))
        n = sum(min(len(r.edges[s][1]), per_tile) for r in want.values())
        layer.metadata.update({"n_edges": total, "n_drawn": n})
        if not layer.visible:
            self._dirty.add(layer.name)
            return
        if total > n:
            self._note(f"{layer.name}: {total} edges, showing the most probable {n}")
        pool = self._pools.get(layer.name) or self._pools.setdefault(
            layer.name, _SlotPool(layer, dims=2, initial=4 * self._pool_size)
        )
        rgb = EDGE_RGB[s]

        def build(r: TileResult) -> tuple[np.ndarray, np.ndarray]:
            pairs, prob = r.edges[s]
            if len(prob) > per_tile:
                keep = np.argsort(-prob, kind="stable")[:per_tile]
                pairs, prob = pairs[keep], prob[keep]
            a = self._cells_yx[pairs[:, 0]]
            b = self._cells_yx[pairs[:, 1]]
            rgba = np.zeros((len(prob), 4), np.float32)
            rgba[:, :3] = rgb
            # added edges have p in (0.5, 1]: spread that range over the opacity
            rgba[:, 3] = 0.9 if s == "micro" else np.clip(0.15 + 0.85 * (prob - 0.5) / 0.5, 0.15, 1)
            return np.stack([a, b - a], axis=1), rgba

        pool.sync(want, build, generation=per_tile)

    def _note_attention(self) -> None:
        if (
            self.detail
            and self.tiles
            and all(r.attention is None for r in self.tiles.values())
            and not self._attention_warned
        ):
            self._attention_warned = True
            self._note(CNN_ATTENTION_TEXT)

    def _touch_attention_layer(self) -> Any:
        with_att = [r for r in self.tiles.values() if r.attention is not None]
        if not with_att:
            return self.layers.get(layer_name("attention"))
        heads, h, w = with_att[0].attention.shape
        return self._ensure_attention_layer(heads, h, w)

    def _apply_attention(self, layer: Any) -> None:
        with_att = [r for r in self.tiles.values() if r.attention is not None]
        if not self.detail:
            with_att = []
        heads, h, w = int(layer.metadata["heads"]), *layer.metadata["patch_grid"]
        s = self._tile_px()
        if self._att_full:
            stack = self._att_stack
            stack[:] = 0
            r0 = c0 = 0
        elif with_att:
            rows = np.array([self._rc(r)[0] for r in with_att])
            cols = np.array([self._rc(r)[1] for r in with_att])
            r0, c0 = int(rows.min()), int(cols.min())
            nr, nc = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
            stack = np.zeros((heads, nr * h, nc * w), np.float32)
        else:
            r0 = c0 = 0
            stack = np.zeros((heads, h, w), np.float32)
        for r in with_att:
            rr, cc = self._rc(r)
            # each head rescaled to [0, 1] within its tile: where it looks, relative to the
            # rest of that tile (raw maps of a whole slide span orders of magnitude)
            a = r.attention.reshape(heads, -1)
            lo, hi = a.min(axis=1, keepdims=True), a.max(axis=1, keepdims=True)
            a = ((a - lo) / np.maximum(hi - lo, 1e-12)).reshape(r.attention.shape)
            y0, x0 = (rr - r0) * h, (cc - c0) * w
            stack[:, y0 : y0 + h, x0 : x0 + w] = a
        with self._quiet(layer):
            if self._att_full:
                layer.refresh(thumbnail=False, extent=False, highlight=False)
            else:
                self._att_stack = stack
                origin = (self.grid.origin[0] + c0 * s, self.grid.origin[1] + r0 * s)
                kw = self.frame.raster_kwargs(s / h, origin)
                layer.data = stack[min(self.att_head, heads - 1)]
                layer.translate = kw["translate"]
        layer.metadata["tiles"] = sorted(r.tile_id for r in with_att)

    def _note(self, text: str) -> None:
        if text not in self.messages:
            self.messages.append(text)
            del self.messages[:-20]

    # -- genes ------------------------------------------------------------------------------
    def _gene_layer(self, name: str, per_side: int, kind: str, gene: str) -> Any:
        from napari.layers import Image

        layer = self.layers.get(name)
        if layer is None:
            data = np.full(self._raster_shape(per_side), np.nan, np.float32)
            self._rasters[name] = data
            origin = self.grid.origin
            layer = Image(
                data,
                name=name,
                colormap="viridis",
                opacity=0.75,
                visible=False,
                metadata=self._meta(
                    f"gene_{kind}",
                    "he_image" if kind == "predicted" else "table",
                    gene=gene,
                    placement="on the H&E",
                    offset_px=0.0,
                    units="log1p expression (counts scaled per cell)",
                ),
                **self.frame.raster_kwargs(self._tile_px() / per_side, origin),
            )
            _show_colourbar(layer)
            self._add(layer)
        return layer

    def _write_genes(self, added: list[TileResult], removed: list[TileResult]) -> None:
        head = self.gene_head
        if head is None or not self.genes:
            return
        micro = "micro" in head.maps
        n = 4 if micro else 1
        for g, j in zip(self.genes, head.gene_index(self.genes), strict=True):
            pname = layer_name(f"gene {g} predicted")
            mname = layer_name(f"gene {g} measured")
            pred = self._gene_layer(pname, n, "predicted", g)
            meas = self._gene_layer(mname, n, "measured", g)
            blocks = [(*self._rc(r), np.full((n, n), np.nan, np.float32)) for r in removed]
            seen = self._pred_seen.setdefault(g, {})
            n_seen = len(seen)
            for r in added:
                if r.genes_pred is None:
                    head.apply([r])
                if micro and r.genes_pred_micro is not None:
                    vals = r.genes_pred_micro[:, j].reshape(4, 4)
                else:
                    vals = np.full((n, n), r.genes_pred[j], np.float32)
                blocks.append((*self._rc(r), vals))
                seen[int(r.index)] = vals
            self._write_raster(pname, blocks, np.nan)
            if g not in self._measured:
                self._measured[g] = self._measured_map(g, n, head)
                self._measured_range[g] = robust_range(self._measured[g])
                self._rasters[mname][:] = self._measured[g]
                self._touch([mname])
            if g not in self._gene_limits or len(seen) > n_seen:
                self._update_gene_limits(g, (pred, meas))

    def _update_gene_limits(self, gene: str, layers: tuple[Any, ...]) -> None:
        """One colour scale for a gene's measured and predicted maps: each map's 1st–99th
        percentile range, joined (so neither map is clipped at more than 1 % of its values
        at either end, and a flat prediction is not washed out by the measured range),
        over the measured map of every tile and the predictions of every tile drawn so far.
        The scale is only changed when it moved by more than 2 % of its width."""
        seen = self._pred_seen.get(gene, {})
        blocks = list(seen.values())
        if len(blocks) > GENE_RANGE_TILES:  # a fixed sample keeps this a few ms per batch
            pick = np.random.default_rng(0).choice(len(blocks), GENE_RANGE_TILES, replace=False)
            blocks = [blocks[i] for i in np.sort(pick)]
        m_lo, m_hi = self._measured_range[gene]
        lo, hi = m_lo, m_hi
        if blocks:
            p_lo, p_hi = robust_range(np.concatenate([b.ravel() for b in blocks]))
            lo, hi = min(m_lo, p_lo), max(m_hi, p_hi)
        old = self._gene_limits.get(gene)
        if old is not None:
            tol = 0.02 * max(old[1] - old[0], 1e-6)
            if abs(old[0] - lo) <= tol and abs(old[1] - hi) <= tol:
                return
        self._gene_limits[gene] = (lo, hi)
        for ly in layers:
            ly.contrast_limits = (lo, hi)
            ly.metadata["colour_range"] = "1st-99th percentile of each map, joined"

    def _measured_map(self, gene: str, n: int, head: GeneHead) -> np.ndarray:
        """Measured log1p expression of ``gene`` per tile (``n = 1``) or micro patch
        (``n = 4``) of every tile (NaN without cells): each cell scaled over the head's
        genes to its ``target_sum`` (how the head's targets were made), averaged, log1p.
        One pass over the cells."""
        scaled = scaled_expression(
            self.paired, gene, target_sum=head.target_sum, total_genes=list(head.genes)
        )
        return np.log1p(patch_means(self.paired, self.grid, scaled, per_side=n))

    # -- introspection (tests, status) ------------------------------------------------------
    @property
    def updating(self) -> bool:
        """True while the overlays are being changed (camera events then are ours)."""
        return self._updating

    def shown_tiles(self) -> set[str]:
        return set(self.tiles)


class _SlotPool:
    """Fixed slots of a Points or Vectors layer, handed out per tile.

    Rebuilding a points layer's data each time the view moves costs napari a full
    re-validation; here tiles get slots in a preallocated array, tiles that leave free
    theirs (hidden: transparent points — and ``shown = False`` —, zero-length transparent
    vectors), and one refresh uploads the change. The arrays only grow (doubling) when
    full. (napari 0.9 draws every point of a 2-D points layer whatever its ``shown``
    says, so a hidden point is also made transparent: ``rgba`` keeps the true colours.)
    """

    def __init__(self, layer: Any, *, dims: int, initial: int = 256, mask: Any = None) -> None:
        self.layer = layer
        self.initial = max(int(initial), 16)
        self.vectors = dims == 2
        self.slots: dict[str, np.ndarray] = {}
        self.free: list[np.ndarray] = []
        self.cap = 0
        self.generation: Any = None
        self.n_shown = 0
        # points: the cell (global index) and cluster of every slot (-1: none), and
        # ``mask(pool) -> bool (cap,) | None``, which of the used slots are shown (the
        # legend's click-to-isolate)
        self.cells = np.zeros(0, np.int64)
        self.labels = np.zeros(0, np.int64)
        self.rgba = np.zeros((0, 4), np.float32)
        self.mask = mask

    def _data(self) -> np.ndarray:
        return self.layer.data

    def _colours(self) -> np.ndarray:
        return self.layer.edge_color if self.vectors else self.layer.face_color

    def _take(self, n: int) -> np.ndarray | None:
        # slot order does not matter: no sort (it cost more than the rest of an update)
        free = (
            self.free[0]
            if len(self.free) == 1
            else (np.concatenate(self.free) if self.free else np.zeros(0, np.int64))
        )
        if free.size < n:
            return None
        self.free = [free[n:]] if free.size > n else []
        return free[:n]

    def _grow(self, need: int) -> None:
        new_cap = max(2 * self.cap, self.cap + need, self.initial)
        old_data, old_col = self._data(), self._colours()
        shape = (new_cap, 2, 2) if self.vectors else (new_cap, 2)
        data = np.zeros(shape, np.float64)
        cols = np.zeros((new_cap, 4), np.float32)
        if self.cap:
            data[: self.cap] = old_data[: self.cap]
            cols[: self.cap] = old_col[: self.cap]
        shown = np.zeros(new_cap, bool)
        if not self.vectors and self.cap:
            shown[: self.cap] = self.layer.shown[: self.cap]
        if not self.vectors:
            self.cells = np.r_[self.cells, np.full(new_cap - self.cap, -1, np.int64)]
            self.labels = np.r_[self.labels, np.full(new_cap - self.cap, -1, np.int64)]
            self.rgba = np.r_[self.rgba, np.zeros((new_cap - self.cap, 4), np.float32)]
        self.free.append(np.arange(self.cap, new_cap))
        self.cap = new_cap
        layer = self.layer
        # one refresh at the end instead of one per property (a vectors layer recomputes its
        # thumbnail vector by vector on every refresh)
        block = getattr(layer, "_block_refresh", None)
        with block() if block is not None else contextlib.nullcontext():
            layer.data = data
            if self.vectors:
                layer.edge_color = cols
            else:
                layer.face_color = cols
                layer.shown = shown
        layer.refresh(thumbnail=False, extent=False, highlight=False)

    def sync(self, want: dict[str, Any], build: Any, *, generation: Any) -> None:
        """Show exactly the tiles in ``want``; ``build(result) -> (data, rgba)`` (points:
        ``(data, rgba, cells, labels)``)."""
        regen = generation != self.generation
        self.generation = generation
        gone = [t for t in self.slots if t not in want or regen]
        new = [t for t in want if t not in self.slots or regen]
        if not gone and not new:
            return
        for t in gone:
            self.free.append(self.slots.pop(t))
        built = {t: build(want[t]) for t in new}
        need = sum(len(b[0]) for b in built.values())
        if self.cap == 0 and need == 0:
            self.n_shown = 0
            return  # nothing was ever drawn and nothing is to be drawn
        free_n = sum(len(f) for f in self.free)
        if need > free_n:
            self._grow(need - free_n)
        layer = self.layer
        data, cols = self._data(), self._colours()
        hidden = np.concatenate(self.free) if self.free else np.zeros(0, np.int64)
        if self.vectors and hidden.size:
            data[hidden] = 0.0
            cols[hidden, 3] = 0.0
        for t, b in built.items():
            d, c = b[0], b[1]
            idx = self._take(len(d))
            self.slots[t] = idx
            data[idx] = d
            if self.vectors:
                cols[idx] = c
            else:
                self.rgba[idx] = c
                self.cells[idx], self.labels[idx] = b[2], b[3]
        self.n_shown = sum(len(v) for v in self.slots.values())
        if self.vectors:
            with layer.events.edge_color.blocker():
                layer.edge_color = cols
            layer.refresh(thumbnail=False, extent=False, highlight=False)
        else:
            self.refilter()

    def shown(self) -> np.ndarray:
        """``(cap,)`` the slots in use that ``mask`` lets through."""
        shown = np.zeros(self.cap, bool)
        if self.slots:
            shown[np.concatenate(list(self.slots.values()))] = True
        keep = self.mask(self) if self.mask is not None else None
        if keep is not None:
            shown &= keep
        return shown

    def refilter(self) -> None:
        """Show the used slots that ``mask`` lets through (a changed mask, new tiles):
        the others are transparent (and not ``shown``)."""
        if self.vectors or not self.cap:
            return
        shown = self.shown()
        face = self.rgba.copy()
        face[~shown, 3] = 0.0
        layer = self.layer
        with layer.events.face_color.blocker():
            layer.face_color = face
        layer.shown = shown  # refreshes the view: the new colours go with it


def _show_colourbar(layer: Any) -> None:
    """Turn on the layer's own colourbar (napari's canvas overlay of intensity layers)."""
    bar = getattr(layer, "colorbar", None)
    if bar is not None:
        bar.visible = True


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(255 * v):02x}" for v in rgb)
