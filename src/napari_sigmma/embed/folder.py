"""Embed slides to SpatialData ``.zarr``: one slide by paths (what a dask task runs), and a
folder of slides on dask.distributed, one task per slide."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from napari_sigmma.errors import SigmmaError, check_cancel
from napari_sigmma.progress import Bar


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _say(*parts: Any) -> None:
    if _rank() == 0:
        print(*parts, flush=True)


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
    from napari_sigmma.device import resolve_device
    from napari_sigmma.embed.stream import embed_slide_streaming
    from napari_sigmma.io import load_any, slide_name
    from napari_sigmma.tiles.grid import make_tile_grid
    from napari_sigmma.tiles.paired import PairedSlide
    from napari_sigmma.train.checkpoint import (
        graph_settings,
        load_checkpoint,
        model_from_checkpoint,
    )
    from napari_sigmma.train.config import TrainConfig

    ckpt_path = Path(checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    cfg = TrainConfig.from_dict(dict(ckpt["config"]), path=ckpt_path)
    model, featurizer = model_from_checkpoint(ckpt, path=ckpt_path)
    dev = resolve_device(device)
    model.to(dev).eval()
    path = Path(data)
    name = slide_name(path)
    paired = PairedSlide.from_sdata(
        load_any(path, cancel=cancel), name=name, node_obsm=cfg.node_obsm
    )
    grid = make_tile_grid(
        paired, tile_px=cfg.tile_px, target_mpp=cfg.target_mpp, min_tissue=cfg.min_tissue
    )
    check_embed_input(paired, grid, path, has_table=paired.n_cells > 0 or _has_table(path))
    _say(f"{name}: {len(grid)} tiles, {paired.n_cells} cells")
    with Bar(f"embed {name}", len(grid), unit="tile") as bar:
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
            progress=bar,
        )
    return str(res.path)


def _has_table(path: Path) -> bool:
    """Whether ``path`` is a data set that comes with cells (not a plain slide file)."""
    from napari_sigmma.io.wsi import is_slide_file

    return not is_slide_file(path)


def check_embed_input(paired: Any, grid: Any, path: Path, *, has_table: bool) -> None:
    """Refuse what would embed nothing, or embed cells that are not on the H&E, naming the
    data (:func:`napari_sigmma.train.check.pairing_problems`: no whole tile, a cell table
    with no cells or none on the H&E); warn when only a handful of cells lie on it."""
    import warnings

    from napari_sigmma.train.check import pairing_problems

    problems, notes = pairing_problems(paired, grid, has_table=has_table)
    if problems:
        raise SigmmaError(problems[0], path=path)
    for note in notes:
        warnings.warn(f"{path}: {note}", UserWarning, stacklevel=2)


def _distributed_client(address: str | None, n_slides: int) -> tuple[Any, Any]:
    """A dask.distributed client and the local cluster it owns (``None`` for a given
    scheduler): the given scheduler, or a local cluster of processes."""
    from distributed import Client, LocalCluster

    if address:
        try:
            return Client(address, timeout="5s"), None
        except OSError as err:
            raise SigmmaError(f"cannot reach the dask scheduler ({err})", path=address) from err
    import logging

    workers = max(1, min(n_slides, os.cpu_count() or 1))
    # a failing task is reported once, as the error line: no worker tracebacks before it
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        dashboard_address=None,
        silence_logs=logging.CRITICAL,
    )
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
        with Bar("embed slides", len(futures), unit="slide") as bar:
            while True:
                check_cancel(cancel)
                try:
                    wait(futures, timeout=poll)
                    break
                except TimeoutError:  # still running: check the cancel flag again
                    bar(sum(f.done() for f in futures))
                    continue
            bar(len(futures))
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
