"""The viewer half of ``napari-sigmma bench --scale``: a big slide in a shown napari viewer.

:func:`view_slide_bench` opens a slide through the plugin's own slide reader
(``viewer.open(path, plugin="napari-sigmma")``, i.e. :func:`napari_sigmma.viewer.hooks.
read_path`) into a shown viewer, then replays :func:`napari_sigmma.bench.scale.
camera_walk` — pans, zooms, far jumps at level 0 and overviews. After each move the Qt
event loop runs until the image layer has sliced the data for the new view (napari's
multiscale slicing happens in the canvas draw; with async slicing, ``layer.loaded``) and a
frame has been drawn with it (:func:`wait_until_drawn`). RSS (``VmRSS``) is sampled after
every move; the peak is ``VmHWM`` (the kernel's high-water mark of this process's memory;
``ru_maxrss`` would include the parent's RSS at the fork).

Meant to run in a fresh process, so the figures are the viewer's own::

    python -m napari_sigmma.bench.scale_qt SLIDE [--events N] [--seed S]

prints one JSON line. :func:`napari_sigmma.bench.scale.view_memory` runs it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "WINDOW_SIZE",
    "DrawWatch",
    "rss_mb",
    "shown_region",
    "view_slide_bench",
    "wait_until_drawn",
    "walk_viewer",
]

#: Main-window size of the benchmark viewer (a laptop/desktop-sized window).
WINDOW_SIZE = (1600, 1000)
PLUGIN = "napari-sigmma"


def rss_mb() -> float:
    """Current resident set size of this process (``VmRSS``), MB."""
    from napari_sigmma.bench.host import rss_mb

    return rss_mb("VmRSS")


class DrawWatch:
    """Counts the canvas frames drawn and whether each showed the layer's current slice.

    napari slices a multiscale layer inside the draw handler (after the scene was drawn
    with the previous texture), so the new data appear in the *next* frame. A frame is
    "settled" when no new slice arrived while it was drawn.
    """

    def __init__(self, viewer: Any, layer: Any) -> None:
        self.layer = layer
        self.canvas = viewer.window._qt_viewer.canvas._scene_canvas
        self.slices = 0
        self.settled = 0
        self._at_start = 0
        layer.events.set_data.connect(self._on_set_data)
        self.canvas.events.draw.connect(self._on_start, position="first")
        self.canvas.events.draw.connect(self._on_end, position="last")

    def _on_set_data(self, _event: Any = None) -> None:
        self.slices += 1

    def _on_start(self, _event: Any = None) -> None:
        self._at_start = self.slices

    def _on_end(self, _event: Any = None) -> None:
        if self.slices == self._at_start:
            self.settled += 1

    def close(self) -> None:
        """Disconnect from the layer and the canvas."""
        self.layer.events.set_data.disconnect(self._on_set_data)
        self.canvas.events.draw.disconnect(self._on_start)
        self.canvas.events.draw.disconnect(self._on_end)


def wait_until_drawn(watch: DrawWatch, settled_before: int, timeout_s: float = 60.0) -> bool:
    """Process Qt events until a settled frame was drawn after ``settled_before`` frames
    and the layer is loaded; ``False`` on timeout."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        app.processEvents()
        if watch.settled > settled_before and watch.layer.loaded:
            return True
        time.sleep(0.001)
    return False


def shown_region(layer: Any) -> tuple[int, tuple[int, int], np.ndarray]:
    """What the multiscale layer currently hands to the canvas.

    Returns
    -------
    level
        The pyramid level displayed (``layer.data_level``).
    origin
        ``(y, x)`` of the displayed block's top-left pixel, in that level's pixels.
    pixels
        The displayed block, ``(h, w, 3)`` (a numpy array, as given to vispy).
    """
    level = int(layer.data_level)
    y0, x0 = (int(v) for v in layer.corner_pixels[0, :2])
    return level, (y0, x0), np.asarray(layer._slice.image.raw)


