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
