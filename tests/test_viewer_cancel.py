"""Cancel of every long task, and a malicious checkpoint through the main dock (issue 8).

Each task starts on real data (the embedded sample; a tiny SIGMMA model trained once for
this module through the real trainer), is cancelled mid-way, and must end early: fewer
chunks done than there were, nothing half-written or added, no thread left (Python threads
and Qt's thread pool back to their baseline), no child process left (the dask cluster of
``napari-sigmma embed`` over a folder), and the viewer still usable. Training cancel is
covered in test_viewer_training.py / test_train_trainer.py. The README's cancel target
(≤ 1 s from cancel to the task's thread gone) is asserted for embed, retrieve and train
with the bench's own measure (``bench.cancel.time_cancel``); ``napari-sigmma bench --cancel``
prints the full table (widgets and the dask cluster included).

The malicious checkpoint is a pickle whose ``__reduce__`` would create a marker file; it is
handed to the dock's ``set_checkpoint`` (what "Load checkpoint…" calls) in a real viewer with
the sample's layers: the dock's status and an error notification name the file, the marker
never appears, the layers stay, and a valid checkpoint loads afterwards.
"""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

pytest.importorskip("napari")

from _train_data import tiny_cfg
from napari_sigmma.errors import Cancelled


@pytest.fixture(scope="module")
def trained(embedded_bundle, tmp_path_factory):
    from napari_sigmma.train.loop import train

    root = tmp_path_factory.mktemp("cancel-run")
    cfg = tiny_cfg(
        embedded_bundle, root / "run", root / "features", epochs=1, batch_size=8,
        grad_accum=1, split_fractions=(1.0, 0.0, 0.0),
    )  # fmt: skip
    result = train(cfg)
    assert result.status == "completed"
    ckpt = root / "run" / "checkpoints" / "last.pt"
    assert ckpt.is_file()
    return SimpleNamespace(root=root, run=root / "run", ckpt=ckpt, path=str(embedded_bundle))


def _engine(trained, tmp_path, batch_size: int = 2):
    """A fresh engine (empty disk cache) on the embedded sample."""
    from napari_sigmma.io import load_any
    from napari_sigmma.live.run import load_live_run
    from napari_sigmma.tiles.paired import PairedSlide

    run = load_live_run(trained.ckpt)
    sdata = load_any(trained.path)
    paired = PairedSlide.from_sdata(sdata, name="embedded")
    engine = run.engine(paired, device="cpu", cache_dir=tmp_path / "cache", batch_size=batch_size)
    return engine, sdata


def _threads() -> set[int]:
    """Python threads, without Qt's pool threads (Python registers a foreign thread that ran
    Python code as a never-removed ``_DummyThread``; Qt's pool is counted separately)."""
    return {
        t.ident
        for t in threading.enumerate()
        if t.is_alive() and not isinstance(t, threading._DummyThread)
    }


def _task_children() -> set[int]:
    """Child processes of this one, without multiprocessing's own helpers (its resource
    tracker / fork server live as long as the interpreter once started)."""
    out = set()
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if "resource_tracker" in cmd or "forkserver" in cmd:
            continue
        out.add(child.pid)
    return out


def _pool_threads() -> int:
    from qtpy.QtCore import QThreadPool

    return QThreadPool.globalInstance().activeThreadCount()


def _wait_clean(qtbot, base_threads: set[int], base_pool: int, timeout: int = 30_000) -> None:
    """Wait until the worker threads have ended (and returned to Qt's pool)."""
    qtbot.waitUntil(lambda: _pool_threads() <= base_pool, timeout=timeout)
    try:
        qtbot.waitUntil(lambda: _threads() <= base_threads, timeout=timeout)
    except Exception:
        extra = [t.name for t in threading.enumerate() if t.ident not in base_threads]
        raise AssertionError(f"threads left: {extra}") from None


def _viewer_with_he(make_napari_viewer, sdata, path):
    from napari_sigmma.viewer.layers import cells_layer, he_image_layer

    viewer = make_napari_viewer()
    data, kwargs, _ = he_image_layer(sdata, sdata_path=path)
    layer = viewer.add_image(data, **kwargs)
    pdata, pkw, _ = cells_layer(sdata, sdata_path=path)
    viewer.add_points(pdata, **pkw)
    return viewer, layer


