"""``napari-sigmma train`` and ``napari-sigmma embed`` (wired in :mod:`napari_sigmma.cli`).

``train`` builds a :class:`~napari_sigmma.train.config.TrainConfig` from ``--config`` (or,
with ``--resume``, the run folder's ``config.yaml``; else the defaults), applies the flags,
and runs :func:`~napari_sigmma.train.trainer.train`. The first Ctrl-C asks the trainer to
stop: it writes a checkpoint and the run can be continued with ``--resume``. Under
``torchrun`` every process runs this command; only rank 0 prints.

``embed`` loads a checkpoint (``weights_only``), tiles every slide as in training and writes
tile- and cell-level embeddings at each scale to a SpatialData ``.zarr``.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from typing import Any

from napari_sigmma.errors import Cancelled, SigmmaError, check_cancel


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _say(*parts: Any) -> None:
    if _rank() == 0:
        print(*parts, flush=True)


def expand_data(path: str | os.PathLike[str]) -> list[Path]:
    """A data path, or — for a plain folder — the data sets directly inside it."""
    from napari_sigmma.io import detect_kind

    p = Path(path)
    if not p.exists():
        raise SigmmaError("not found", path=p)
    if detect_kind(p) is not None:
        return [p.resolve()]
    if p.is_dir():
        found = sorted(c.resolve() for c in p.iterdir() if detect_kind(c) is not None)
        if found:
            return found
    # Let the reader explain what is wrong with it.
    return [p.resolve()]


def build_train_config(args: argparse.Namespace) -> Any:
    """The TrainConfig for the ``train`` subcommand's arguments."""
    from napari_sigmma.train.config import TrainConfig

    out = Path(args.out) if getattr(args, "out", None) else None
    if getattr(args, "config", None):
        cfg = TrainConfig.from_yaml(args.config)
    elif getattr(args, "resume", False) and out is not None and (out / "config.yaml").is_file():
        cfg = TrainConfig.from_yaml(out / "config.yaml")
    else:
        cfg = TrainConfig()
    changes: dict[str, Any] = {}
    model: dict[str, Any] = {}
    if getattr(args, "data", None):
        changes["data"] = [str(p) for p in expand_data(args.data)]
    if out is not None:
        changes["run_dir"] = str(out)
    if getattr(args, "epochs", None):
        changes["epochs"] = int(args.epochs)
    if getattr(args, "device", None):
        changes["device"] = str(args.device)
    if getattr(args, "backbone", None):
        model["backbone"] = str(args.backbone)
    if getattr(args, "checkpoint", None):
        model["checkpoint"] = str(Path(args.checkpoint).resolve())
    if getattr(args, "finetune", None):
        model["finetune"] = str(args.finetune)
    if model:
        changes["model"] = model
    return cfg.replace(**changes) if changes else cfg


class _Printer:
    """Console progress for the CLI (rank 0)."""

    def __init__(self, every: int = 10) -> None:
        self.every = every

    def on_step(self, step: int, epoch: int, loss: float, parts: dict[str, float]) -> None:
        if step == 1 or step % self.every == 0:
            ps = " ".join(f"{k}={v:.3f}" for k, v in parts.items())
            _say(f"  step {step:5d}  epoch {epoch}  loss {loss:.4f}  ({ps})")

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        msg = f"epoch {epoch}: train loss {metrics.get('train_loss', float('nan')):.4f}"
        if "val/score" in metrics:
            msg += f", val mean Recall@5% {metrics['val/score']:.3f}"
            for s in ("micro", "meso", "macro"):
                k1, k2 = f"val/{s}/he2st@5", f"val/{s}/st2he@5"
                if k1 in metrics:
                    msg += f" | {s} HE→ST {metrics[k1]:.3f} ST→HE {metrics[k2]:.3f}"
        _say(msg)