def _has_hwm() -> bool:
    from napari_sigmma.bench.host import rss_mb

    return rss_mb("VmHWM") == rss_mb("VmHWM")  # not NaN


def _image_layer(added: Sequence[Any]) -> Any:
    from napari.layers import Image

    for layer in added:
        if isinstance(layer, Image):
            return layer
    raise RuntimeError("the slide reader added no image layer")


def walk_viewer(
    viewer: Any,
    layer: Any,
    events: Sequence[dict[str, Any]],
    *,
    timeout_s: float = 60.0,
    on_event: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Replay camera ``events`` (see :func:`~napari_sigmma.bench.scale.camera_walk`)
    and wait after each until the new view is drawn.

    Parameters
    ----------
    viewer, layer
        A shown viewer and its multiscale image layer.
    events
        Camera moves: ``{"center": (y, x) world, "zoom": screen px per world unit}``.
    timeout_s
        Longest wait for one view.
    on_event
        Called as ``on_event(i, record)`` after view ``i`` is drawn (e.g. to check pixels).

    Returns
    -------
    dict
        ``ms`` (time per event until drawn), ``levels`` (level shown per event),
        ``blocks`` (``(h, w)`` of the block handed to the canvas, the texture, per event),
        ``rss_mb`` (VmRSS after each event), ``timeouts``.
    """
    watch = DrawWatch(viewer, layer)
    cam = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    ms: list[float] = []
    levels: list[int] = []
    blocks: list[tuple[int, int]] = []
    rss: list[float] = []
    timeouts = 0
    try:
        for i, ev in enumerate(events):
            before = watch.settled
            t0 = time.perf_counter()
            cam.center = tuple(ev["center"])
            cam.zoom = float(ev["zoom"])
            # the camera change schedules a repaint; ask for one anyway (a move that
            # changes nothing on screen must still count as drawn)
            watch.canvas.update()
            if not wait_until_drawn(watch, before, timeout_s):
                timeouts += 1
            ms.append((time.perf_counter() - t0) * 1e3)
            levels.append(int(layer.data_level))
            blocks.append(tuple(int(n) for n in np.shape(layer._slice.image.raw)[:2]))
            rss.append(rss_mb())
            if on_event is not None:
                on_event(i, {"event": ev, "level": levels[-1], "ms": ms[-1]})
    finally:
        watch.close()
    return {"ms": ms, "levels": levels, "blocks": blocks, "rss_mb": rss, "timeouts": timeouts}


def view_slide_bench(
    path: str,
    *,
    n_events: int = 1000,
    seed: int = 0,
    window: tuple[int, int] = WINDOW_SIZE,
    timeout_s: float = 60.0,
    dask_cache_mb: float | None = None,
) -> dict[str, Any]:
    """Open ``path`` in a shown viewer through the plugin's reader and replay a camera walk.

    Run it in a fresh process: the RSS figures are the whole process's.

    ``dask_cache_mb`` overrides the size of napari's dask cache after opening (a diagnostic:
    0 turns it off, showing what the viewer holds without it); ``None`` keeps the bound the
    plugin's reader set (:data:`napari_sigmma.viewer.hooks.DASK_CACHE_MAX_BYTES`).

    Returns
    -------
    dict
        ``rss_start_mb`` (before napari), ``rss_viewer_mb`` (empty viewer shown),
        ``rss_after_open_mb`` (slide open, first view drawn), ``rss_end_mb``,
        ``rss_max_sampled_mb`` (largest VmRSS after an event), ``rss_trace_mb`` (VmRSS after
        each tenth of the walk), ``peak_rss_mb``
        (``VmHWM``), ``n_events``, ``timeouts``, ``median_ms`` / ``p95_ms`` / ``max_ms``
        per event until drawn, ``events_per_level`` (level → events that showed it),
        ``moves`` (kind → count), ``canvas_px``, ``slide_px``, ``levels``,
        ``dask_cache_mb`` (napari's opportunistic dask cache bound), ``largest_block_px``
        (largest block of pixels handed to the canvas) and ``open_seconds``.
    """
    import napari_sigmma.viewer  # noqa: F401  # blocks triton before the GL context exists

    rss_start = rss_mb()
    import napari
    from napari.utils import resize_dask_cache

    from napari_sigmma.bench.host import peak_rss_mb
    from napari_sigmma.bench.scale import camera_walk

    viewer = napari.Viewer(title="napari-sigmma scale bench", show=True)
    try:
        viewer.window.resize(*window)
        from qtpy.QtWidgets import QApplication

        for _ in range(20):
            QApplication.processEvents()
        rss_viewer = rss_mb()
        t0 = time.perf_counter()
        layer = _image_layer(viewer.open(path, plugin=PLUGIN))
        if dask_cache_mb is not None:
            from napari.utils import resize_dask_cache

            resize_dask_cache(int(dask_cache_mb * 2**20))
        watch = DrawWatch(viewer, layer)
        watch.canvas.update()
        wait_until_drawn(watch, 0, timeout_s)
        watch.close()
        open_s = time.perf_counter() - t0
        rss_open = rss_mb()
        canvas = tuple(int(v) for v in viewer.canvas.size[::-1])  # (width, height)
        shape = tuple(int(v) for v in layer.data[0].shape[:2])
        mpp = float(layer.scale[-1])
        events = camera_walk(shape, mpp, canvas, n_events, seed)
        walk = walk_viewer(viewer, layer, events, timeout_s=timeout_s)
        rss_end = rss_mb()
        per_level: dict[str, int] = {}
        for lvl in walk["levels"]:
            per_level[str(lvl)] = per_level.get(str(lvl), 0) + 1
        moves: dict[str, int] = {}
        for ev in events:
            moves[ev["kind"]] = moves.get(ev["kind"], 0) + 1
        ms = np.asarray(walk["ms"])
        return {
            "slide": str(path),
            "slide_px": list(shape),
            "levels": len(layer.data),
            "level_shapes": [list(map(int, a.shape[:2])) for a in layer.data],
            "lazy": type(layer.data[0]).__module__.split(".")[0],
            "canvas_px": list(canvas),
            "n_events": len(events),
            "moves": moves,
            "timeouts": walk["timeouts"],
            "events_per_level": dict(sorted(per_level.items(), key=lambda kv: int(kv[0]))),
            "median_ms": round(float(np.median(ms)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "max_ms": round(float(ms.max()), 1),
            "open_seconds": round(open_s, 2),
            "rss_start_mb": round(rss_start, 1),
            "rss_viewer_mb": round(rss_viewer, 1),
            "rss_after_open_mb": round(rss_open, 1),
            "rss_end_mb": round(rss_end, 1),
            "rss_max_sampled_mb": round(max(walk["rss_mb"]), 1),
            # VmRSS after every tenth of the walk: a plateau, not a climb
            "rss_trace_mb": [
                round(walk["rss_mb"][min(len(ms) - 1, k * len(ms) // 10)], 1) for k in range(1, 11)
            ],
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_source": "VmHWM" if _has_hwm() else "ru_maxrss",
            # napari's public call returns the cache as it is when it exists
            "dask_cache_mb": round(resize_dask_cache().cache.available_bytes / 2**20, 1),
            # the texture: one block per view, at most the canvas plus a chunk each side
            "largest_block_px": list(max(walk["blocks"], key=lambda b: b[0] * b[1])),
        }
    finally:
        viewer.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m napari_sigmma.bench.scale_qt SLIDE``: print the figures as JSON."""
    p = argparse.ArgumentParser(prog="python -m napari_sigmma.bench.scale_qt")
    p.add_argument("slide")
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, nargs=2, default=list(WINDOW_SIZE))
    p.add_argument("--dask-cache-mb", type=float, default=None, help="diagnostic override")
    args = p.parse_args(argv)
    res = view_slide_bench(
        args.slide,
        n_events=args.events,
        seed=args.seed,
        window=tuple(args.window),
        dask_cache_mb=args.dask_cache_mb,
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
