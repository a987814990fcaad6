"""The Qt half of ``napari-sigmma bench``: the live pipeline in a real, shown viewer.

See :mod:`napari_sigmma.bench.live` for what is measured and how it is reported.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def _run_loop_until(cond: Any, signal: Any, timeout_s: float) -> bool:
    """Run a Qt event loop until ``cond()`` holds (checked on ``signal`` and every 50 ms)."""
    from qtpy.QtCore import QEventLoop, QTimer

    if cond():
        return True
    loop = QEventLoop()

    def check(*_: Any) -> None:
        if cond():
            loop.quit()

    signal.connect(check)
    tick = QTimer()
    tick.setInterval(50)
    tick.timeout.connect(check)
    tick.start()
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    loop.exec()
    tick.stop()
    signal.disconnect(check)
    return bool(cond())


def _settle(seconds: float) -> None:
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()


def _scene_canvas(viewer: Any) -> Any:
    """The vispy SceneCanvas behind the viewer (napari private API; ``None`` if moved)."""
    qt_viewer = getattr(viewer.window, "_qt_viewer", None)
    return getattr(getattr(qt_viewer, "canvas", None), "_scene_canvas", None)


def _native_canvas(viewer: Any) -> Any:
    return getattr(_scene_canvas(viewer), "native", None)


def _explain_gaps(
    stamps: list[float], spans: list[tuple[str, float, float]], *, top: int = 5
) -> list[dict[str, Any]]:
    """For the ``top`` longest gaps between probe ticks: how much of each was the plugin's
    main-thread work and how much was painting (the rest: napari/Qt, or the OS)."""
    if len(stamps) < 2:
        return []
    t = np.asarray(stamps)
    gaps = np.diff(t)
    out = []
    for i in np.argsort(-gaps)[:top]:
        a, b = t[i], t[i + 1]
        parts: dict[str, float] = {}
        for what, s0, s1 in spans:
            overlap = min(b, s1) - max(a, s0)
            if overlap > 0:
                key = "paint" if what == "paint" else "plugin"
                parts[key] = parts.get(key, 0.0) + overlap * 1000
        gap = float(gaps[i] * 1000)
        row = {"gap_ms": gap, "plugin_ms": parts.get("plugin", 0.0)}
        row["paint_ms"] = parts.get("paint", 0.0)
        row["other_ms"] = max(0.0, gap - row["plugin_ms"] - row["paint_ms"])
        out.append(row)
    return out


def _idle_repaints(viewer: Any, n: int) -> list[float]:
    """Milliseconds of ``n`` repaints of the canvas with nothing else to do."""
    from qtpy.QtWidgets import QApplication

    native = _native_canvas(viewer)
    out: list[float] = []
    for _ in range(n if native is not None else 0):
        _settle(0.1)
        native.update()
        start = time.perf_counter()
        QApplication.processEvents()
        out.append((time.perf_counter() - start) * 1000)
    return out


def _thread_cpu() -> dict[str, float]:
    """CPU seconds used so far by this process's threads, summed by thread name (Linux;
    empty elsewhere): e.g. the GUI thread, the worker, torch's OpenMP threads, llvmpipe's
    rasterisers."""
    import os

    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    main = os.getpid()
    try:
        tids = os.listdir(f"/proc/{main}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{main}/task/{tid}/comm") as fh:
                name = fh.read().strip()
            with open(f"/proc/{main}/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        if int(tid) == main:
            name = "GUI (main) thread"
        elif name.startswith("llvmpipe"):
            name = "llvmpipe (software GL)"
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        out[name] = out.get(name, 0.0) + cpu
    return out


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    keys = set(before) | set(after)
    d = {k: round(after.get(k, 0.0) - before.get(k, 0.0), 2) for k in keys}
    return dict(sorted(((k, v) for k, v in d.items() if v > 0), key=lambda kv: -kv[1]))


def _zoom_stall(viewer: Any, cam: Any, zoom: float, n: int, probe_ms: int) -> dict[str, float]:
    """Event-loop stall while the camera zooms in and out ``n`` times around ``zoom``.

    Zooming in from ``zoom`` only shows part of what was visible, so with the plugin the
    overlays drawn are all cached (no encoding): the gaps are what browsing costs — napari
    slicing and painting, and the plugin's drawing of cached tiles.
    """
    probe = _Probe(probe_ms)
    for k in range(n):
        cam.zoom = zoom * (1.35 if k % 2 == 0 else 1.0)
        _settle(0.25)
    gaps = probe.stop()
    return {"max_ms": float(gaps.max()), "p99_ms": float(np.percentile(gaps, 99)), "moves": n}


class _Probe:
    """A ``QTimer`` ticking every ``probe_ms`` while the event loop is free; the gaps
    between its ticks are the GUI thread's stalls. Started and settled on creation."""

    def __init__(self, probe_ms: int) -> None:
        from qtpy.QtCore import QTimer

        self.stamps: list[float] = []
        self._timer = QTimer()
        self._timer.setInterval(int(probe_ms))
        self._timer.timeout.connect(lambda: self.stamps.append(time.perf_counter()))
        self._timer.start()
        _settle(0.2)
        self.stamps.clear()

    def stop(self) -> np.ndarray:
        """Stop; the gaps between ticks in ms (one zero when there were fewer than two)."""
        self._timer.stop()
        t = np.asarray(self.stamps)
        return np.diff(t) * 1000 if t.size > 1 else np.zeros(1)


