"""``napari-sigmma bench --cancel``: how long each long task takes to stop once cancelled.

Every long task takes a cancel flag (a ``threading.Event`` or a callable) that it checks
between small chunks of work; this bench measures, in one run on the embedded sample with
the demo model, the time from setting the flag to the task being gone (its thread ended,
worker processes shut down), for

- **load**: reading a data set (:func:`napari_sigmma.io.load_any`; one reader call, so the
  bound is the read; and a fresh process's first load, cancelled while the readers'
  first-time imports run in their own thread, :func:`time_cold_load`) and a checkpoint
  (:func:`~napari_sigmma.live.run.load_live_run`);
- **embed**: :func:`~napari_sigmma.embed.memory.embed_tiles` (one batch), and
  ``napari-sigmma embed`` over a folder on a local dask.distributed cluster
  (:func:`~napari_sigmma.embed.folder.embed_folder`: futures cancelled, cluster closed);
- **train**: :func:`~napari_sigmma.train.loop.train` (one optimiser step, then the
  checkpoint it writes on cancel);
- **cluster**: :func:`~napari_sigmma.analysis.clusters.fit_clusters` (one of six fits);
- **retrieve**: the whole-slide encode that fills the retrieval index
  (:meth:`~napari_sigmma.live.engine.EmbeddingEngine.encode`, one batch);

each here in a plain thread, and (the Qt half, :mod:`napari_sigmma.bench.cancel_qt`) the
same tasks through the widgets' workers in a real viewer: the dock's "Open data…" and model
load, the retrieval widget's reference slide and whole-slide encoding, the live
controller's cluster refit and the training widget. The cancel is issued once the task has
done its first chunk (mid-task). Printed and written to ``<out>/cancel_bench.json``; a
measurement, not a timed test.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_sigmma.errors import Cancelled
from napari_sigmma.io import release_thread_dask_pool

TARGET_S = 1.0


def time_cancel(
    task: Callable[[threading.Event, threading.Event], Any], *, timeout: float = 600.0
) -> dict[str, Any]:
    """Run ``task(cancel, started)`` in a thread, cancel it once it sets ``started``.

    Returns ``{"latency_s", "outcome", "thread_gone"}``: seconds from ``cancel.set()`` to
    the thread's end; ``"cancelled"`` (it raised :class:`~napari_sigmma.errors.Cancelled`),
    ``"returned"`` (it stopped early and returned) or ``"error: …"``.
    """
    cancel, started = threading.Event(), threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = task(cancel, started)
            box["outcome"] = "returned"
        except Cancelled:
            box["outcome"] = "cancelled"
        except BaseException as err:  # reported, not raised: the bench goes on
            box["outcome"] = f"error: {type(err).__name__}: {err}"
        finally:
            release_thread_dask_pool()  # as the widgets' workers do when they end
            started.set()

    th = threading.Thread(target=run, name="sigmma-cancel-bench", daemon=True)
    th.start()
    started.wait(timeout)
    t0 = time.perf_counter()
    cancel.set()
    th.join(timeout)
    latency = time.perf_counter() - t0
    return {
        "latency_s": latency,
        "outcome": box.get("outcome", "timeout"),
        "thread_gone": not th.is_alive(),
        "result": box.get("result"),
    }


def _first_check_starts(cancel: threading.Event, started: threading.Event) -> Callable[[], bool]:
    """A cancel callable that marks the task started at its first check (for tasks that
    are one call between checks: the cancel then lands while that call runs)."""

    def check() -> bool:
        started.set()
        return cancel.is_set()

    return check


def cold_load_cancel(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Cancel this process's first :func:`~napari_sigmma.io.load_any` while the readers'
    first-time imports run (meant for a fresh process: see :func:`time_cold_load`)."""
    import sys

    from napari_sigmma.io import load_any, preload

    fresh = "spatialdata" not in sys.modules

    def task(cancel: threading.Event, started: threading.Event) -> Any:
        def check() -> bool:
            if preload._thread is not None:  # the imports are under way: cancel now
                started.set()
            return cancel.is_set()

        return load_any(path, cancel=check)

    r = time_cancel(task)
    r.pop("result", None)
    r["fresh_process"] = fresh
    r["imports_done_when_task_ended"] = preload._done.is_set()
    t0 = time.perf_counter()
    preload._done.wait(300)
    r["imports_went_on_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sdata = load_any(path)
    r["next_load_s"] = time.perf_counter() - t0
    r["next_load_tables"] = sorted(sdata.tables)
    return r


def time_cold_load(path: str | os.PathLike[str], *, timeout: float = 600.0) -> dict[str, Any]:
    """:func:`cold_load_cancel` in a fresh Python process (so the imports are first-time)."""
    from napari_sigmma.bench.host import run_module_json

    return run_module_json(
        "napari_sigmma.bench.cancel", path, timeout=timeout, what="cold-load cancel child"
    )


def _tiny_train_config(sample: Path, run_dir: Path, cache: Path) -> Any:
    from napari_sigmma.train.config import TrainConfig

    return TrainConfig.from_dict(
        {
            "data": [str(sample)],
            "run_dir": str(run_dir),
            "epochs": 3,
            "batch_size": 8,
            "grad_accum": 1,
            "split_fractions": (1.0, 0.0, 0.0),
            "n_pca": 16,
            "warmup_steps": 2,
            "device": "cpu",
            "feature_cache_dir": str(cache),
            "model": {"fast_multicrop": True, "embed_dim": 32, "hidden": 32,
                      "head_hidden": 64, "gnn_layers": (1, 1, 1)},
        }
    )  # fmt: skip


def _cluster_inputs(engine: Any, *, n_tiles: int = 400, cells: int = 60_000) -> list[Any]:
    """A live session's worth of tile results: the engine's, repeated (with noise) up to
    ``n_tiles`` tiles and about ``cells`` cells (the controller's cluster cap)."""
    from dataclasses import replace

    base = [r for r in engine.memory_results() if r.n_cells and r.nodes]
    rng = np.random.default_rng(0)
    per_tile = max(1, cells // n_tiles)

    def jitter(x: np.ndarray, rows: int) -> np.ndarray:
        x = np.resize(x, (rows, x.shape[-1]))
        return (x + rng.normal(0, 0.05, x.shape)).astype(np.float32)

    out = []
    for i in range(n_tiles):
        r = base[i % len(base)]
        out.append(
            replace(
                r, index=i, tile_id=f"t{i}", he_crops=jitter(r.he_crops, 21),
                nodes={s: jitter(v, per_tile) for s, v in r.nodes.items()},
                cell_index=np.arange(i * per_tile, (i + 1) * per_tile),
                cell_micro=rng.integers(0, 16, per_tile),
            )
        )  # fmt: skip
    return out


def measure_cancel_analysis(
    ckpt: Path, sample: Path, work: Path, *, device: str = "cpu", dask: bool = True
) -> dict[str, dict[str, Any]]:
    """The non-Qt half: each task in a plain thread (see the module docstring)."""
    from napari_sigmma.analysis.clusters import fit_clusters
    from napari_sigmma.embed.memory import embed_tiles
    from napari_sigmma.io import load_any
    from napari_sigmma.live.run import load_live_run
    from napari_sigmma.tiles.paired import PairedSlide
    from napari_sigmma.train.loop import train

    out: dict[str, dict[str, Any]] = {}
    # warm the readers and the model once (first imports are not what a cancel waits for)
    run = load_live_run(ckpt)
    paired = PairedSlide.from_sdata(load_any(sample), name="embedded")
    engine = run.engine(paired, device=device, cache_dir=None, batch_size=4)
    n_tiles = len(engine.grid)

    out["load data"] = time_cancel(lambda c, s: load_any(sample, cancel=_first_check_starts(c, s)))
    cold = time_cold_load(sample)
    cold["result"] = (
        f"imports went on {cold['imports_went_on_s']:.1f} s in their own thread; "
        f"next load {cold['next_load_s']:.1f} s"
    )
    out["load data, fresh process"] = cold
    out["load model"] = time_cancel(
        lambda c, s: load_live_run(ckpt, cancel=_first_check_starts(c, s))
    )

    def embed(cancel: threading.Event, started: threading.Event) -> Any:
        emb = embed_tiles(
            engine.model, paired, engine.grid, featurizer=engine.featurizer,
            settings=engine.graph_settings, batch_size=4, device=engine.device,
            cancel=cancel, progress=lambda done, total: started.set(),
        )  # fmt: skip
        return f"{len(emb.indices)} of {n_tiles} tiles"

    out["embed"] = time_cancel(embed)

    def retrieve(cancel: threading.Event, started: threading.Event) -> Any:
        engine.memory.clear()
        done = 0
        for batch in engine.encode(list(engine.grid.tile_ids), cancel):
            done += len(batch)
            started.set()
        return f"{done} of {n_tiles} tiles"

    out["retrieve"] = time_cancel(retrieve)

    for _ in engine.encode(list(engine.grid.tile_ids)):
        pass
    results = _cluster_inputs(engine)
    fit_s = _time_each_fit(lambda: fit_clusters(results, 8))
    full_fit_s = sum(fit_s)

    def cluster(cancel: threading.Event, started: threading.Event) -> Any:
        # cancel a quarter of the way through (a fit is under way), not at a check
        threading.Timer(full_fit_s / 4, started.set).start()
        cs = fit_clusters(results, 8, cancel=cancel)
        return f"completed before the cancel ({len(cs.centroids)} fits)"

    out["cluster"] = time_cancel(cluster)
    out["cluster"]["uncancelled_s"] = full_fit_s
    out["cluster"]["longest_fit_s"] = max(fit_s)  # the worst-case cancel latency
    out["cluster"]["cells"] = int(sum(r.n_cells for r in results))

    def train_task(cancel: threading.Event, started: threading.Event) -> Any:
        class OnStep:
            def on_step(self, *a: Any) -> None:
                started.set()

        cfg = _tiny_train_config(sample, work / "train-run", work / "train-cache")
        res = train(cfg, callbacks=[OnStep()], cancel=cancel)
        return f"{res.status} after {res.global_step} steps"

    out["train"] = time_cancel(train_task)

    if dask:
        out["embed (CLI, dask)"] = _time_embed_folder(ckpt, sample, work)
    for v in out.values():
        v["result"] = None if v.get("result") is None else str(v["result"])
    return out


def _time_each_fit(run: Callable[[], Any]) -> list[float]:
    """Seconds of each of the (up to six) fits of one :func:`fit_clusters` call (the
    chunks its cancel checks fall between)."""
    import napari_sigmma.analysis.clusters as clusters

    orig = clusters._fit_one
    times: list[float] = []

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            times.append(time.perf_counter() - t0)

    clusters._fit_one = timed
    try:
        run()
    finally:
        clusters._fit_one = orig
    return times


def _time_embed_folder(ckpt: Path, sample: Path, work: Path) -> dict[str, Any]:
    """``napari-sigmma embed`` over a folder of two slides on a local process cluster,
    cancelled once both worker processes have been busy for 2 s."""
    import psutil

    from napari_sigmma.embed.folder import embed_folder

    folder = work / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        link = folder / name
        if not link.exists():
            link.symlink_to(sample, target_is_directory=True)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    t_seen: dict[str, float] = {}

    def task(cancel: threading.Event, started: threading.Event) -> Any:
        def check() -> bool:
            kids = {p.pid for p in me.children(recursive=True)} - before
            if len(kids) >= 2 and "t" not in t_seen:
                t_seen["t"] = time.monotonic()
            if "t" in t_seen and time.monotonic() - t_seen["t"] > 2.0:
                started.set()
            return cancel.is_set()

        return embed_folder(
            ckpt, sorted(folder.iterdir()), work / "parts", device="cpu", cancel=check
        )

    r = time_cancel(task)
    left = {p.pid for p in me.children(recursive=True)} - before
    r["worker_processes_left"] = len(
        [p for p in left if "resource_tracker" not in " ".join(psutil.Process(p).cmdline())]
    )
    return r


def run_cancel_bench(
    out: str | os.PathLike[str] = "bench_out",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    qt: bool = True,
    dask: bool = True,
) -> dict[str, Any]:
    """Measure every cancel latency; returns them (and writes ``<out>/cancel_bench.json``)."""
    import platform
    import tempfile

    from napari_sigmma.bench.host import ensure_display
    from napari_sigmma.demo.model import demo_model
    from napari_sigmma.samples.embedded import embedded_sample

    ckpt = demo_model(cache_dir, device=device)
    sample = embedded_sample(cache_dir=cache_dir)
    result: dict[str, Any] = {"checkpoint": str(ckpt), "sample": str(sample)}
    with tempfile.TemporaryDirectory(prefix="sigmma-cancel-") as tmp:
        result["threads"] = measure_cancel_analysis(
            ckpt, sample, Path(tmp) / "a", device=device, dask=dask
        )
        if qt:
            xvfb = ensure_display()
            try:
                from napari_sigmma.bench.cancel_qt import measure_cancel_qt

                result["widgets"] = measure_cancel_qt(ckpt, sample, Path(tmp) / "q")
            finally:
                if xvfb is not None:
                    xvfb.terminate()
    result["target_s"] = TARGET_S
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cancel_bench.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def format_cancel_report(r: dict[str, Any]) -> str:
    """One line per task: latency, outcome and whether it meets the 1 s target."""
    lines = [f"SIGMMA cancel latency (cancel → task gone; target ≤ {r['target_s']:.0f} s)"]
    for part, title in (("threads", "API, in a thread"), ("widgets", "widgets, in napari")):
        if part not in r:
            continue
        lines.append(f"  {title}:")
        for name, v in r[part].items():
            ok = "ok" if v["latency_s"] <= r["target_s"] else "MISSES"
            extra = f"; {v['result']}" if v.get("result") else ""
            if "longest_fit_s" in v:
                extra += f"; worst case = longest fit {v['longest_fit_s'] * 1000:.0f} ms"
            if "thread_end_s" in v:
                extra += f"; worker thread ended after {v['thread_end_s'] * 1000:.0f} ms"
            gone = "" if v.get("thread_gone", True) else ", thread still alive"
            lines.append(
                f"    {name:<26} {v['latency_s'] * 1000:8.0f} ms  {ok}  ({v['outcome']}{extra}"
                f"{gone})"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # the child of :func:`time_cold_load`
    import sys

    print(json.dumps(cold_load_cancel(sys.argv[1])))
