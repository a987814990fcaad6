"""The readers' first-time imports, in one background thread a load can stop waiting for.

The first data load of a process imports spatialdata, spatialdata-io and their stack
(2,700 modules; 3–7 s on 2 cores). An import cannot be interrupted, so a load that did
those imports in its own thread could not be cancelled until they were done. Instead
:func:`wait_for_readers` starts (once per process) a daemon thread that does them and
waits for it while checking ``cancel``: a cancelled load ends at once, and the imports go
on in their own thread and benefit the next load.
"""

from __future__ import annotations

import importlib
import sys
import threading

from napari_sigmma.errors import CancelLike, check_cancel

#: ``(module, attribute)`` pairs: the attribute is read to trigger spatialdata-io's lazy
#: reader imports.
HEAVY_IMPORTS: tuple[tuple[str, str | None], ...] = (
    ("spatialdata", None),
    ("spatialdata_io", "xenium"),
    ("geopandas", None),
    ("anndata", None),
    ("dask.array", None),
    ("tifffile", None),
    ("pyarrow.parquet", None),
)
#: the module whose presence in ``sys.modules`` means the work is done
_LAST = "spatialdata_io.readers.xenium"

_lock = threading.Lock()
_done = threading.Event()
_thread: threading.Thread | None = None


def _import_all() -> None:
    try:
        for name, attr in HEAVY_IMPORTS:
            try:
                mod = importlib.import_module(name)
                if attr is not None:
                    getattr(mod, attr)
            except Exception:  # the reader that needs it reports it clearly
                continue
    finally:
        _done.set()


def preload_readers() -> threading.Event:
    """Start the background imports (once per process); returns the event set when done."""
    global _thread
    with _lock:
        if _done.is_set():
            return _done
        if _LAST in sys.modules and all(n in sys.modules for n, _ in HEAVY_IMPORTS):
            _done.set()
            return _done
        if _thread is None:
            _thread = threading.Thread(
                target=_import_all, name="sigmma-reader-imports", daemon=True
            )
            _thread.start()
    return _done


def wait_for_readers(cancel: CancelLike = None, *, poll: float = 0.05) -> None:
    """Wait until the readers' imports are done, checking ``cancel`` every ``poll`` s.

    Raises
    ------
    Cancelled
        When ``cancel`` is set first (the imports carry on in their own thread).
    """
    done = preload_readers()
    while not done.wait(poll):
        check_cancel(cancel)