class _PaintTimer:
    """Times every vispy draw of the viewer's canvas (first to last draw handler)."""

    def __init__(self, viewer: Any) -> None:
        canvas = _scene_canvas(viewer)
        self.ms: list[float] = []
        self.spans: list[tuple[str, float, float]] = []
        self._t0 = 0.0
        self._events = canvas.events.draw if canvas is not None else None
        if self._events is not None:
            self._events.connect(self._start, position="first")
            self._events.connect(self._stop, position="last")

    def _start(self, _event: Any) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, _event: Any) -> None:
        t1 = time.perf_counter()
        self.ms.append((t1 - self._t0) * 1000)
        self.spans.append(("paint", self._t0, t1))

    def close(self) -> None:
        if self._events is not None:
            self._events.disconnect(self._start)
            self._events.disconnect(self._stop)


def measure_live(
    engine: Any,
    sdata: Any,
    sdata_path: str,
    gene_head: Any,
    *,
    view_tiles: float = 4.0,
    probe_ms: int = 5,
    revisits: int = 7,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Encode one view of the slide through the live controller and time it.

    One long function on purpose: it is one scripted viewer session (warm-up, encode,
    revisits, browsing) whose steps share the viewer, camera and controller, and whose
    timings depend on running them in exactly this order.

    Returns
    -------
    dict
        ``indices`` (grid indices encoded), ``pipeline_tiles_per_s``, ``stall_max_ms``,
        ``stall_p99_ms``, ``probe_interval_ms``, ``revisit_ms`` (median) and
        ``revisit_ms_all``.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sigmma.viewer.controller import LiveController
    from napari_sigmma.viewer.layers import he_image_layer

    grid, paired = engine.grid, engine.paired
    viewer = napari.Viewer(title="napari-sigmma bench", show=True)
    try:
        viewer.window.resize(1400, 1000)
        cam = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
        data, kwargs, _ = he_image_layer(sdata, sdata_path=sdata_path)
        layer = viewer.add_image(data, **kwargs)
        _settle(1.0)
        he_only = _idle_repaints(viewer, revisits)
        # the view: ``view_tiles`` tiles wide around the middle of the tissue tiles
        mpp = paired.he_mpp
        s = grid.tile_size * mpp
        cy = (grid.origin[1] + (np.median(grid.rows) + 0.5) * grid.tile_size) * mpp
        cx = (grid.origin[0] + (np.median(grid.cols) + 0.5) * grid.tile_size) * mpp
        zoom = max(viewer.canvas.size) / (view_tiles * s)
        # the floor: the same view browsed in napari with the H&E alone (no plugin)
        cam.center = (cy, cx)
        cam.zoom = zoom
        _settle(0.5)
        napari_alone = _zoom_stall(viewer, cam, zoom, 2 * revisits, probe_ms)
        # warm-up: one far tile through the same controller, so the layers exist and their
        # shaders are compiled (a one-off cost of the first draw, seconds with software GL)
        far = int(np.argmax(np.hypot(grid.rows - np.median(grid.rows),
                                     grid.cols - np.median(grid.cols))))  # fmt: skip
        fy = (grid.origin[1] + (grid.rows[far] + 0.5) * grid.tile_size) * mpp
        fx = (grid.origin[0] + (grid.cols[far] + 0.5) * grid.tile_size) * mpp
        cam.center = (fy, fx)
        cam.zoom = max(viewer.canvas.size) / (0.8 * s)
        ctl = LiveController(viewer, layer, engine, gene_head=gene_head, max_visible=10_000)
        warm = set(ctl.visible)
        if not _run_loop_until(
            lambda: ctl.overlays.shown_tiles() >= warm and not ctl.busy, ctl.shown, timeout_s
        ):
            raise RuntimeError("the warm-up tile was not shown")
        _settle(0.5)
        n_before = engine.stats.encoded_tiles
        prep0, fwd0 = engine.stats.prepare_seconds, engine.stats.forward_seconds
        fit0, fits0 = ctl.fit_seconds, ctl.fits
        ctl.handler_ms.clear()  # the warm-up's first draw compiles shaders: not measured
        ctl.overlays.apply_ms.clear()
        paints = _PaintTimer(viewer)

        probe = _Probe(probe_ms)
        cpu0 = _thread_cpu()
        t0 = time.perf_counter()
        cam.center = (cy, cx)
        cam.zoom = zoom
        want = set(ctl.visible)
        done = _run_loop_until(
            lambda: (
                ctl.overlays.shown_tiles() >= want and not ctl.busy and not ctl._timer.isActive()
            ),
            ctl.shown,
            timeout_s,
        )
        QApplication.processEvents()  # the last batch painted
        t1 = time.perf_counter()
        cpu_pipeline = _cpu_delta(cpu0, _thread_cpu())
        fit_s, n_fits = ctl.fit_seconds - fit0, ctl.fits - fits0
        gaps = probe.stop()
        if not done:
            raise RuntimeError(f"the live pipeline did not finish within {timeout_s:.0f} s")
        n_encoded = engine.stats.encoded_tiles - n_before
        prep_s = float(engine.stats.prepare_seconds - prep0)
        fwd_s = float(engine.stats.forward_seconds - fwd0)
        paint_ms = list(paints.ms)
        paints.ms.clear()
        handlers = list(ctl.handler_ms)
        longest = _explain_gaps(probe.stamps, [*ctl.spans, *paints.spans], top=5)
        indices = [engine.index_of(t) for t in ctl.visible if t not in warm]

        # revisit: off the slide (nothing visible), then back to the encoded view
        times = []
        for _ in range(revisits):
            cam.center = (cy, -10 * view_tiles * s)
            _settle(0.3)
            start = time.perf_counter()
            cam.center = (cy, cx)
            QApplication.processEvents()
            while ctl.overlays.pending:  # updates left for the next turns
                QApplication.processEvents()
            times.append((time.perf_counter() - start) * 1000)
            if ctl.overlays.shown_tiles() != want:
                raise RuntimeError("a revisit did not show the cached region at once")
            _settle(0.2)
        # browsing the encoded view with the plugin: every overlay drawn comes from the cache
        cam.center = (cy, cx)
        cam.zoom = zoom
        _settle(0.5)
        with_overlays = _zoom_stall(viewer, cam, zoom, 2 * revisits, probe_ms)
        # what one frame costs to paint here, with nothing else to do (the floor of any
        # stall measured above: with software OpenGL it is most of it)
        idle = _idle_repaints(viewer, revisits)
        paints.close()
        ctl.close()
    finally:
        viewer.close()
    return {
        "indices": indices,
        "pipeline_tiles_per_s": n_encoded / (t1 - t0),
        "encoded": n_encoded,
        "pipeline_seconds": t1 - t0,
        "stall_max_ms": float(gaps.max()),
        "stall_p99_ms": float(np.percentile(gaps, 99)),
        "probe_interval_ms": float(probe_ms),
        "revisit_ms": float(np.median(times)),
        "revisit_ms_all": [float(t) for t in times],
        "handler_ms": sorted(handlers, key=lambda h: -h[1])[:10],
        "handler_max_ms": max((h[1] for h in handlers), default=0.0),
        "layer_updates_ms": sorted(ctl.overlays.apply_ms, key=lambda h: -h[1])[:10]
        if ctl.overlays is not None
        else [],
        "paint_max_ms": max(paint_ms, default=0.0),
        "paint_median_ms": float(np.median(paint_ms)) if paint_ms else 0.0,
        "paints": len(paint_ms),
        "idle_repaint_ms": float(np.median(idle)) if idle else float("nan"),
        "idle_repaint_he_only_ms": float(np.median(he_only)) if he_only else float("nan"),
        "prepare_seconds": prep_s,
        "forward_seconds": fwd_s,
        "gaps_top_ms": sorted((float(g) for g in gaps), reverse=True)[:10],
        "browse_stall_napari_alone": napari_alone,
        "cpu_seconds_by_thread": cpu_pipeline,
        "cluster_fit_seconds": fit_s,
        "cluster_fits": n_fits,
        "browse_stall_cached_overlays": with_overlays,
        "gaps_explained": longest,
    }