def _still_works(viewer) -> None:
    """The viewer responds: a layer can be added, selected and removed, and it redraws."""
    probe = viewer.add_points(np.array([[1.0, 2.0]]), name="probe-after-cancel")
    viewer.layers.selection.active = probe
    assert viewer.layers[-1] is probe
    viewer.layers.remove(probe)
    assert "probe-after-cancel" not in viewer.layers
    viewer.window._qt_viewer.canvas.native.update()


# -- analysis: no Qt --------------------------------------------------------------------------
def _structured_results(n_tiles: int = 60, d: int = 16, seed: int = 0):
    from napari_sigmma.embed.result import TileResult

    rng = np.random.default_rng(seed)
    out = []
    for t in range(n_tiles):
        n = 30
        nodes = {s: rng.normal(size=(n, d)).astype(np.float32) for s in ("micro", "meso", "macro")}
        crops = rng.normal(size=(21, d)).astype(np.float32)
        out.append(
            TileResult(
                tile_id=f"r0_c{t}", index=t,
                he={"micro": crops[0], "meso": crops[16], "macro": crops[20]}, he_crops=crops,
                st=None, nodes=nodes, cell_index=np.arange(t * n, (t + 1) * n),
                cell_micro=rng.integers(0, 16, n), edges={},
            )
        )  # fmt: skip
    return out


def test_fit_clusters_cancels_between_fits() -> None:
    from napari_sigmma.analysis.clusters import fit_clusters

    results = _structured_results()
    checks = {"n": 0}

    def count() -> bool:
        checks["n"] += 1
        return False

    full = fit_clusters(results, 4, cancel=count)
    n_full = checks["n"]
    assert len(full.centroids) == 6 and n_full == 7  # one check per fit + the renumbering

    checks["n"] = 0

    def stop_after_two() -> bool:
        checks["n"] += 1
        return checks["n"] > 2

    with pytest.raises(Cancelled):
        fit_clusters(results, 4, cancel=stop_after_two)
    assert checks["n"] == 3 < n_full  # stopped before the third of six fits


def test_load_any_cancel(embedded_bundle) -> None:
    from napari_sigmma.io import load_any

    calls = {"n": 0}

    def second_check() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2  # set while the reader runs

    with pytest.raises(Cancelled):
        load_any(embedded_bundle, cancel=second_check)
    assert calls["n"] == 2
    with pytest.raises(Cancelled):
        load_any(embedded_bundle, cancel=lambda: True)


def test_embed_tiles_cancel_in_a_thread(trained, tmp_path) -> None:
    from napari_sigmma.embed.memory import embed_tiles

    engine, _ = _engine(trained, tmp_path)
    base = _threads()
    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        cancel.set()  # cancel after the first batch

    out: dict = {}
    th = threading.Thread(
        target=lambda: out.update(
            emb=embed_tiles(
                engine.model, engine.paired, engine.grid, featurizer=engine.featurizer,
                settings=engine.graph_settings, batch_size=2, device="cpu", cancel=cancel,
                progress=progress,
            )
        )
    )  # fmt: skip
    th.start()
    th.join(120)
    assert not th.is_alive()
    emb = out["emb"]
    assert not emb.complete and len(emb.indices) == 2 < len(engine.grid)
    assert seen == [2]
    # the same measure as the baseline (and _wait_clean): _DummyThreads are never removed
    new = _threads() - base
    left = [t.name for t in threading.enumerate() if t.ident in new]
    assert not left, left


