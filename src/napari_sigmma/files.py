"""Atomic file writes: a temp file in the same folder, then ``os.replace`` (a reader never
sees a half-written file, and a crash leaves the previous version)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np


def atomic_savez(
    path: str | os.PathLike[str], arrays: dict[str, np.ndarray], *, compressed: bool = False
) -> Path:
    """``np.savez`` (or ``savez_compressed``) ``arrays`` to ``path`` atomically.

    The temp name carries the process and thread, so concurrent writers of the same file
    never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
    (np.savez_compressed if compressed else np.savez)(tmp, **arrays)
    os.replace(tmp, path)
    return path


def atomic_save_npy(path: str | os.PathLike[str], arr: np.ndarray) -> Path:
    """``np.save`` ``arr`` to ``path`` atomically (fsynced before the rename: a cache file
    read after a crash is whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
