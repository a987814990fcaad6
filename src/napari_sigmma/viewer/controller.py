"""The visible-tile controller: follows the camera, encodes what is on screen, draws it.

Flow
----
1. Every camera change (pan, zoom, canvas resize) computes the visible region in H&E
   level-0 pixels and the tiles it covers (:func:`napari_sigmma.live.visible.visible_tiles`,
   centre first). If the visible set did not change, nothing happens.
2. Tiles already in the engine's memory cache are drawn at once, in the same event-loop
   turn (a revisit costs a few milliseconds and needs no worker). Tiles that left the view
   are cleared from the overlays.
3. If tiles are missing, a 150 ms single-shot timer is (re)started; when the camera has
   settled, stale work is cancelled (its cancel flag is set and ``worker.quit()`` called)
   and a napari ``thread_worker`` generator encodes the missing tiles in batches, yielding
   per batch; the main thread adds each batch to the layers. Clusters are (re)fitted in
   the worker when enough new tiles have been encoded, and recoloured in place.
4. Zoomed out beyond ``max_visible`` tiles, nothing new is encoded: the status bar says so
   and the overlays show the cached tiles (rasters only).

Without a model the controller only says how to get one; the data layers work as usual.

The visible region comes from the camera (centre, zoom, canvas size) mapped through the H&E
layer's world→data transform, clipped to the slide. (The multiscale layer's
``corner_pixels × downsample_factors[data_level]`` describe the displayed level's loaded
region, which napari pads to chunk boundaries and updates only on the next draw; they are
used as a fallback when the canvas size is unknown.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal

from napari_sigmma.live.visible import clip_box, visible_tiles
from napari_sigmma.viewer.overlays import Frame, LiveOverlays
from napari_sigmma.viewer.tasks import TaskRunner

if TYPE_CHECKING:
    import napari

    from napari_sigmma.analysis.clusters import ClusterSet
    from napari_sigmma.analysis.genehead import GeneHead
    from napari_sigmma.embed.result import TileResult
    from napari_sigmma.live.engine import EmbeddingEngine
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide

NO_MODEL_STATUS = (
    "SIGMMA: no model loaded — the data layers work as usual. Load a checkpoint in the "
    "SIGMMA dock, or train one (napari-sigmma train --data <folder>, or the training widget)."
)


def unwrap(obj: Any) -> Any:
    """The real object behind napari's public-only proxy (plugin widgets get proxies)."""
    return getattr(obj, "__wrapped__", obj)