def run_train(args: argparse.Namespace) -> int:
    """Entry of ``napari-sigmma train``; returns the exit code (130 when cancelled)."""
    from napari_sigmma.train.trainer import train

    cfg = build_train_config(args)
    if not cfg.data:
        raise SigmmaError("no data: pass --data")
    resume = bool(getattr(args, "resume", False))
    _say(
        f"training {cfg.model.backbone} ({cfg.model.finetune}) on {len(cfg.data)} slide(s) "
        f"→ {cfg.run_dir}" + (" (resuming)" if resume else "")
    )
    cancel = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_sigint(signum: int, frame: Any) -> None:
            if cancel.is_set():
                raise KeyboardInterrupt
            _say("stopping after this step (checkpointing); Ctrl-C again to abort")
            cancel.set()

        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = train(cfg, callbacks=_Printer(), cancel=cancel, resume=resume)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    _say(
        f"{result.status}: {result.epoch} epoch(s), {result.global_step} steps, "
        f"{result.seconds:.0f} s; tiles {result.n_tiles}"
    )
    if result.best_checkpoint:
        _say(f"best checkpoint: {result.best_checkpoint} (epoch {result.best_epoch})")
    if result.test_metrics:
        tm = result.test_metrics
        for s in ("micro", "meso", "macro"):
            if f"{s}/he2st@5" in tm:
                _say(
                    f"  test {s}: HE→ST R@5% {tm[f'{s}/he2st@5']:.3f}, "
                    f"ST→HE R@5% {tm[f'{s}/st2he@5']:.3f}  (n={tm.get('n_tiles')})"
                )
    if result.status == "cancelled":
        _say(f"resume with: napari-sigmma train --out {cfg.run_dir} --resume")
        return 130
    return 0


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or a run folder (its ``best.pt``, else ``last.pt``)."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "checkpoints" / "best.pt", p / "checkpoints" / "last.pt"):
            if cand.is_file():
                return cand
        raise SigmmaError("no checkpoints/best.pt or last.pt in this run folder", path=p)
    if not p.is_file():
        raise SigmmaError("checkpoint not found", path=p)
    return p


def embed_slide_to_zarr(
    checkpoint: str,
    data: str,
    out: str,
    *,
    suffix: str = "",
    device: str = "auto",
    overwrite: bool = False,
    cancel: Any = None,
) -> str:
    """Embed every tile of one slide with ``checkpoint`` and write a SpatialData ``.zarr``.

    A plain function of paths, so a dask.distributed worker can run it for one slide.
    Returns the written path. ``cancel`` (Event or callable) is checked between batches of
    tiles; a cancelled run raises :class:`~napari_sigmma.errors.Cancelled` and writes nothing.
    """
    import dask

    # lazy slide reads use the threaded scheduler: inside a dask.distributed worker the
    # default would ship the read graph (with open file handles) to the cluster
    with dask.config.set(scheduler="threads"):
        return _embed_slide_to_zarr(checkpoint, data, out, suffix, device, overwrite, cancel)


def _embed_slide_to_zarr(
    checkpoint: str,
    data: str,
    out: str,
    suffix: str,
    device: str,
    overwrite: bool,
    cancel: Any = None,
) -> str:
    from napari_sigmma.analysis.embedzarr import embed_slide_streaming
    from napari_sigmma.device import resolve_device
    from napari_sigmma.io import load_any
    from napari_sigmma.tiles.grid import make_tile_grid
    from napari_sigmma.tiles.paired import PairedSlide
    from napari_sigmma.train.config import TrainConfig
    from napari_sigmma.train.trainer import graph_settings, load_checkpoint, model_from_checkpoint

    ckpt_path = Path(checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    cfg = TrainConfig.from_dict(dict(ckpt["config"]), path=ckpt_path)
    model, featurizer = model_from_checkpoint(ckpt, path=ckpt_path)
    dev = resolve_device(device)
    model.to(dev).eval()
    path = Path(data)
    name = path.stem if path.suffix else path.name
    paired = PairedSlide.from_sdata(
        load_any(path, cancel=cancel), name=name, node_obsm=cfg.node_obsm
    )
    grid = make_tile_grid(
        paired, tile_px=cfg.tile_px, target_mpp=cfg.target_mpp, min_tissue=cfg.min_tissue
    )
    _say(f"{name}: {len(grid)} tiles, {paired.n_cells} cells")
    res = embed_slide_streaming(
        model,
        paired,
        grid,
        out,
        featurizer=featurizer if paired.n_cells else None,
        settings=graph_settings(cfg),
        batch_size=8,
        device=dev,
        suffix=suffix,
        attrs={"checkpoint": str(ckpt_path), "source": str(path), "slide": name},
        overwrite=overwrite,
        cancel=cancel,
    )
    return str(res.path)


def _distributed_client(address: str | None, n_slides: int) -> tuple[Any, Any]:
    """A dask.distributed client and the local cluster it owns (``None`` for a given
    scheduler): the given scheduler, or a local cluster of processes."""
    from distributed import Client, LocalCluster

    if address:
        try:
            return Client(address, timeout="5s"), None
        except OSError as err:
            raise SigmmaError(f"cannot reach the dask scheduler ({err})", path=address) from err
    workers = max(1, min(n_slides, os.cpu_count() or 1))
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None)
    return Client(cluster), cluster


