"""The Qt half of ``napari-sigmma bench --cancel``: cancel latency through the widgets.

See :mod:`napari_sigmma.bench.cancel` for what is measured. Each task runs in the
widget's own napari worker in a real viewer; the cancel is what the widget's Cancel button
(or the next refit / closing) does, issued after the task's first progress step; the
latency is the time until the worker's thread has ended (its ``done`` flag, set in the
worker thread as it finishes, and Qt's thread pool back to its count before the task).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _spin_until(cond: Callable[[], bool], timeout: float) -> bool:
    """Process Qt events until ``cond()`` (polled every millisecond) or the timeout."""
    from qtpy.QtCore import QCoreApplication

    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        QCoreApplication.processEvents()
        time.sleep(0.001)
    return True


def _pool_count() -> int:
    from qtpy.QtCore import QThreadPool

    return QThreadPool.globalInstance().activeThreadCount()


def _time_widget_cancel(
    start: Callable[[], None],
    ready: Callable[[], bool],
    cancel: Callable[[], None],
    busy: Callable[[], bool],
    *,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """``start()`` the task, wait until ``ready()`` (first chunk done), ``cancel()``, and
    time until ``busy()`` is false and the thread pool is back to its count before."""
    base = _pool_count()
    start()
    if not _spin_until(lambda: ready() or not busy(), timeout) or not ready():
        return {"latency_s": float("nan"), "outcome": "ended or stuck before its first chunk",
                "thread_gone": not busy()}  # fmt: skip
    t0 = time.perf_counter()
    cancel()
    gone = _spin_until(lambda: not busy() and _pool_count() <= base, timeout)
    return {
        "latency_s": time.perf_counter() - t0,
        "outcome": "cancelled",
        "thread_gone": gone,
    }


def measure_cancel_qt(ckpt: Path, sample: Path, work: Path) -> dict[str, dict[str, Any]]:
    """Cancel latency of each widget task in one shown-less viewer (see the module doc)."""
    import napari

    from napari_sigmma.io import load_any
    from napari_sigmma.live.run import load_live_run
    from napari_sigmma.tiles.paired import PairedSlide
    from napari_sigmma.viewer.controller import LiveController
    from napari_sigmma.viewer.dock import SigmmaDock
    from napari_sigmma.viewer.hooks import layers_for
    from napari_sigmma.viewer.retrieval import RetrievalWidget
    from napari_sigmma.viewer.training import TrainingWidget

    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Any]] = {}
    viewer = napari.Viewer(show=False)
    try:
        for data, kwargs, kind in layers_for(sample):
            getattr(viewer, f"add_{kind}")(data, **kwargs)
        he = next(ly for ly in viewer.layers if ly.metadata.get("element") == "he_image")
        dock = SigmmaDock(viewer)
        viewer.window.add_dock_widget(dock, name="SIGMMA")
        steps: list[tuple] = []
        dock.progressed.connect(lambda *item: steps.append(item))

        def dock_task(start: Callable[[], Any]) -> dict[str, Any]:
            steps.clear()
            return _time_widget_cancel(
                start, lambda: bool(steps), lambda: dock.cancel(), lambda: dock.busy
            )

        out["load data"] = dock_task(lambda: dock.open_data(str(sample)))
        out["load model"] = dock_task(lambda: dock.set_checkpoint(str(ckpt)))

        run = load_live_run(ckpt)
        paired = PairedSlide.from_sdata(load_any(sample), name="embedded")
        engine = run.engine(paired, device="cpu", cache_dir=work / "cache", batch_size=4)
        retrieval = RetrievalWidget(viewer)
        viewer.window.add_dock_widget(retrieval, name="SIGMMA retrieval")
        retrieval.set_engine(engine, he, slide_name="embedded")
        batches: list[tuple] = []
        retrieval.progressed.connect(lambda *item: batches.append(item))

        def retrieval_task(start: Callable[[], Any]) -> dict[str, Any]:
            batches.clear()
            return _time_widget_cancel(
                start,
                lambda: any(b[1] > 0 for b in batches),
                retrieval.cancel,
                lambda: retrieval.busy,
            )

        out["embed"] = retrieval_task(lambda: retrieval.add_reference(str(sample)))
        out["retrieve"] = retrieval_task(lambda: retrieval.encode_all())
        retrieval.close_workers()

        # cluster refits of the live controller, on what the whole-slide encode left
        for _ in engine.encode(list(engine.grid.tile_ids)):
            pass
        ctrl = LiveController(viewer, he, engine, max_visible=0, k=8)
        _spin_until(lambda: not ctrl.busy, 600)
        ctrl.cluster_cells_cap = 10**9  # every encoded cell
        out["cluster"] = _time_widget_cancel(
            lambda: ctrl.set_k(12),
            lambda: time.sleep(0.05) or True,  # let the refit get under way
            ctrl.cancel,
            lambda: ctrl.busy,
        )
        ctrl.close()

        training = TrainingWidget(viewer)
        viewer.window.add_dock_widget(training, name="SIGMMA training")
        training.data.setText(str(sample))
        training.backbone.setCurrentText("efficientnet_lite0")
        training.fast.setChecked(True)
        training.epochs.setValue(3)
        training.batch.setValue(8)
        training.device.setCurrentText("cpu")
        training.out.setText(str(work / "train-run"))
        stepped = threading.Event()
        training._bridge.step.connect(lambda *a: stepped.set())
        t_end: dict[str, float] = {}

        def start_training() -> None:
            from qtpy.QtCore import Qt

            training.start()
            # the worker thread's end itself (the widget learns it a few redraws later)
            training._worker.finished.connect(
                lambda: t_end.setdefault("t", time.perf_counter()),
                Qt.ConnectionType.DirectConnection,
            )

        t_cancel: dict[str, float] = {}

        def cancel_training() -> None:
            t_cancel["t"] = time.perf_counter()
            training.cancel(wait=False)

        out["train"] = _time_widget_cancel(
            start_training, stepped.is_set, cancel_training, lambda: training.running
        )
        out["train"]["result"] = training.status.text()
        if "t" in t_end and "t" in t_cancel:
            # the worker thread's own end; the latency above also includes the widget's
            # queued step redraws (its loss plot) before it shows the run as stopped
            out["train"]["thread_end_s"] = t_end["t"] - t_cancel["t"]
    finally:
        viewer.close()
    return out
