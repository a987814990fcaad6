"""The per-tile result of the encoders: what the live view draws, the caches keep and the
retrieval and analysis steps read.

Plain float32 / int64 numpy arrays, so a result goes to disk as an ``.npz`` of plain arrays
(loaded with ``allow_pickle=False``: never pickle). ``CACHE_FORMAT`` is written into every
cached file: bump it whenever what the encoders compute for a checkpoint changes (a cache
written before is then rebuilt, never misread).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

CACHE_FORMAT = 1


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
