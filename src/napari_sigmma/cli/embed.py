"""``napari-sigmma embed``: a trained model over one slide, or a folder of slides on dask."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from napari_sigmma.embed.folder import _say, embed_folder, embed_slide_to_zarr
from napari_sigmma.errors import Cancelled
from napari_sigmma.train.checkpoint import disk_errors, resolve_checkpoint, write_error
from napari_sigmma.train.data import expand_data


def run(args: argparse.Namespace) -> int:
    """Entry of ``napari-sigmma embed``.

    One slide is embedded here. A folder of slides is distributed over dask.distributed
    workers, one slide per task (a local cluster of processes by default, or the scheduler
    at ``--scheduler``); each streams its own ``.zarr`` under ``<out>.parts/`` and the parts'
    element folders are moved into ``--out``.
    """
    import shutil

    from napari_sigmma import progress
    from napari_sigmma.io.store import merge_stores
    from napari_sigmma.train.checkpoint import load_checkpoint

    progress.set_enabled(not getattr(args, "quiet", False))
    ckpt_path = resolve_checkpoint(args.checkpoint)
    load_checkpoint(ckpt_path)  # a bad checkpoint fails here, before any worker starts
    device = getattr(args, "device", None) or "auto"
    paths = expand_data(args.data)
    out = Path(args.out)
    overwrite = bool(getattr(args, "overwrite", False))
    check_embed_out(out, paths, overwrite=overwrite)
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
            with disk_errors(out, "the embedding store"):
                written = embed_slide_to_zarr(
                    str(ckpt_path),
                    str(paths[0]),
                    str(out),
                    device=device,
                    overwrite=overwrite,
                    cancel=cancel,
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
        except BaseException as err:  # a bad slide, Ctrl-C, a full disk: no parts left
            shutil.rmtree(parts_dir, ignore_errors=True)
            if isinstance(err, OSError):
                raise write_error(err, out, "the embedding store") from err
            raise
    except Cancelled:
        _say("embed cancelled; nothing written")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    # element folders are moved, not loaded: merging many slides' embeddings holds none
    try:
        if overwrite and out.exists():
            shutil.rmtree(out)
        written = merge_stores(written_parts, out)
    except OSError as err:
        raise write_error(err, out, "the embedding store") from err
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    tables = sorted(t.name for t in (written / "tables").iterdir() if t.is_dir())
    _say(f"wrote {written}: " + ", ".join(tables))
    return 0


def check_embed_out(out: Path, paths: list[Path], *, overwrite: bool) -> None:
    """Refuse an ``--out`` that is (or is inside, or holds) one of the data sets, and an
    existing ``--out`` unless ``overwrite``."""
    from napari_sigmma.errors import SigmmaError

    o = out.absolute().resolve()
    for p in paths:
        d = Path(p).absolute().resolve()
        if o == d or d in o.parents or o in d.parents:
            where = (
                f"the data folder {d} itself"
                if o == d
                else f"inside the data {d}"
                if d in o.parents
                else f"a folder that holds the data {d}"
            )
            raise SigmmaError(
                f"--out is {where}: the store would be written into (or over) the input; "
                "choose an --out outside the data",
                path=out,
            )
    if out.exists() and not overwrite:
        raise SigmmaError(
            "already exists: remove it, choose another --out, or pass --overwrite to replace "
            "it (only once the new store is complete)",
            path=out,
        )
    if out.exists() and not out.is_dir():
        raise SigmmaError("--out is an existing file, not a .zarr store", path=out)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``embed`` subcommand to ``sub``."""
    e = sub.add_parser("embed", help="embed every tile of a slide (or a folder of slides)")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True, help="output SpatialData .zarr")
    e.add_argument("--device", default=None)
    e.add_argument("--scheduler", help="dask.distributed scheduler address for many slides")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out store")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=run)
