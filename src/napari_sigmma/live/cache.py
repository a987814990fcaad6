"""The two caches that keep per-tile results of the encoders (memory LRU, disk).

A :class:`~napari_sigmma.embed.result.TileResult` holds everything the live viewer draws for
one tile (embeddings per scale and crop, node embeddings, learned edges, attention).

Disk layout: ``<root>/<slide key>/<checkpoint hash>/<tile id>.npz``, written atomically
(temporary file, then rename), so a crash never leaves half a file and a second viewer on
the same data reads what the first wrote.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from napari_sigmma.embed.result import CACHE_FORMAT, TileResult
from napari_sigmma.files import atomic_savez

__all__ = [
    "CACHE_FORMAT",
    "DiskCache",
    "MemoryLRU",
    "TileResult",
    "default_cache_root",
    "iter_chunks",
    "safe_name",
]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class MemoryLRU:
    """A thread-safe least-recently-used map bounded by item count and bytes.

    Parameters
    ----------
    max_items
        Most results kept.
    max_bytes
        Most bytes kept (``TileResult.nbytes``); the oldest go first.
    """

    def __init__(self, max_items: int = 4096, max_bytes: int = 512 * 2**20) -> None:
        self.max_items = int(max_items)
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[str, TileResult] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> TileResult | None:
        with self._lock:
            res = self._data.get(key)
            if res is not None:
                self._data.move_to_end(key)
            return res

    def put(self, res: TileResult) -> None:
        with self._lock:
            old = self._data.pop(res.tile_id, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._data[res.tile_id] = res
            self._bytes += res.nbytes
            while self._data and (len(self._data) > self.max_items or self._bytes > self.max_bytes):
                if len(self._data) == 1:
                    break  # always keep the newest, even when it alone is over budget
                _, gone = self._data.popitem(last=False)
                self._bytes -= gone.nbytes

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return _SAFE.sub("_", str(text)).strip("_") or "x"


class DiskCache:
    """Per-tile ``.npz`` files under ``root/slide_key/checkpoint_hash/``.

    Parameters
    ----------
    root
        Cache root (e.g. next to the data).
    slide_key
        Identifies the slide *and* its tiling (name, content hash, grid geometry).
    checkpoint_hash
        Identifies the model weights.
    """

    def __init__(self, root: str | os.PathLike[str], slide_key: str, checkpoint_hash: str) -> None:
        self.folder = Path(root) / safe_name(slide_key) / safe_name(checkpoint_hash)
        self._known: set[str] | None = None
        self._lock = threading.Lock()

    def path(self, tile_id: str) -> Path:
        return self.folder / f"{safe_name(tile_id)}.npz"

    def _scan(self) -> set[str]:
        if self._known is None:
            self._known = (
                {p.stem for p in self.folder.glob("*.npz")} if self.folder.is_dir() else set()
            )
        return self._known

    def has(self, tile_id: str) -> bool:
        with self._lock:
            return safe_name(tile_id) in self._scan()

    def get(self, tile_id: str) -> TileResult | None:
        """The stored result, or ``None`` when absent or unreadable (then it is dropped)."""
        if not self.has(tile_id):
            return None
        p = self.path(tile_id)
        try:
            with np.load(p, allow_pickle=False) as z:
                res = TileResult.from_arrays({k: z[k] for k in z.files})
        except (OSError, ValueError, KeyError):
            # A damaged or older-format file: forget it, it will be recomputed.
            with self._lock:
                self._scan().discard(safe_name(tile_id))
            p.unlink(missing_ok=True)
            return None
        return res

    def put(self, res: TileResult) -> None:
        """Write ``res`` atomically (write-through from the engine)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        p = self.path(res.tile_id)
        atomic_savez(p, res.to_arrays())
        with self._lock:
            self._scan().add(safe_name(res.tile_id))

    def tile_ids(self) -> set[str]:
        with self._lock:
            return set(self._scan())

    def clear(self) -> None:
        for p in self.folder.glob("*.npz"):
            p.unlink(missing_ok=True)
        with self._lock:
            self._known = set()


def default_cache_root(source: str | os.PathLike[str] | None) -> Path:
    """Cache folder next to the data (``<data>.sigmma-cache``), else in the user cache.

    Falls back to ``$SIGMMA_CACHE`` or ``~/.cache/napari-sigmma/live`` when there is no
    source path or its folder is not writable.
    """
    if source:
        src = Path(source)
        cand = src.parent / f"{src.name}.sigmma-cache"
        try:
            cand.mkdir(parents=True, exist_ok=True)
            if os.access(cand, os.W_OK):
                return cand
        except OSError:
            pass
    base = os.environ.get("SIGMMA_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "napari-sigmma"
    return root / "live"


def iter_chunks(items: Iterable, size: int) -> Iterable[list]:
    """Consecutive lists of at most ``size`` items."""
    chunk: list = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
