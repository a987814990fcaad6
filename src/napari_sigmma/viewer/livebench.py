"""The Qt half of ``napari-sigmma bench``: the live pipeline in a real, shown viewer.

See :mod:`napari_sigmma.analysis.bench` for what is measured and how it is reported.
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

    Returns
    -------
    dict
        ``indices`` (grid indices encoded), ``pipeline_tiles_per_s``, ``stall_max_ms``,
        ``stall_p99_ms``, ``probe_interval_ms``, ``revisit_ms`` (median) and
        ``revisit_ms_all``.
    """
    import napari
    from qtpy.QtCore import QTimer
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
        # the view: ``view_tiles`` tiles wide around the middle of the tissue tiles
        mpp = paired.he_mpp
        s = grid.tile_size * mpp
        cy = (grid.origin[1] + (np.median(grid.rows) + 0.5) * grid.tile_size) * mpp
        cx = (grid.origin[0] + (np.median(grid.cols) + 0.5) * grid.tile_size) * mpp
        zoom = max(viewer.canvas.size) / (view_tiles * s)
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

        stamps: list[float] = []
        probe = QTimer()
        probe.setInterval(int(probe_ms))
        probe.timeout.connect(lambda: stamps.append(time.perf_counter()))
        probe.start()
        _settle(0.2)
        stamps.clear()
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
        probe.stop()
        if not done:
            raise RuntimeError(f"the live pipeline did not finish within {timeout_s:.0f} s")
        n_encoded = engine.stats.encoded_tiles - n_before
        handlers = list(ctl.handler_ms)
        gaps = np.diff(np.asarray(stamps)) * 1000 if len(stamps) > 1 else np.zeros(1)
        indices = [engine.index_of(t) for t in ctl.visible if t not in warm]

        # revisit: off the slide (nothing visible), then back to the encoded view
        times = []
        for _ in range(revisits):
            cam.center = (cy, -10 * view_tiles * s)
            _settle(0.3)
            start = time.perf_counter()
            cam.center = (cy, cx)
            QApplication.processEvents()
            times.append((time.perf_counter() - start) * 1000)
            if ctl.overlays.shown_tiles() != want:
                raise RuntimeError("a revisit did not show the cached region at once")
            _settle(0.2)
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
        "gaps_top_ms": sorted((float(g) for g in gaps), reverse=True)[:10],
    }