def test_cancel_latency_meets_the_readme_target(trained, tmp_path) -> None:
    """Cancel → thread gone within ``TARGET_S`` (1 s) for each API task the widgets run, on
    the embedded sample with a real trained model; each task cancelled mid-way."""
    from napari_sigmma.bench.cancel import TARGET_S, time_cancel
    from napari_sigmma.embed.memory import embed_tiles
    from napari_sigmma.io import load_any
    from napari_sigmma.train.loop import train

    engine, _ = _engine(trained, tmp_path, batch_size=2)
    n = len(engine.grid)

    def load(cancel, started):
        def check() -> bool:
            started.set()
            return cancel.is_set()

        return load_any(trained.path, cancel=check)

    def embed(cancel, started):
        emb = embed_tiles(
            engine.model, engine.paired, engine.grid, featurizer=engine.featurizer,
            settings=engine.graph_settings, batch_size=2, device="cpu", cancel=cancel,
            progress=lambda done, total: started.set(),
        )  # fmt: skip
        return len(emb.indices)

    def retrieve(cancel, started):
        done = 0
        for batch in engine.encode(list(engine.grid.tile_ids), cancel):
            done += len(batch)
            started.set()
        return done

    def train_task(cancel, started):
        class OnStep:
            def on_step(self, *a) -> None:
                started.set()

        cfg = tiny_cfg(trained.path, tmp_path / "run", tmp_path / "features", epochs=3,
                       batch_size=8, grad_accum=1, split_fractions=(1.0, 0.0, 0.0))  # fmt: skip
        return train(cfg, callbacks=[OnStep()], cancel=cancel).status

    report = {}
    for name, task in (("load", load), ("embed", embed), ("retrieve", retrieve),
                       ("train", train_task)):  # fmt: skip
        r = time_cancel(task, timeout=300)
        report[name] = r
        print(f"{name}: {r['latency_s'] * 1000:.0f} ms ({r['outcome']}, {r['result']})")
        assert r["thread_gone"] and not r["outcome"].startswith("error"), (name, r)
    assert report["embed"]["result"] < n and report["retrieve"]["result"] < n  # mid-way
    assert report["train"]["result"] == "cancelled"
    # the load is one reader call (spatialdata-io's) that cannot be interrupted: its cancel
    # lands when that call returns, so its latency is the read's remaining time (≈ 0.2–0.6 s
    # on the embedded sample here) and is reported by the bench, not held to the target
    assert report["load"]["outcome"] == "cancelled"
    slow = {
        k: round(v["latency_s"], 3)
        for k, v in report.items()
        if k != "load" and v["latency_s"] > TARGET_S
    }
    assert not slow, f"cancel slower than the README's {TARGET_S} s target: {slow}"


def test_embed_folder_on_dask_cancels_and_leaves_no_process(trained, tmp_path) -> None:
    """``napari-sigmma embed`` over a folder: one dask task per slide on a local process
    cluster; cancelled while the workers run, the cluster is shut down and nothing is kept."""
    from napari_sigmma.embed.folder import embed_folder

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / name).symlink_to(trained.path, target_is_directory=True)
    parts = tmp_path / "parts"
    parts.mkdir()
    base_children = _task_children()
    seen_workers: list[int] = []

    def runs_the_task(pid: int) -> bool:
        # torch is imported inside the slide task only: a worker that has it mapped is
        # embedding (a state of the task, not a fixed wait)
        try:
            return any("libtorch" in m.path for m in psutil.Process(pid).memory_maps())
        except psutil.Error:
            return False

    def cancel() -> bool:
        kids = _task_children() - base_children
        seen_workers.append(len(kids))
        return any(runs_the_task(k) for k in kids)

    with pytest.raises(Cancelled):
        embed_folder(trained.ckpt, sorted(folder.iterdir()), parts, device="cpu", cancel=cancel)
    assert max(seen_workers) >= 2  # the workers ran
    assert not any(parts.glob("*.zarr/zmetadata"))  # neither slide finished
    deadline = time.monotonic() + 30
    while _task_children() - base_children and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (_task_children() - base_children)


# -- viewer --------------------------------------------------------------------------------------
def test_dock_open_data_cancel(make_napari_viewer, qtbot, embedded_bundle) -> None:
    from napari_sigmma.viewer.dock import SigmmaDock
    from napari_sigmma.viewer.hooks import layers_for

    layers_for(embedded_bundle)  # zarr starts its process-wide I/O threads on first use
    viewer = make_napari_viewer()
    dock = SigmmaDock(viewer)
    viewer.window.add_dock_widget(dock)
    base_threads, base_pool = _threads(), _pool_threads()
    progress: list[tuple[str, int, int]] = []

    def on_progress(*item) -> None:
        progress.append(item)
        if len(progress) == 1:
            dock.cancel_button.click()  # what the user does: Cancel while reading

    dock.progressed.connect(on_progress)
    dock.open_data(str(embedded_bundle))
    assert dock.cancel_button.isEnabled() and not dock.progress.isHidden()
    qtbot.waitUntil(lambda: not dock.busy, timeout=60_000)
    _wait_clean(qtbot, base_threads, base_pool)
    assert progress and progress[-1][1] == 0  # the read never completed
    assert len(viewer.layers) == 0  # nothing added
    assert dock.task_status.text() == "Cancelled."
    assert not dock.cancel_button.isEnabled()
    _still_works(viewer)
    # the same load without cancel adds the layers
    dock.open_data(str(embedded_bundle))
    qtbot.waitUntil(lambda: not dock.busy, timeout=120_000)
    dock.progressed.disconnect(on_progress)
    qtbot.waitUntil(lambda: len(viewer.layers) >= 2, timeout=5_000)
    assert any(ly.metadata.get("element") == "he_image" for ly in viewer.layers)


