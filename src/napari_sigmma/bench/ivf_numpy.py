"""The hand-written numpy inverted file (IVF) the retrieval index used before faiss (issue 17),
kept only as the reference that ``napari-sigmma bench --scale`` measures side by side with
:class:`napari_sigmma.retrieval.index.EmbeddingIndex` (faiss IVF-Flat) on the same data and
queries. Not used by the plugin.

How it works: spherical k-means (a few Lloyd iterations on a random sample, 32 rows per list)
gives ``≈ sqrt(N)`` centroids; the stored rows are reordered so that each list is one
contiguous block; nprobe is calibrated on the data for recall@10 ≥ ``target_recall`` (at most
1/8 of the lists); a query scores the centroids, scans the best lists with numpy and keeps the
top-k. Rows added after training go to a tail merged once it reaches 1/8 of the rows. Its
``.npz`` files (``ivf_offsets``, ``ivf_tail_lists``) are the format before faiss, which
:meth:`EmbeddingIndex.load` still reads.

:class:`NumpyIVFIndex` subclasses :class:`EmbeddingIndex` (keys, adds, the build/query
thread protocol, validation and persistence are the faiss index's) and overrides only how
the IVF is trained, stored, searched and written. Its k-means and list assignment stay numpy
(not faiss), so the bench still measures the hand-written IVF.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from napari_sigmma.errors import CancelLike, check_cancel
from napari_sigmma.retrieval.index import (
    _KMEANS_ITERS,
    _SAMPLE_PER_LIST,
    IVF_MIN_SIZE,
    EmbeddingIndex,
    _calibrate,
    _normalise,
    _top_k,
)

__all__ = ["IVF_MIN_SIZE", "NumpyIVFIndex", "spherical_kmeans"]


def _dot(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``m @ v`` in one thread (numpy's own loop)."""
    return np.einsum("ij,j->i", m, v)


