"""Files -> SpatialData: one module per source, and :func:`load_any` to pick the right one.

- :mod:`napari_sigmma.io.wsi` — whole-slide images (SVS, pyramidal TIFF, OME-TIFF, NDPI)
- :mod:`napari_sigmma.io.xenium` — 10x Xenium output bundles (with the H&E alignment)
- :mod:`napari_sigmma.io.hest` — HEST-1k Xenium samples
- :mod:`napari_sigmma.io.store` — SpatialData ``.zarr`` stores

Every reader produces the canonical layout described in ``docs/INTERFACES.md``. Nothing
heavy is imported here: the readers import spatialdata, dask, ... when called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from napari_sigmma.constants import NAME_SUFFIXES
from napari_sigmma.errors import CancelLike, SigmmaError, check_cancel

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = [
    "XENIUM_MARKER",
    "detect_kind",
    "load_any",
    "release_thread_dask_pool",
    "slide_name",
    "slide_names",
]

#: The file that makes a folder a Xenium output bundle.
XENIUM_MARKER = "experiment.xenium"


def slide_name(path: str | os.PathLike[str] | None) -> str:
    """The name of the slide a data path holds: the one rule for run folders, splits, caches
    and stores (``sample.zarr`` → ``sample``, ``TENX118.tif`` → ``TENX118``, a Xenium folder →
    its folder name). Old ``split.json`` files hold names made by this rule."""
    if not path:
        return "slide"
    p = Path(path)
    return (p.stem if p.suffix in NAME_SUFFIXES else p.name) or "slide"


def slide_names(paths: list[str]) -> list[str]:
    """Unique slide names of several data paths (:func:`slide_name`; ``-2``, ``-3`` … on
    clashes)."""
    names: list[str] = []
    for p in paths:
        base = slide_name(p)
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def detect_kind(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is, judged from names only: ``"zarr"``, ``"xenium"``, ``"hest"``,
    ``"slide"``, or ``None`` when it is none of them."""
    from napari_sigmma.io.hest import is_hest_folder
    from napari_sigmma.io.store import is_sdata_store
    from napari_sigmma.io.wsi import is_slide_file

    p = Path(path)
    if p.is_dir():
        if p.suffix == ".zarr" or is_sdata_store(p):
            return "zarr"
        if (p / XENIUM_MARKER).is_file():
            return "xenium"
        if is_hest_folder(p):
            return "hest"
        return None
    if is_slide_file(p):
        return "slide"
    return None


def load_any(path: str | os.PathLike[str], *, cancel: CancelLike = None) -> SpatialData:
    """Read whatever ``path`` is into the canonical SpatialData layout.

    - a ``.zarr`` folder (SpatialData store) → :func:`napari_sigmma.io.store.read_sdata`
    - a folder with ``experiment.xenium`` → :func:`napari_sigmma.io.xenium.read_xenium`
    - a folder with ``wsis/`` and ``transcripts/`` → :func:`napari_sigmma.io.hest.read_hest`
    - a slide file → :func:`napari_sigmma.io.wsi.read_slide_sdata`

    ``cancel`` (an Event or callable) is checked while the readers' first-time imports run
    (:mod:`napari_sigmma.io.preload`: in their own thread) and before and after the read,
    which is one reader call (spatialdata-io's, or lazy dask arrays): a cancelled load
    raises :class:`~napari_sigmma.errors.Cancelled` once that call returns.

    Raises
    ------
    SigmmaError
        When the path does not exist or is none of these (or its reader rejects it).
    """
    from napari_sigmma.io.preload import wait_for_readers

    check_cancel(cancel)
    # a fresh process's first load spends seconds in imports, which cannot be interrupted:
    # they run in their own thread and this one only waits for them, checking cancel
    wait_for_readers(cancel)
    sdata = _read_any(path)
    check_cancel(cancel)
    return sdata


def _read_any(path: str | os.PathLike[str]) -> SpatialData:
    p = Path(path)
    if not p.exists():
        raise SigmmaError("not found", path=p)
    kind = detect_kind(p)
    if kind == "zarr":
        from napari_sigmma.io.store import read_sdata

        return read_sdata(p)
    if kind == "xenium":
        from napari_sigmma.io.xenium import read_xenium

        return read_xenium(p)
    if kind == "hest":
        from napari_sigmma.io.hest import read_hest

        return read_hest(p)
    if kind == "slide":
        from napari_sigmma.io.wsi import read_slide_sdata

        return read_slide_sdata(p)
    if p.is_dir():
        raise SigmmaError(
            "not a SpatialData .zarr, a Xenium bundle (experiment.xenium) or a HEST-1k "
            "folder (wsis/ and transcripts/)",
            path=p,
        )
    raise SigmmaError(
        "not a slide file (.svs, .tif, .tiff, .ome.tif, .ndpi) or a data folder", path=p
    )


def release_thread_dask_pool() -> None:
    """Shut down the thread pool dask's threaded scheduler keeps for the calling thread.

    dask keeps one pool per calling thread (other than the main one) and reaps it only once
    that thread is gone; Qt's pool threads, where napari workers run, stay alive and count
    as alive forever to Python, so each worker that computed a dask array (a slide read)
    would leave that pool's idle threads behind. Call it as a worker task ends. The pools
    of threads that have ended (helper threads of the task, e.g. tile prefetch) are shut
    down too, as dask itself would only at its next computation.
    """
    import sys
    import threading

    threaded = sys.modules.get("dask.threaded")
    pools = getattr(threaded, "pools", None)
    lock = getattr(threaded, "pools_lock", None)
    if pools is None or lock is None:
        return
    me = threading.current_thread()
    with lock:
        gone = [t for t in list(pools) if t is me or not t.is_alive()]
        owned = [pools.pop(t) for t in gone]
    for by_workers in owned:
        for pool in by_workers.values():
            pool.shutdown(wait=True)