def test_reference_embedding_and_whole_slide_encoding_cancel(
    make_napari_viewer, qtbot, trained, tmp_path
) -> None:
    from napari_sigmma.viewer.retrieval import RetrievalWidget

    engine, sdata = _engine(trained, tmp_path)
    viewer, layer = _viewer_with_he(make_napari_viewer, sdata, trained.path)
    widget = RetrievalWidget(viewer)
    widget.set_engine(engine, layer, slide_name="embedded")
    n_tiles = len(engine.grid)
    base_threads, base_pool = _threads(), _pool_threads()

    # reference slide: encoded batch by batch in a worker; Cancel after the first batch
    seen: list[tuple[str, int, int]] = []

    def on_ref(*item) -> None:
        seen.append(item)
        if item[1] > 0 and widget.cancel_button.isEnabled():
            widget.cancel_button.click()

    widget.progressed.connect(on_ref)
    widget.add_reference(trained.path)
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    _wait_clean(qtbot, base_threads, base_pool)
    done = max(item[1] for item in seen)
    assert 0 < done < n_tiles
    assert set(widget.store.slides) == {"embedded"}  # nothing half-indexed
    assert widget.status.text() == "Cancelled."

    # whole-slide encoding (the retrieval index): Cancel after the first batch
    widget.progressed.disconnect(on_ref)
    encoded: list[int] = []

    def on_batch(*item) -> None:
        encoded.append(item[1])
        widget.cancel()

    widget.progressed.connect(on_batch)
    widget.encode_all()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    _wait_clean(qtbot, base_threads, base_pool)
    assert encoded and max(encoded) < n_tiles
    assert len(widget.store.slide("embedded")) < n_tiles
    # the widget still queries what was encoded
    tile = int(next(iter(widget.store.slide("embedded").he["macro"])))
    assert widget.query_tile(tile)
    _still_works(viewer)
    widget.close_workers()


def test_cluster_refit_cancel_and_close_mid_task(make_napari_viewer, qtbot, trained, tmp_path):
    """A refit for a new k is cancelled by the next k (and by closing the viewer) between
    its six fits; closing the window mid-refit leaves no thread."""
    from napari_sigmma.viewer.controller import LiveController

    engine, sdata = _engine(trained, tmp_path)
    for _ in engine.encode(engine.grid.tile_ids[:8]):  # the memory cache the refits cluster
        pass
    viewer, layer = _viewer_with_he(make_napari_viewer, sdata, trained.path)
    # max_visible=0: the camera never starts an encode, only refits run
    ctrl = LiveController(viewer, layer, engine, max_visible=0, k=8)
    qtbot.waitUntil(lambda: not ctrl.busy, timeout=60_000)
    base_threads, base_pool = _threads(), _pool_threads()
    started: list[int] = []  # thread of each fit started
    finished: dict[int, int] = {}  # fits finished per thread
    release = threading.Event()

    import napari_sigmma.analysis.clusters as clusters

    orig = clusters._fit_one

    def held_fit(*a, **k):
        """The real fit, held at its start until ``release`` (so a cancel lands mid-task)."""
        me = threading.get_ident()
        started.append(me)
        release.wait(10)
        out = orig(*a, **k)
        finished[me] = finished.get(me, 0) + 1
        return out

    clusters._fit_one = held_fit
    try:
        ctrl.set_k(3)
        qtbot.waitUntil(lambda: len(started) >= 1, timeout=10_000)
        first = started[0]
        ctrl.set_k(5)  # obsoletes the k=3 refit
        release.set()
        qtbot.waitUntil(lambda: not ctrl.busy, timeout=60_000)
    finally:
        clusters._fit_one = orig
    _wait_clean(qtbot, base_threads, base_pool)
    assert finished[first] == 1  # the k=3 refit stopped after its first fit of six
    assert 6 in finished.values()  # the k=5 refit ran them all
    assert ctrl.clusters is not None and ctrl.clusters.k == 5
    _still_works(viewer)

    # close the window while a refit runs: it is cancelled and waited for
    release.clear()
    started.clear()
    finished.clear()
    clusters._fit_one = held_fit
    try:
        ctrl.set_k(4)
        qtbot.waitUntil(lambda: len(started) >= 1, timeout=10_000)

        def release_once_closing() -> None:
            # the fit goes on once the close has reached the controller (the window's
            # teardown takes a while before its Close event)
            end = time.monotonic() + 20
            while not ctrl.closed and time.monotonic() < end:
                time.sleep(0.01)
            release.set()

        threading.Thread(target=release_once_closing).start()
        viewer.close()
    finally:
        clusters._fit_one = orig
    assert not ctrl.busy and ctrl.closed
    assert finished and set(finished.values()) == {1}  # each stopped after its running fit
    _wait_clean(qtbot, base_threads, base_pool)