def _assign(x: np.ndarray, centroids: np.ndarray, *, cancel: CancelLike = None) -> np.ndarray:
    """Nearest (highest inner product) centroid of each row, by numpy in blocks of ≤ 32 MB
    scores (``cancel`` checked between blocks)."""
    out = np.empty(x.shape[0], dtype=np.int32)
    block = max(1024, 2**23 // max(1, centroids.shape[0]))
    ct = np.ascontiguousarray(centroids.T)
    for a in range(0, x.shape[0], block):
        check_cancel(cancel)
        out[a : a + block] = np.argmax(x[a : a + block] @ ct, axis=1)
    return out


def spherical_kmeans(
    x: np.ndarray,
    n_clusters: int,
    *,
    n_iter: int = _KMEANS_ITERS,
    seed: int = 0,
    cancel: CancelLike = None,
) -> np.ndarray:
    """Unit-norm centroids of L2-normalised rows ``x`` by numpy Lloyd iterations on the
    sphere (the faiss index uses faiss's k-means instead).

    Starts from ``n_clusters`` distinct random rows; an emptied cluster is reseeded with a
    random row. ``cancel`` is checked between iterations and assignment blocks
    (:class:`~napari_sigmma.errors.Cancelled` when it says stop).
    """
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    n_clusters = min(int(n_clusters), n)
    c = x[rng.choice(n, n_clusters, replace=False)].copy()
    for _ in range(n_iter):
        check_cancel(cancel)
        lab = _assign(x, c, cancel=cancel)
        counts = np.bincount(lab, minlength=n_clusters)
        order = np.argsort(lab, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        full = np.flatnonzero(counts)
        sums = np.zeros_like(c)
        # reduceat over the sorted rows sums each non-empty cluster's block
        sums[full] = np.add.reduceat(x[order], starts[full], axis=0)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            sums[empty] = x[rng.choice(n, empty.size, replace=False)]
        c = _normalise(sums)
    return c


def _offsets(lists: np.ndarray, n_lists: int) -> np.ndarray:
    """Start of every list (and the end of the last) in rows sorted by list."""
    counts = np.bincount(lists, minlength=n_lists)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class NumpyIVFIndex(EmbeddingIndex):
    """:class:`~napari_sigmma.retrieval.index.EmbeddingIndex` with the hand-written numpy
    IVF instead of faiss's; thread-safe in the same way.

    Parameters are the base class's (``use_faiss`` is accepted and ignored there: exact
    search is numpy's). Training reorders the stored rows so that each list is one
    contiguous block: rows ``[0, _n_indexed)`` are sorted by list (list ``l`` is rows
    ``_offsets[l]:_offsets[l + 1]``), rows ``[_n_indexed, N)`` are the tail, each in the list
    ``_tail_lists`` gives it (assigned when the rows are absorbed). ``_ivf`` holds the
    searched state as one tuple ``(centroids, offsets, tail_lists)``, replaced (never changed
    in place) whenever the tail grows or a build installs, so a query's snapshot of it under
    the lock stays consistent without the lock. A build trains on a snapshot outside the
    lock and installs the reordered arrays at the end; rows added meanwhile join the new
    lists' tail.
    """

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, **kwargs)
        self._offsets = np.zeros(1, dtype=np.int64)
        self._tail_lists = np.zeros(0, dtype=np.int32)

    def _install(
        self, centroids: np.ndarray, offsets: np.ndarray, n_sorted: int, tail: np.ndarray
    ) -> None:
        """Set the IVF state (caller holds the lock)."""
        self._centroids, self._offsets, self._n_indexed = centroids, offsets, n_sorted
        self._tail_lists = tail.astype(np.int32, copy=False)
        self._ivf = (centroids, offsets, self._tail_lists)

    def _absorb(self) -> None:
        """Append pending rows; with an IVF, new rows join their nearest list's tail. Only
        ever appends, so a build's snapshot stays a prefix of the stored rows."""
        n_old = self._matrix.shape[0]
        super()._absorb()
        if self._centroids is not None and self._matrix.shape[0] > n_old:
            new = _assign(self._matrix[n_old:], self._centroids)
            tail = np.concatenate([self._tail_lists, new])
            self._install(self._centroids, self._offsets, self._n_indexed, tail)

    def _lists_of_rows(self) -> np.ndarray:
        """The list of every stored row."""
        sizes = np.diff(self._offsets)
        return np.concatenate(
            [np.repeat(np.arange(sizes.size, dtype=np.int32), sizes), self._tail_lists]
        )

    def _train_arrays(
        self, x: np.ndarray, cancel: CancelLike
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """IVF of the rows ``x`` (no lock needed; nothing of ``self`` changes): centroids,
        the row order that sorts ``x`` by list, list offsets, calibrated nprobe."""
        n = x.shape[0]
        n_lists = min(int(self.n_lists or max(16, round(math.sqrt(n)))), n)
        rng = np.random.default_rng(self.seed)
        sample = x[np.sort(rng.choice(n, min(n, n_lists * _SAMPLE_PER_LIST), replace=False))]
        centroids = spherical_kmeans(sample, n_lists, seed=self.seed, cancel=cancel)
        del sample
        lists = _assign(x, centroids, cancel=cancel)
        order = np.argsort(lists, kind="stable")
        offsets = _offsets(lists, centroids.shape[0])
        sorted_lists = lists[order]
        del lists
        auto = _calibrate(x[order], sorted_lists, centroids, rng, self.target_recall, cancel=cancel)
        return centroids, order, offsets, auto

    # the build steps of EmbeddingIndex._build (which holds the locks and records builds)
    def _build_snapshot(self, work: str) -> tuple[Any, ...]:
        old_lists = self._lists_of_rows() if work == "merge" else None
        return (self._matrix, self._tile_ids, self._slide_ids, old_lists, self._centroids)

    def _build_arrays(self, work: str, snapshot: tuple[Any, ...], cancel: CancelLike) -> Any:
        """Train, or merge the tail (re-sort the rows by list, same centroids), and reorder
        the snapshot's rows by list, without the lock."""
        x, tiles, slides, old_lists, centroids = snapshot
        auto = 0
        if work == "train":
            centroids, order, offsets, auto = self._train_arrays(x, cancel)
        else:
            assert old_lists is not None and centroids is not None
            order = np.argsort(old_lists, kind="stable")
            offsets = _offsets(old_lists, centroids.shape[0])
        check_cancel(cancel)
        return work, centroids, offsets, x[order], tiles[order], slides[order], auto

    def _build_install(self, n0: int, result: Any) -> int:
        """Install the reordered rows; rows added during the build join the tail."""
        work, centroids, offsets, x_new, tiles_new, slides_new, auto = result
        self._absorb()
        if self._matrix.shape[0] > n0:  # rows added during the build
            x_new = np.concatenate([x_new, self._matrix[n0:]])
            tiles_new = np.concatenate([tiles_new, self._tile_ids[n0:]])
            slides_new = np.concatenate([slides_new, self._slide_ids[n0:]])
        if work == "train":
            tail = _assign(x_new[n0:], centroids)
        else:  # same centroids: the late rows keep the lists _absorb gave them
            tail = self._tail_lists[n0 - self._n_indexed :]
        self._matrix, self._tile_ids, self._slide_ids = x_new, tiles_new, slides_new
        self._install(centroids, offsets, n0, tail)
        return int(auto)

    @staticmethod
    def _search_ivf(
        ivf: Any, matrix: np.ndarray, n_idx: int, q: np.ndarray, k: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and cosines of the top-``k`` of ``q`` among the ``nprobe`` lists whose
        centroids score best (``ivf``: the ``_ivf`` snapshot; rows ``[0, n_idx)`` sorted by
        list, the rest in its tail), all scanned with numpy."""
        centroids, off, tail_lists = ivf
        v = q[0]
        # einsum, not BLAS: OpenBLAS splits these small products over threads, and on a
        # busy machine waiting for the second thread costs far more than the product
        order = np.argsort(-_dot(centroids, v))
        p = int(min(max(1, nprobe), order.size))
        # probe more lists when the chosen ones hold fewer than k rows
        cum = np.cumsum(np.diff(off)[order])
        if cum[p - 1] < k:
            p = min(order.size, int(np.searchsorted(cum, k)) + 1)
        lists = order[:p]
        parts_s, parts_i = [], []
        for lst in np.sort(lists):  # in row order: sequential reads
            a, b = off[lst], off[lst + 1]
            if b > a:
                parts_s.append(_dot(matrix[a:b], v))
                parts_i.append(np.arange(a, b))
        if tail_lists.size:
            rows = n_idx + np.flatnonzero(np.isin(tail_lists, lists))
            parts_s.append(_dot(matrix[rows], v))
            parts_i.append(rows)
        sims = np.concatenate(parts_s)
        cand = np.concatenate(parts_i)
        top = _top_k(sims, k)
        return cand[top], sims[top]

    # -- persistence: the numpy IVF's own format (read back by EmbeddingIndex.load too) ----
    def _ivf_arrays(self) -> dict[str, np.ndarray]:
        """No ``index_format`` mark; sorted rows' ``ivf_offsets`` and ``ivf_tail_lists``."""
        if self._centroids is None:
            return {}
        state = [self._n_indexed, self._n_trained, self._auto_nprobe]
        return {
            "ivf_centroids": self._centroids,
            "ivf_offsets": self._offsets,
            "ivf_tail_lists": self._tail_lists,
            "ivf_state": np.array(state, np.int64),
        }

    def _read_ivf(self, z: Any) -> None:
        """Install the IVF written by :meth:`_ivf_arrays` as it is (no retraining)."""
        n = self._matrix.shape[0]
        cent = z["ivf_centroids"].astype(np.float32, copy=False)
        off = z["ivf_offsets"].astype(np.int64, copy=False)
        tail = z["ivf_tail_lists"].astype(np.int32, copy=False)
        n_sorted, n_trained, auto = (int(v) for v in z["ivf_state"])
        if (
            cent.ndim != 2
            or cent.shape[1] != self._matrix.shape[1]
            or off.shape != (cent.shape[0] + 1,)
            or off[0] != 0
            or off[-1] != n_sorted
            or np.any(np.diff(off) < 0)
            or n_sorted + tail.size != n
            or (tail.size and (tail.min() < 0 or tail.max() >= cent.shape[0]))
        ):
            raise ValueError("inconsistent IVF arrays")
        self._install(cent, off, n_sorted, tail)
        self._n_trained, self._auto_nprobe = n_trained, auto
