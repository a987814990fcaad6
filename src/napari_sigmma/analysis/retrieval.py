"""Cross-modal retrieval index over tile embeddings (HE→ST and ST→HE queries).

Exact cosine search in numpy (a matrix-vector product and ``argpartition``), or faiss's
``IndexFlatIP`` when faiss is installed. Persisted as ``.npz`` without pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from napari_sigmma.errors import SigmmaError


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class EmbeddingIndex:
    """A growing, exact cosine-similarity index.

    Parameters
    ----------
    dim
        Embedding dimension.
    use_faiss
        ``None`` uses faiss when it can be imported.

    Notes
    -----
    Keys are ``(slide, tile_id)`` pairs stored as two arrays, so a query returns where each
    match lives. Appends go to a list of chunks that are concatenated lazily at the next
    query, which keeps adding tiles one batch at a time cheap.
    """

    def __init__(self, dim: int, *, use_faiss: bool | None = None) -> None:
        self.dim = int(dim)
        self._chunks: list[np.ndarray] = []
        self._slides: list[np.ndarray] = []
        self._tiles: list[np.ndarray] = []
        self._matrix = np.zeros((0, self.dim), np.float32)
        self._slide_ids = np.zeros(0, dtype=np.int32)
        self._tile_ids = np.zeros(0, dtype=np.int64)
        self.slide_names: list[str] = []
        self._faiss = None
        if use_faiss is None or use_faiss:
            try:
                import faiss  # type: ignore[import-not-found]

                self._faiss = faiss.IndexFlatIP(self.dim)
            except ImportError:
                if use_faiss:
                    raise SigmmaError("faiss was requested but is not installed") from None

    def __len__(self) -> int:
        return int(self._matrix.shape[0] + sum(c.shape[0] for c in self._chunks))

    def _slide_index(self, slide: str) -> int:
        if slide not in self.slide_names:
            self.slide_names.append(slide)
        return self.slide_names.index(slide)

    def add(self, slide: str, tile_ids: np.ndarray, embeddings: np.ndarray) -> None:
        """Add the embeddings of ``tile_ids`` of ``slide`` (rows L2-normalised here)."""
        emb = _normalise(embeddings)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise SigmmaError(f"embeddings of shape {emb.shape} do not match index dim {self.dim}")
        if not np.all(np.isfinite(emb)):
            raise SigmmaError(f"embeddings for slide {slide!r} contain NaN or inf")
        ids = np.asarray(tile_ids, dtype=np.int64).reshape(-1)
        if ids.shape[0] != emb.shape[0]:
            raise SigmmaError("tile_ids and embeddings differ in length")
        self._chunks.append(emb)
        self._tiles.append(ids)
        self._slides.append(np.full(ids.shape[0], self._slide_index(slide), np.int32))
        if self._faiss is not None:
            self._faiss.add(emb)

    def _consolidate(self) -> None:
        if self._chunks:
            self._matrix = np.concatenate([self._matrix, *self._chunks])
            self._tile_ids = np.concatenate([self._tile_ids, *self._tiles])
            self._slide_ids = np.concatenate([self._slide_ids, *self._slides])
            self._chunks, self._tiles, self._slides = [], [], []

    def query(self, vector: np.ndarray, k: int = 10) -> list[tuple[str, int, float]]:
        """Top-``k`` matches of one query vector as ``(slide, tile_id, cosine)``, best first."""
        self._consolidate()
        n = self._matrix.shape[0]
        if n == 0:
            return []
        q = _normalise(np.asarray(vector).reshape(1, -1))
        k = min(int(k), n)
        if self._faiss is not None:
            sims, idx = self._faiss.search(q, k)
            idx, top = idx[0], sims[0]
        else:
            sims = self._matrix @ q[0]
            idx = np.argpartition(-sims, k - 1)[:k] if k < n else np.arange(n)
            idx = idx[np.argsort(-sims[idx], kind="stable")]
            top = sims[idx]
        return [
            (self.slide_names[self._slide_ids[i]], int(self._tile_ids[i]), float(s))
            for i, s in zip(idx, top, strict=True)
        ]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to ``path`` (``.npz``, no pickle), atomically."""
        self._consolidate()
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            matrix=self._matrix,
            tile_ids=self._tile_ids,
            slide_ids=self._slide_ids,
            slide_names=np.array(self.slide_names, dtype=np.str_),
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, use_faiss: bool | None = None) -> EmbeddingIndex:
        """Read an index written by :meth:`save`; never unpickles."""
        try:
            with np.load(path, allow_pickle=False) as z:
                matrix = z["matrix"]
                index = cls(matrix.shape[1], use_faiss=use_faiss)
                index.slide_names = [str(s) for s in z["slide_names"]]
                index._matrix = matrix.astype(np.float32, copy=False)
                index._tile_ids = z["tile_ids"]
                index._slide_ids = z["slide_ids"]
        except (OSError, KeyError, ValueError) as err:
            raise SigmmaError(f"not a retrieval index ({err})", path=path) from err
        if index._faiss is not None and len(index):
            index._faiss.add(index._matrix)
        return index