def embed_folder(
    checkpoint: str | os.PathLike[str],
    paths: list[Path],
    parts_dir: str | os.PathLike[str],
    *,
    scheduler: str | None = None,
    device: str = "auto",
    cancel: Any = None,
    poll: float = 0.1,
) -> list[str]:
    """Embed several slides on dask.distributed, one task per slide; returns the parts.

    Each task runs :func:`embed_slide_to_zarr` for one slide into
    ``<parts_dir>/<k>.zarr``. ``cancel`` (Event or callable) is polled every ``poll``
    seconds while the tasks run: on cancel the futures are cancelled, the client is
    closed and the local cluster (its worker processes) is shut down, then
    :class:`~napari_sigmma.errors.Cancelled` is raised. A local cluster made here is always
    closed on return, so no worker process outlives the call.
    """
    from distributed import wait

    parts_dir = Path(parts_dir)
    client, cluster = _distributed_client(scheduler, len(paths))
    futures: list[Any] = []
    aborted = False
    try:
        n_workers = len(client.scheduler_info().get("workers", {}))
        _say(
            f"embedding {len(paths)} slides on {n_workers} dask worker(s) "
            f"({client.scheduler.address})"
        )
        futures = [
            client.submit(
                embed_slide_to_zarr,
                str(checkpoint),
                str(p),
                str(parts_dir / f"{k}.zarr"),
                suffix=f"_{k}",
                device=device,
                overwrite=True,
                pure=False,
            )
            for k, p in enumerate(paths)
        ]
        while True:
            check_cancel(cancel)
            try:
                wait(futures, timeout=poll)
                break
            except TimeoutError:  # still running: check the cancel flag again
                continue
        return client.gather(futures)
    except BaseException:
        aborted = True
        if futures:
            try:
                client.cancel(futures, force=True)
            except Exception:  # the cluster may already be gone
                pass
        raise
    finally:
        client.close()
        if cluster is not None:
            if aborted:
                _close_local_cluster_now(cluster)
            else:
                cluster.close()


def _close_local_cluster_now(cluster: Any) -> None:
    """Close a local cluster whose workers may be busy in a task: start the close (the
    nannies then no longer restart a worker that dies), then kill the worker processes
    instead of letting each nanny wait 4 s for its busy worker to stop."""
    import signal
    import threading

    pids = []
    for nanny in list(getattr(cluster, "workers", {}).values()):
        proc = getattr(getattr(nanny, "process", None), "process", None)
        pid = getattr(proc, "pid", None)
        if pid:
            pids.append(int(pid))
    closer = threading.Thread(target=cluster.close, name="sigmma-cluster-close", daemon=True)
    closer.start()
    closer.join(0.2)  # the nannies are closing now
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    closer.join(30)


def run_embed(args: argparse.Namespace) -> int:
    """Entry of ``napari-sigmma embed``.

    One slide is embedded here. A folder of slides is distributed over dask.distributed
    workers, one slide per task (a local cluster of processes by default, or the scheduler
    at ``--scheduler``); each streams its own ``.zarr`` under ``<out>.parts/`` and the parts'
    element folders are moved into ``--out``.
    """
    import shutil

    from napari_sigmma.io.store import merge_stores
    from napari_sigmma.train.trainer import load_checkpoint

    ckpt_path = resolve_checkpoint(args.checkpoint)
    load_checkpoint(ckpt_path)  # a bad checkpoint fails here, before any worker starts
    device = getattr(args, "device", None) or "auto"
    paths = expand_data(args.data)
    out = Path(args.out)
    cancel = getattr(args, "cancel", None) or threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_sigint(signum: int, frame: Any) -> None:
            if cancel.is_set():
                raise KeyboardInterrupt
            _say("stopping (the dask tasks are cancelled); Ctrl-C again to abort")
            cancel.set()

        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        if len(paths) == 1:
            written = embed_slide_to_zarr(
                str(ckpt_path), str(paths[0]), str(out), device=device, cancel=cancel
            )
            _say(f"wrote {written}")
            return 0
        parts_dir = out.with_name(out.name + ".parts")
        parts_dir.mkdir(parents=True, exist_ok=True)
        try:
            written_parts = embed_folder(
                ckpt_path, paths, parts_dir, scheduler=getattr(args, "scheduler", None),
                device=device, cancel=cancel,
            )  # fmt: skip
        except Cancelled:
            shutil.rmtree(parts_dir, ignore_errors=True)
            raise
    except Cancelled:
        _say("embed cancelled; nothing written")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    # element folders are moved, not loaded: merging many slides' embeddings holds none
    written = merge_stores(written_parts, out)
    shutil.rmtree(parts_dir, ignore_errors=True)
    tables = sorted(t.name for t in (written / "tables").iterdir() if t.is_dir())
    _say(f"wrote {written}: " + ", ".join(tables))
    return 0