def test_dock_live_start_cancel_and_window_close(
    make_napari_viewer, qtbot, trained, embedded_bundle
) -> None:
    from napari_sigmma.io import load_any
    from napari_sigmma.viewer.dock import SigmmaDock

    sdata = load_any(embedded_bundle)
    viewer, _layer = _viewer_with_he(make_napari_viewer, sdata, str(embedded_bundle))
    dock = SigmmaDock(viewer)
    viewer.window.add_dock_widget(dock)
    base_threads, base_pool = _threads(), _pool_threads()
    dock.set_checkpoint(str(trained.ckpt))
    qtbot.waitUntil(lambda: not dock.busy, timeout=60_000)
    assert dock.checkpoint == str(trained.ckpt) and dock.run is not None
    # live start (slide, grid, engine) cancelled at its first step
    seen: list = []

    def on_step(*item) -> None:
        seen.append(item)
        dock.cancel()

    dock.progressed.connect(on_step)
    dock.live.setChecked(True)
    assert dock.busy
    qtbot.waitUntil(lambda: not dock.busy, timeout=60_000)
    _wait_clean(qtbot, base_threads, base_pool)
    assert seen and seen[-1][1] < seen[-1][2]  # never reached the last step
    assert dock.controller is None
    dock.progressed.disconnect(on_step)
    _still_works(viewer)
    # closing the window while a model load runs cancels and waits for it
    dock.set_checkpoint(str(trained.ckpt))
    assert dock.busy
    viewer.close()
    assert not dock.busy
    _wait_clean(qtbot, base_threads, base_pool)


# -- (b) a malicious checkpoint through the dock ------------------------------------------------
class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a visible side effect."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["torch-zip", "bare-pickle"])
def test_dock_refuses_malicious_checkpoint(
    make_napari_viewer, qtbot, trained, embedded_bundle, tmp_path, fmt
) -> None:
    import torch
    from napari.utils.notifications import notification_manager

    from napari_sigmma.viewer.hooks import layers_for

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    obj = {"format": "napari-sigmma-checkpoint", "model": {"w": torch.zeros(2)},
           "config": _Payload(marker)}  # fmt: skip
    if fmt == "torch-zip":
        torch.save(obj, evil)
    else:
        evil.write_bytes(pickle.dumps(obj))
    assert not marker.exists()

    viewer = make_napari_viewer()
    for data, kwargs, kind in layers_for(embedded_bundle):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    names = [ly.name for ly in viewer.layers]
    _, dock = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA")
    n_notes = len(notification_manager.records)

    dock.set_checkpoint(str(evil))  # what "Load checkpoint…" calls with the chosen file
    qtbot.waitUntil(lambda: not dock.busy, timeout=60_000)
    text = dock.status.text()
    assert text.startswith("Error: could not load the checkpoint") and str(evil) in text
    assert "refused" in text
    notes = [str(r.message) for r in notification_manager.records[n_notes:]]
    assert any(str(evil) in m and "checkpoint" in m for m in notes), notes
    assert not marker.exists()
    assert dock.checkpoint is None and dock.run is None
    assert [ly.name for ly in viewer.layers] == names  # the data layers are still there

    # the viewer and the dock keep working: a valid checkpoint loads afterwards
    _still_works(viewer)
    dock.set_checkpoint(str(trained.ckpt))
    qtbot.waitUntil(lambda: not dock.busy, timeout=60_000)
    assert dock.checkpoint == str(trained.ckpt) and dock.run is not None
    # named by its run and epoch, the file in the tooltip
    from napari_sigmma.viewer.session import model_label

    assert dock.status.text() == f"Model: {model_label(dock.run, str(trained.ckpt))}"
    assert "epoch" in dock.status.text() and dock.status.toolTip() == str(trained.ckpt)
    assert not marker.exists()
