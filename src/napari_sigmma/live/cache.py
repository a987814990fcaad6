"""Per-tile results of the encoders and the two caches that keep them (memory LRU, disk).

A :class:`TileResult` holds everything the live viewer draws for one tile: the HE
embeddings per scale and per crop, the ST embeddings, the graph encoder's node embeddings
and learned edges (in global cell indices), the last ViT block's attention and the predicted
genes. Results are plain float32 / int64 numpy arrays so that they go to disk as ``.npz``
files of plain arrays (loaded with ``allow_pickle=False``: never pickle).

Disk layout: ``<root>/<slide key>/<checkpoint hash>/<tile id>.npz``, written atomically
(temporary file, then rename), so a crash never leaves half a file and a second viewer on
the same data reads what the first wrote.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_sigmma.files import atomic_savez

CACHE_FORMAT = 1
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class TileResult:
    """Everything the encoders produced for one tile (all float32 / int64 numpy).

    Attributes
    ----------
    tile_id
        The grid's tile id (``"r{row}_c{col}"``).
    index
        Index of the tile in its grid.
    he
        ``{scale: (D,)}`` HE embeddings (what the contrastive loss compares).
    he_crops
        ``(21, D)`` per-crop projected embeddings: 16 micro (row-major), 4 meso, 1 macro.
    st
        ``{scale: (D,)}`` ST (graph) embeddings, ``None`` when the tile has too few cells.
    nodes
        ``{scale: (n, D)}`` node embeddings of the graph encoder after each scale's layers.
    cell_index
        ``(n,)`` global cell indices (rows of the slide's cell table) of the nodes.
    cell_micro
        ``(n,)`` micro patch (0..15, ``4*row+col``) each node lies in.
    edges
        ``{scale: (pairs (E, 2) global cell indices, prob (E,))}``: proximity edges of
        ``G_micro`` (prob 1) and the edges the edge-addition layers added for meso / macro.
        Each undirected edge appears once.
    attention
        ``(heads, h, w)`` CLS→patch attention of the last block on the macro crop, or
        ``None`` (CNN backbone).
    genes_pred
        ``(G,)`` predicted log1p expression of the tile (gene head), or ``None``.
    genes_pred_micro
        ``(16, G)`` predicted expression per micro patch, or ``None``.
    """

    tile_id: str
    index: int
    he: dict[str, np.ndarray]
    he_crops: np.ndarray
    st: dict[str, np.ndarray] | None = None
    nodes: dict[str, np.ndarray] = field(default_factory=dict)
    cell_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cell_micro: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    edges: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    attention: np.ndarray | None = None
    genes_pred: np.ndarray | None = None
    genes_pred_micro: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        return int(self.cell_index.size)

    @property
    def nbytes(self) -> int:
        """Approximate memory held by the arrays."""
        total = self.he_crops.nbytes + self.cell_index.nbytes + self.cell_micro.nbytes
        total += sum(v.nbytes for v in self.he.values())
        total += sum(v.nbytes for v in (self.st or {}).values())
        total += sum(v.nbytes for v in self.nodes.values())
        total += sum(p.nbytes + q.nbytes for p, q in self.edges.values())
        for arr in (self.attention, self.genes_pred, self.genes_pred_micro):
            if arr is not None:
                total += arr.nbytes
        return int(total) + 512

    # -- plain-array form (what goes to disk) -------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat ``{name: array}`` of plain arrays; inverse of :meth:`from_arrays`.

        Gene predictions are left out on purpose: they come from the gene head, which can be
        refitted without changing the checkpoint, so they are recomputed on load (cheap).
        """
        meta = {
            "format": CACHE_FORMAT,
            "tile_id": self.tile_id,
            "index": int(self.index),
            "has_st": self.st is not None,
            "has_attention": self.attention is not None,
            "scales_he": list(self.he),
            "scales_nodes": list(self.nodes),
            "scales_edges": list(self.edges),
        }
        out: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
        for s, v in self.he.items():
            out[f"he__{s}"] = np.asarray(v, dtype=np.float32)
        out["he_crops"] = np.asarray(self.he_crops, dtype=np.float32)
        for s, v in (self.st or {}).items():
            out[f"st__{s}"] = np.asarray(v, dtype=np.float32)
        for s, v in self.nodes.items():
            out[f"nodes__{s}"] = np.asarray(v, dtype=np.float32)
        out["cell_index"] = np.asarray(self.cell_index, dtype=np.int64)
        out["cell_micro"] = np.asarray(self.cell_micro, dtype=np.int64)
        for s, (pairs, prob) in self.edges.items():
            out[f"edges__{s}__pairs"] = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
            out[f"edges__{s}__prob"] = np.asarray(prob, dtype=np.float32).reshape(-1)
        if self.attention is not None:
            out["attention"] = np.asarray(self.attention, dtype=np.float32)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> TileResult:
        """Rebuild a result from :meth:`to_arrays` output."""
        meta = json.loads(str(arrays["meta"][()]))
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache format {meta.get('format')} != {CACHE_FORMAT}")
        st = {s: arrays[f"st__{s}"] for s in meta["scales_he"] if f"st__{s}" in arrays}
        return cls(
            tile_id=str(meta["tile_id"]),
            index=int(meta["index"]),
            he={s: arrays[f"he__{s}"] for s in meta["scales_he"]},
            he_crops=arrays["he_crops"],
            st=st if meta["has_st"] else None,
            nodes={s: arrays[f"nodes__{s}"] for s in meta["scales_nodes"]},
            cell_index=arrays["cell_index"],
            cell_micro=arrays["cell_micro"],
            edges={
                s: (arrays[f"edges__{s}__pairs"], arrays[f"edges__{s}__prob"])
                for s in meta["scales_edges"]
            },
            attention=arrays["attention"] if meta["has_attention"] else None,
        )


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