def camera_of(viewer: Any) -> Any:
    """The viewer's 2D camera (``viewer.scene.camera`` since napari 0.9)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def view_box_level0(viewer: napari.Viewer, layer: Any) -> tuple[float, float, float, float]:
    """The visible region ``(x0, y0, x1, y1)`` in the layer's level-0 pixels (unclipped).

    Camera centre ± half the canvas divided by the zoom gives the world box; its four
    corners are mapped through the layer's world→data transform (so layer scale, translate
    and affine are honoured). Falls back to the displayed level's ``corner_pixels`` ×
    ``downsample_factors`` when the canvas size is not known.
    """
    cam = camera_of(viewer)
    size = np.asarray(getattr(viewer.canvas, "size", (0, 0)), dtype=float)
    zoom = float(cam.zoom)
    if size.min() > 1 and zoom > 0:
        cy, cx = (float(v) for v in np.asarray(cam.center)[-2:])
        hy, hx = size[0] / zoom / 2, size[1] / zoom / 2
        lead = list(np.asarray(viewer.dims.point)[:-2])
        corners = [
            layer.world_to_data([*lead, y, x])[-2:]
            for y in (cy - hy, cy + hy)
            for x in (cx - hx, cx + hx)
        ]
        c = np.asarray(corners, dtype=float)
        return (
            float(c[:, 1].min()),
            float(c[:, 0].min()),
            float(c[:, 1].max()),
            float(c[:, 0].max()),
        )
    cp = np.asarray(layer.corner_pixels, dtype=float)[:, -2:]
    level = int(getattr(layer, "data_level", 0))
    ds = np.asarray(layer.downsample_factors, dtype=float)[level][-2:] if layer.multiscale else 1.0
    lo, hi = cp[0] * ds, (cp[1] + 1) * ds
    return float(lo[1]), float(lo[0]), float(hi[1]), float(hi[0])


class LiveController(QObject):
    """Keeps the SIGMMA overlays in step with what the viewer shows.

    Parameters
    ----------
    viewer
        The napari viewer.
    image_layer
        The H&E layer (multiscale or not) the grid refers to.
    engine
        The :class:`~napari_sigmma.live.engine.EmbeddingEngine`, or ``None`` (no model:
        the controller only shows how to get one).
    grid, paired
        The slide's tile grid and cells (default: the engine's).
    debounce_ms
        Quiet time after the last camera change before encoding starts.
    max_visible
        Above this many visible tiles nothing new is encoded.
    k, cluster_method
        Clusters (MiniBatchKMeans with ``k``, or ``"leiden"``).
    refit_growth, refit_min_new
        Refit clusters when the encoded tiles grew by this factor and by at least this many.
    refit_interval_s
        While tiles are being encoded, refit at most this often (each refit recolours the
        view, and its Python work competes with the encoder for the GIL); the clusters are
        always brought up to date after the last batch.
    genes, gene_head
        Genes to map and the ridge head predicting them.
    draw_budget_ms
        Main-thread time spent on layer updates per event-loop turn (a revisit of cached
        tiles gets three times this in the camera event itself).
    min_draw_interval_ms
        Batches arriving sooner than this after the last draw are drawn together.
    """

    status_changed = Signal(str)
    shown = Signal(object)  # list of tile ids drawn by the last update
    clusters_changed = Signal(object)
    closing = Signal()  # close() started: sessions and widgets let go of the controller

    def __init__(
        self,
        viewer: napari.Viewer,
        image_layer: Any,
        engine: EmbeddingEngine | None,
        grid: TileGrid | None = None,
        paired: PairedSlide | None = None,
        *,
        debounce_ms: int = 150,
        max_visible: int = 64,
        k: int = 8,
        cluster_method: str = "kmeans",
        refit_growth: float = 1.5,
        refit_min_new: int = 4,
        refit_interval_s: float = 2.0,
        genes: Sequence[str] | None = None,
        gene_head: GeneHead | None = None,
        he_mpp: float | None = None,
        cluster_cells_cap: int = 20000,
        draw_budget_ms: float = 12.0,
        min_draw_interval_ms: float = 250.0,
    ) -> None:
        super().__init__()
        viewer = unwrap(viewer)
        self.viewer = viewer
        self.image_layer = unwrap(image_layer)
        self.engine = engine
        self.grid = grid if grid is not None else (engine.grid if engine else None)
        self.paired = paired if paired is not None else (engine.paired if engine else None)
        self.max_visible = int(max_visible)
        self.k = int(k)
        self.cluster_method = cluster_method
        self.refit_growth = float(refit_growth)
        self.refit_min_new = int(refit_min_new)
        self.refit_interval_s = float(refit_interval_s)
        self.cluster_cells_cap = int(cluster_cells_cap)
        self.clusters: ClusterSet | None = None
        self.visible: list[str] = []
        self.status = ""
        self.closed = False
        self.last_update_ms = 0.0
        # (what, ms) of every main-thread update, for the benchmark and diagnostics
        self.handler_ms: list[tuple[str, float]] = []
        self.fit_seconds = 0.0  # cluster fits in the workers and their refit helpers
        self.fits = 0
        self._newest_fit: ClusterSet | None = None  # also fits not drawn yet
        self._fit_lock = threading.Lock()
        self.spans: list[tuple[str, float, float]] = []  # (what, start, end), perf_counter
        # encoding workers (tag "encode") and set_k refits (tag "refit"): one runner
        self.tasks = TaskRunner()
        # batches yielded by a worker and not yet drawn (the signal crosses threads)
        self._posted = 0
        self._posted_lock = threading.Lock()
        self._inbox: list[tuple[list[TileResult], ClusterSet | None]] = []
        self._last_draw = 0.0
        self.min_draw_interval_ms = float(min_draw_interval_ms)
        self._t_change = 0.0
        self.overlays: LiveOverlays | None = None
        self.hover: Any = None  # the status bar's SIGMMA text under the cursor

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(int(debounce_ms))
        self._timer.timeout.connect(self._on_settled)
        # layer updates are applied a slice at a time, one slice per event-loop turn, so
        # input, painting and other timers run in between (see LiveOverlays.drain)
        self.draw_budget_ms = float(draw_budget_ms)
        self._drain_timer = QTimer(self)
        self._drain_timer.setSingleShot(True)
        self._drain_timer.setInterval(0)
        self._drain_timer.timeout.connect(self._drain)
        self._inbox_timer = QTimer(self)
        self._inbox_timer.setSingleShot(True)
        self._inbox_timer.timeout.connect(self._flush_inbox)

        if engine is None or self.grid is None or self.paired is None:
            self._set_status(NO_MODEL_STATUS)
            return
        mpp = float(he_mpp or self.paired.he_mpp)
        self.overlays = LiveOverlays(
            viewer,
            Frame.from_layer(image_layer, mpp),
            self.grid,
            self.paired,
            provenance=engine.provenance(),
        )
        self.overlays.deferred = True
        from napari_sigmma.viewer.hover import HoverStatus
        from napari_sigmma.viewer.session import session_for, show_scale_bar

        show_scale_bar(viewer)
        session = session_for(viewer)
        self.hover = HoverStatus(
            viewer, self.overlays, self.image_layer, scale=lambda: session.scale
        )
        self.shown.connect(self.hover.invalidate)
        self.clusters_changed.connect(self.hover.invalidate)
        self.overlays.on_pending = self._drain_timer.start
        if gene_head is not None or engine.gene_head is not None:
            head = gene_head or engine.gene_head
            if engine.gene_head is not head:
                engine.set_gene_head(head)
            self.overlays.set_genes(list(genes) if genes else [default_gene(head)], head)
        self._connect()
        self.refresh(immediate=True)

    # -- wiring -----------------------------------------------------------------------------
    def _connect(self) -> None:
        cam = camera_of(self.viewer).events
        cam.center.connect(self._on_camera)
        cam.zoom.connect(self._on_camera)
        canvas = getattr(self.viewer, "canvas", None)
        if canvas is not None and hasattr(canvas.events, "size"):
            canvas.events.size.connect(self._on_camera)
        # the viewer closing removes its layers, the H&E with them: the controller closes
        # then (and the dock closes it when the window closes)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)

    def _disconnect(self) -> None:
        viewer = self.viewer
        if viewer is None:
            return
        cam = camera_of(viewer).events
        for emitter in (cam.center, cam.zoom):
            emitter.disconnect(self._on_camera)
        canvas = getattr(viewer, "canvas", None)
        if canvas is not None and hasattr(canvas.events, "size"):
            canvas.events.size.disconnect(self._on_camera)
        viewer.layers.events.removed.disconnect(self._on_layer_removed)

    def _on_layer_removed(self, event: Any) -> None:
        if getattr(event, "value", None) is self.image_layer:
            self.close()

    # -- status -------------------------------------------------------------------------------
    def _set_status(self, text: str) -> None:
        self.status = text
        if self.viewer is not None:
            try:
                self.viewer.status = text
            except (AttributeError, RuntimeError, TypeError):
                pass
        self.status_changed.emit(text)

    # -- camera → tiles -----------------------------------------------------------------------
    def current_box(self) -> tuple[float, float, float, float]:
        """Visible region in level-0 pixels, clipped to the slide."""
        box = view_box_level0(self.viewer, self.image_layer)
        return clip_box(box, self.paired.image.shape)

    def visible_now(self) -> list[str]:
        """Visible tile ids, centre first."""
        return visible_tiles(self.grid, self.current_box())

    def _on_camera(self, event: Any = None) -> None:
        if self.closed or self.engine is None:
            return
        if self.overlays is not None and self.overlays.updating:
            return  # a camera change made (and undone) while adding a layer
        self._t_change = time.perf_counter()
        ids = self.visible_now()
        if set(ids) == set(self.visible):
            self.visible = ids
            return
        missing = self._show_cached(ids)
        self._log("camera", self._t_change)
        if missing:
            self._timer.start()
        else:
            self._timer.stop()
            self._cancel_workers()

    def refresh(self, *, immediate: bool = False) -> None:
        """Recompute the visible tiles now (``immediate``: start encoding without waiting)."""
        if self.engine is None or self.closed:
            return
        self._t_change = time.perf_counter()
        ids = self.visible_now()
        missing = self._show_cached(ids, force=True)
        if missing:
            if immediate:
                self._on_settled()
            else:
                self._timer.start()
        elif self.clusters is None and len(self.engine.memory):
            # every tile in view was in memory (an engine shared with an earlier live
            # view): no encoding worker will fit the clusters, so fit them here
            self._start_refit()

    def _show_cached(self, ids: list[str], *, force: bool = False) -> list[str]:
        """Draw the memory-cached visible tiles now; return the ids still missing."""
        engine = self.engine
        self.visible = ids
        too_many = len(ids) > self.max_visible
        mem = [r for t in ids if (r := engine.memory.get(t)) is not None]
        have = {r.tile_id for r in mem}
        missing = [t for t in ids if t not in have]
        t0 = time.perf_counter()
        self.overlays.show(mem, keep=ids, detail=not too_many)
        # cached tiles: draw what fits in a few budgets now, the rest on the next turns
        self._drain(3 * self.draw_budget_ms)
        self.last_update_ms = (time.perf_counter() - t0) * 1000
        if too_many:
            self._set_status(
                f"SIGMMA: {len(ids)} tiles in view (more than {self.max_visible}): zoom in to "
                f"encode; showing {len(mem)} cached tiles."
            )
        elif not missing:
            self._set_status(f"SIGMMA: {len(ids)} tiles shown (cached).")
        if not missing or force or mem:
            self.shown.emit([r.tile_id for r in mem])
        return missing

    # -- workers --------------------------------------------------------------------------------
    def _cancel_workers(self) -> None:
        self.tasks.cancel()

    @property
    def _workers(self) -> list[Any]:
        """The running tasks (encoding and refits)."""
        return list(self.tasks.tasks)

    def _on_settled(self) -> None:
        if self.closed or self.engine is None:
            return
        ids = self.visible_now()
        self.visible = ids
        missing = [t for t in ids if t not in self.engine.memory]
        self._cancel_workers()
        if not missing:
            return
        too_many = len(ids) > self.max_visible
        self._start_worker(missing, encode_new=not too_many)

    def _start_worker(self, ids: list[str], *, encode_new: bool) -> None:
        if encode_new:
            n_cached = len(self.engine.cached(ids))
            self._set_status(
                f"SIGMMA: encoding {len(ids) - n_cached} tiles"
                + (f", loading {n_cached} from the cache" if n_cached else "")
                + "…"
            )
        self.tasks.start(
            self._work,
            ids,
            encode_new,
            on_yield=self._on_batch,
            on_error=self._on_error,
            on_cancelled=lambda: None,
            tag="encode",
            show=False,
        )

    def _work(self, ids: list[str], encode_new: bool, cancel: threading.Event):
        """Runs in a worker thread: yields ``(results, clusters_or_None)`` per batch.

        The first clusters are fitted here, so the first batch is drawn coloured; later
        refits (at most every ``refit_interval_s``) run in a helper thread while this one
        keeps encoding, and their clusters go out with the next batch; after the last batch
        the clusters are brought up to every encoded tile (sent with an empty batch).
        """
        engine = self.engine
        stream = engine.encode(ids, cancel) if encode_new else self._cached_only(ids, cancel)
        refit = _BackgroundFit(self._maybe_fit, cancel)
        last_refit = time.monotonic()
        try:
            for batch in stream:
                if cancel.is_set():
                    return
                cs = refit.take()
                if self.clusters is None and cs is None and not refit.running:
                    cs = self._maybe_fit(cancel)
                    last_refit = time.monotonic()
                elif not refit.running and time.monotonic() - last_refit >= self.refit_interval_s:
                    refit.start()  # a no-op fit returns None when nothing is due
                    last_refit = time.monotonic()
                with self._posted_lock:  # drawn in _on_yielded: busy until then
                    self._posted += 1
                yield batch, cs
            refit.join()
            cs = refit.take()
            if cancel.is_set():
                return
            last = self._maybe_fit(cancel, fitted=cs)  # the tiles of the last batches
            cs = last if last is not None else cs
            if cs is not None:
                with self._posted_lock:
                    self._posted += 1
                yield [], cs
        finally:
            refit.join()  # no helper outlives the worker

    def _cached_only(self, ids: list[str], cancel: threading.Event):
        engine = self.engine
        on_disk = engine.cached(ids)
        for i in range(0, len(on_disk), 32):
            if cancel.is_set():
                return
            got = [r for t in on_disk[i : i + 32] if (r := engine.lookup(t)) is not None]
            if got:
                yield got

    def _maybe_fit(
        self, cancel: threading.Event, *, fitted: ClusterSet | None = None
    ) -> ClusterSet | None:
        """Fit clusters (worker thread) when none exist or enough new tiles arrived since
        the newest fit (``fitted``, else the newest fit of any worker, else the drawn one).

        ``None`` when nothing needed fitting or ``cancel`` was set (checked between fits).
        """
        from napari_sigmma.analysis.clusters import fit_clusters
        from napari_sigmma.errors import Cancelled

        n = len(self.engine.memory)
        with self._fit_lock:
            cs = fitted or self._newest_fit or self.clusters
        if cs is not None and cs.k == self.k:
            if n < cs.n_tiles * self.refit_growth or n - cs.n_tiles < self.refit_min_new:
                return None
        if cancel.is_set() or n == 0:
            return None
        t0 = time.perf_counter()
        results = self.engine.memory_results()
        results = _cap_cells(results, self.cluster_cells_cap)
        try:
            out = fit_clusters(
                results, self.k, method=self.cluster_method, previous=cs, cancel=cancel
            )
        except Cancelled:
            return None
        finally:
            self.fit_seconds += time.perf_counter() - t0
            self.fits += 1
        with self._fit_lock:
            if self._newest_fit is None or out.n_tiles >= self._newest_fit.n_tiles:
                self._newest_fit = out
        return out

    def _on_batch(self, item: tuple[list[TileResult], ClusterSet | None]) -> None:
        """A worker's batch reached the main thread: draw it now, or with the next ones
        if the last draw was less than ``min_draw_interval_ms`` ago (every draw costs a
        repaint; with software OpenGL that is CPU taken from the encoder)."""
        with self._posted_lock:
            self._posted = max(0, self._posted - 1)
        if self.closed or self.overlays is None:
            return
        self._inbox.append(item)
        wait = self.min_draw_interval_ms - (time.perf_counter() - self._last_draw) * 1000
        if wait <= 0:
            self._flush_inbox()
        elif not self._inbox_timer.isActive():
            self._inbox_timer.start(int(wait) + 1)

    def _flush_inbox(self) -> None:
        items, self._inbox = self._inbox, []
        if not items or self.closed:
            return
        self._last_draw = time.perf_counter()
        results = [r for batch, _ in items for r in batch]
        latest = next((cs for _, cs in reversed(items) if cs is not None), None)
        self._on_yielded((results, latest))

    def _on_yielded(self, item: tuple[list[TileResult], ClusterSet | None]) -> None:
        if self.closed or self.overlays is None:
            return
        t0 = time.perf_counter()
        try:
            self._draw(*item)
        except Exception as err:  # a slot must not raise (PyQt aborts the process)
            self._on_error(err)
        self._log("draw", t0)

    def _draw(self, results: list[TileResult], cs: ClusterSet | None) -> None:
        t0 = time.perf_counter()
        visible = set(self.visible)
        fresh = [r for r in results if r.tile_id in visible]
        detail = len(self.visible) <= self.max_visible
        if cs is not None:
            self.clusters = cs
            self.overlays.show_with_clusters(fresh, cs, keep=self.visible, detail=detail)
            self.clusters_changed.emit(cs)
        elif fresh:
            self.overlays.show(fresh, keep=self.visible, detail=detail)
        self._drain()  # one budget now, the rest on the next turns
        self.last_update_ms = (time.perf_counter() - t0) * 1000
        shown = self.overlays.shown_tiles() & visible
        if detail:
            left = len(visible) - len(shown)
            self._set_status(
                f"SIGMMA: {len(shown)} of {len(visible)} visible tiles shown"
                + (f", {left} to go…" if left else ".")
            )
        self.shown.emit([r.tile_id for r in fresh])

    def _log(self, what: str, t0: float) -> None:
        t1 = time.perf_counter()
        self.handler_ms.append((what, (t1 - t0) * 1000))
        self.spans.append((what, t0, t1))
        if len(self.spans) > 4000:
            del self.handler_ms[:-2000], self.spans[:-2000]

    def _drain(self, budget_ms: float | None = None) -> None:
        """Apply queued layer updates for one budget; re-arm for the next turn if any
        are left."""
        if self.closed or self.overlays is None or not self.overlays.pending:
            return
        t0 = time.perf_counter()
        try:
            left = self.overlays.drain(self.draw_budget_ms if budget_ms is None else budget_ms)
        except Exception as err:  # a slot must not raise (PyQt aborts the process)
            self.overlays.discard_pending()
            self._on_error(err)
            left = 0
        self._log("drain", t0)
        if left:
            self._drain_timer.start()

    def _on_error(self, err: Exception) -> None:
        from napari.utils.notifications import show_error

        self._set_status(f"SIGMMA: encoding failed: {err}")
        show_error(f"SIGMMA live view: {err}")

    # -- settings ----------------------------------------------------------------------------------
    def set_k(self, k: int) -> None:
        """Change the number of clusters; refits in the background."""
        if int(k) == self.k:
            return
        self.k = int(k)
        if self.engine is None or self.closed or not len(self.engine.memory):
            return
        self._start_refit()

    def _start_refit(self) -> None:
        """Fit the clusters on the encoded tiles in a worker and draw them."""
        # an earlier refit for another k is obsolete: stop it between fits
        self.tasks.cancel(tag="refit")
        self.tasks.start(
            self._maybe_fit,
            on_done=lambda cs: self._on_yielded(([], cs)),
            on_error=self._on_error,
            on_cancelled=lambda: None,
            tag="refit",
            show=False,
        )

    def set_genes(self, genes: Sequence[str], gene_head: GeneHead | None = None) -> None:
        """Map ``genes`` (predicted and measured)."""
        if self.overlays is None:
            return
        head = gene_head or (self.engine.gene_head if self.engine else None)
        if head is not None and self.engine is not None and self.engine.gene_head is not head:
            self.engine.set_gene_head(head)
        self.overlays.set_genes(genes, head)

    def set_colour_by(self, name: str) -> None:
        """Colour the cells and tiles by table column or gene ``name`` (``""`` or
        :data:`~napari_sigmma.viewer.colour_by.CLUSTERS`: by their clusters again); see
        :meth:`LiveOverlays.set_cell_colours`."""
        from napari_sigmma.errors import SigmmaError
        from napari_sigmma.viewer.colour_by import CLUSTERS, colour_by

        if self.overlays is None or self.closed:
            return
        t0 = time.perf_counter()
        if not name or name == CLUSTERS:
            self.overlays.set_cell_colours(None)
        else:
            head = self.engine.gene_head if self.engine is not None else None
            try:
                cb = colour_by(
                    self.paired,
                    name,
                    grid=self.grid,
                    target_sum=getattr(head, "target_sum", None),
                    total_genes=list(head.genes) if head is not None else None,
                )
            except SigmmaError as err:
                from napari.utils.notifications import show_error

                self._set_status(f"SIGMMA: cannot colour by {name!r}: {err}")
                show_error(f"SIGMMA: cannot colour by {name!r}: {err}")
                return
            self.overlays.set_cell_colours(cb)
        self._log("colour_by", t0)
        if self.hover is not None:
            self.hover.invalidate()

    # -- shutdown ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop every running worker (encoding, refits) at its next batch or fit; the view
        stays live (the next camera change starts new work)."""
        self._timer.stop()
        self._cancel_workers()

    @property
    def busy(self) -> bool:
        """True while a worker is still running, or a batch it yielded is not drawn yet,
        or layer updates are still queued."""
        if not self.closed and (
            self._posted or self._inbox or (self.overlays and self.overlays.pending)
        ):
            return True
        return self.tasks.running

    def close(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Stop following the camera, cancel every worker, and (``wait``) let them finish.

        A worker stops at the next batch boundary; waiting blocks for at most ``timeout``
        seconds (the current batch's forward), so no thread outlives the viewer.
        """
        if self.closed:
            return
        self.closed = True
        self.closing.emit()
        if self.hover is not None:
            self.hover.close()
        self._timer.stop()
        self._drain_timer.stop()
        self._inbox_timer.stop()
        self._inbox.clear()
        self._cancel_workers()
        self._disconnect()
        if wait:
            self.tasks.wait(timeout)
        self.tasks.closed = True  # what a worker still reports is ignored
        self.viewer = None
        if self.overlays is not None:
            self.overlays.viewer = None


def default_gene(head: GeneHead) -> str:
    """The gene the head predicts with the most spread (largest coefficient norm)."""
    coef = head.maps["macro"].coef
    return head.genes[int(np.argmax(np.linalg.norm(coef, axis=0)))]


def _cap_cells(results: list[TileResult], cap: int) -> list[TileResult]:
    """A subset of tiles whose cells stay under ``cap`` (k-means time stays bounded)."""
    total = sum(r.n_cells for r in results)
    if total <= cap or not results:
        return results
    rng = np.random.default_rng(0)
    order = rng.permutation(len(results))
    out, n = [], 0
    for i in order:
        if n + results[i].n_cells > cap and out:
            break
        out.append(results[i])
        n += results[i].n_cells
    return out


class _BackgroundFit:
    """One cluster refit at a time in a helper thread of an encoding worker; a refit that
    failed raises in :meth:`take`, in the worker, as a fit there would have."""

    def __init__(self, fit: Any, cancel: threading.Event) -> None:
        self._fit, self._cancel = fit, cancel
        self._thread: threading.Thread | None = None
        self._result: ClusterSet | None = None
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        def run() -> None:
            try:
                self._result = self._fit(self._cancel)
            except BaseException as err:  # handed to the worker by take()
                self._error = err

        self._thread = threading.Thread(target=run, name="sigmma-refit", daemon=True)
        self._thread.start()

    def take(self) -> ClusterSet | None:
        """The finished refit's clusters (once), or ``None``."""
        if self._thread is None or self._thread.is_alive():
            return None
        self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        out, self._result = self._result, None
        return out

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
