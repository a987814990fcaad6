"""Cross-modal retrieval index over tile embeddings (HE→ST and ST→HE queries).

Small indices are searched exactly with numpy (a matrix-vector product and
``argpartition``: on a single query it beats faiss's flat index with default threading,
issue 17). From ``ivf_min_size`` (default 50,000) stored embeddings on, queries go through
a faiss inverted file (``IndexIVFFlat``, inner product on L2-normalised rows = cosine):

- **Training** (lazily, at the first query once the index is big enough, or ahead of
  queries by :meth:`EmbeddingIndex.ensure_built` / :meth:`EmbeddingIndex.build_ivf`, e.g.
  in a worker thread; queries meanwhile search the previous IVF or exactly): faiss's
  spherical k-means on a random sample (32 rows per list, 8 iterations) gives
  ``≈ sqrt(N)`` coarse centroids; every stored vector is assigned to its nearest centroid
  (in blocks, ``cancel`` checked between them) and added to that list with its row number
  as id.
- **nprobe** is calibrated on the data at training: 200 stored vectors are queried
  leave-one-out against the exact top-10 within a random subset of ≤ 200,000 rows (sparser
  than the index, so the estimate errs on the safe side), and the smallest number of probed
  lists whose recall@10 reaches ``target_recall`` (0.99; at least 8 lists) is kept, capped at
  1/8 of the lists. On embeddings with structure (tiles of slides cluster by tissue) that is
  about 1% of the lists; on structureless isotropic noise the cap is hit and recall is much
  lower (see :func:`napari_sigmma.bench.scale.retrieval_scale`).
- **Query**: faiss searches the ``nprobe`` best lists (one OpenMP thread: a single query is
  too small to share, and on a busy machine waiting for a second thread costs more than the
  search), numpy scans the rows added since the last build (the tail), and the two top-k
  lists are merged. When the probed lists hold fewer than ``k`` rows, more are probed.
  ``query(..., exact=True)`` always scans everything with numpy.
- **Growth**: rows added after training stay in the tail until it reaches 1/8 of the
  indexed rows; then a copy of the faiss index gets them (a "merge": no retraining). The
  quantiser is retrained when the index has doubled since training. An index made with
  ``build_in_query=False`` leaves both to :meth:`EmbeddingIndex.ensure_built`.
- **Threads**: adds, queries and one build at a time may run in different threads; the
  build works on a snapshot (and on a copy of the faiss index) without holding the index's
  lock, and installs the result at the end. An installed faiss index is never changed, so
  queries search it without the lock.

Persisted as ``.npz`` without pickle: the matrix, the keys and, when trained, the centroids
and each indexed row's list (``ivf_row_lists``), so loading rebuilds the faiss index without
retraining or reassigning. Files of the numpy IVF used before faiss (sorted rows with
``ivf_offsets`` and ``ivf_tail_lists``) load the same way; files written before any IVF load
as untrained indices and train at their first query.
"""

from __future__ import annotations

import math
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from napari_sigmma.errors import CancelLike, SigmmaError, check_cancel
from napari_sigmma.files import atomic_savez

IVF_MIN_SIZE = 50_000
"""Indices with at least this many embeddings are searched through the IVF by default."""

INDEX_FORMAT = 2
"""``index_format`` written by :meth:`EmbeddingIndex.save` (1: the numpy IVF's sorted rows)."""

_CAL_K = 10  # nprobe is calibrated for top-10
_SAMPLE_PER_LIST = 32  # k-means training points per list
_CAL_ROWS = 200_000  # rows the nprobe calibration searches
_KMEANS_ITERS = 8
_MAX_PROBE_FRACTION = 1 / 8
_ADD_BLOCK = 65_536  # rows per assignment / add block (cancel is checked between blocks)


def _faiss() -> Any:
    import faiss  # type: ignore[import-not-found]

    return faiss


class _OneThread:
    """faiss's OpenMP threads of the calling thread set to one for a block (the setting is
    per calling thread, so a build in another thread keeps its threads)."""

    def __enter__(self) -> None:
        faiss = _faiss()
        self._prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        _faiss().omp_set_num_threads(self._prev)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _assign(x: np.ndarray, centroids: np.ndarray, *, cancel: CancelLike = None) -> np.ndarray:
    """Nearest (highest inner product) centroid of each row (int64), by faiss in blocks
    (``cancel`` checked between blocks)."""
    faiss = _faiss()
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty(x.shape[0], dtype=np.int64)
    for a in range(0, x.shape[0], _ADD_BLOCK):
        check_cancel(cancel)
        out[a : a + _ADD_BLOCK] = quantizer.search(np.ascontiguousarray(x[a : a + _ADD_BLOCK]), 1)[
            1
        ][:, 0]
    return out


def spherical_kmeans(
    x: np.ndarray,
    n_clusters: int,
    *,
    n_iter: int = _KMEANS_ITERS,
    seed: int = 0,
    cancel: CancelLike = None,
) -> np.ndarray:
    """Unit-norm centroids of L2-normalised rows ``x`` by faiss's spherical k-means (Lloyd
    iterations on the sphere, seeded; an emptied cluster is split from a big one).

    ``cancel`` is checked before and after the k-means
    (:class:`~napari_sigmma.errors.Cancelled` when it says stop).
    """
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_clusters = min(int(n_clusters), x.shape[0])
    check_cancel(cancel)
    km = faiss.Kmeans(
        x.shape[1],
        n_clusters,
        niter=int(n_iter),
        spherical=True,
        seed=int(seed),
        max_points_per_centroid=1 << 30,  # the caller samples
        min_points_per_centroid=1,
        verbose=False,
    )
    km.train(x)
    check_cancel(cancel)
    return _normalise(km.centroids)


def _exact_topk_rows(
    q: np.ndarray, x: np.ndarray, k: int, *, exclude: np.ndarray, cancel: CancelLike = None
) -> np.ndarray:
    """Rows of ``x`` with the ``k`` highest inner products with each row of ``q`` (row
    ``exclude[j]`` left out for query ``j``), by blocks; after the first block only scores
    above each query's running k-th best are kept, so the cost is the products."""
    m = q.shape[0]
    best_s = np.zeros((m, 0), np.float32)
    best_i = np.zeros((m, 0), np.int64)
    block = max(4096, 2**23 // max(1, m))
    for a in range(0, x.shape[0], block):
        check_cancel(cancel)
        s = q @ x[a : a + block].T
        own = (exclude >= a) & (exclude < a + s.shape[1])
        s[np.flatnonzero(own), exclude[own] - a] = -np.inf
        if a == 0:  # the first block (≥ k + 1 columns): plain top-k
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            ps = np.take_along_axis(s, part, 1)
            o = np.argsort(-ps, axis=1, kind="stable")
            best_s, best_i = np.take_along_axis(ps, o, 1), np.take_along_axis(part, o, 1)
            continue
        r, c = np.nonzero(s > best_s[:, -1:])
        cand_r = np.concatenate([np.repeat(np.arange(m), best_s.shape[1]), r])
        cand_s = np.concatenate([best_s.ravel(), s[r, c]])
        cand_i = np.concatenate([best_i.ravel(), c + a])
        order = np.lexsort((-cand_s, cand_r))
        cand_r, cand_s, cand_i = cand_r[order], cand_s[order], cand_i[order]
        first = np.searchsorted(cand_r, np.arange(m))
        rank = np.arange(cand_r.size) - first[cand_r]
        keep = rank < k
        width = int(min(k, np.bincount(cand_r[keep], minlength=m).min()))
        keep &= rank < width
        best_s = cand_s[keep].reshape(m, width)
        best_i = cand_i[keep].reshape(m, width)
    return best_i


def _calibrate(
    x: np.ndarray,
    row_lists: np.ndarray,
    c: np.ndarray,
    rng: np.random.Generator,
    target_recall: float,
    n_queries: int = 200,
    cancel: CancelLike = None,
) -> int:
    """Smallest nprobe whose leave-one-out recall@10 on sampled rows meets the target."""
    n_lists = c.shape[0]
    # ground truth within a random subset of rows: its neighbours are farther apart than
    # in the whole index, so the nprobe found is on the safe side, at a bounded cost
    n_all = x.shape[0]
    sub = np.sort(rng.choice(n_all, min(n_all, _CAL_ROWS), replace=False))
    xs, sub_lists = x[sub], row_lists[sub]
    n = xs.shape[0]
    k = min(_CAL_K, n - 1)
    if k < 1:
        return n_lists
    qi = np.sort(rng.choice(n, min(n_queries, n), replace=False))
    q = xs[qi]
    rows = np.arange(qi.size)
    best_i = _exact_topk_rows(q, xs, k, exclude=qi, cancel=cancel)
    nb_lists = sub_lists[best_i]
    # rank of every list by centroid score, per query
    order = np.argsort(-(q @ c.T), axis=1)
    rank = np.empty_like(order)
    rank[rows[:, None], order] = np.arange(n_lists)[None, :]
    needed = np.sort(rank[rows[:, None], nb_lists].ravel())
    p = int(needed[max(0, math.ceil(target_recall * needed.size) - 1)]) + 1
    cap = max(min(8, n_lists), int(n_lists * _MAX_PROBE_FRACTION))
    return int(min(max(p, min(8, n_lists)), cap))


def _new_ivf(centroids: np.ndarray) -> Any:
    """An empty faiss ``IndexIVFFlat`` (inner product) over fixed ``centroids``."""
    faiss = _faiss()
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ivf = faiss.IndexIVFFlat(
        quantizer, centroids.shape[1], centroids.shape[0], faiss.METRIC_INNER_PRODUCT
    )
    ivf.is_trained = True  # the quantiser is set: nothing for faiss to train
    return ivf


def _add_rows(
    ivf: Any, x: np.ndarray, first_row: int, lists: np.ndarray, cancel: CancelLike = None
) -> None:
    """Add rows ``x`` (ids ``first_row, first_row + 1, …``) to the lists ``lists`` of
    ``ivf`` without reassigning them, in blocks (``cancel`` checked between blocks)."""
    faiss = _faiss()
    for a in range(0, x.shape[0], _ADD_BLOCK):
        check_cancel(cancel)
        xb = np.ascontiguousarray(x[a : a + _ADD_BLOCK], dtype=np.float32)
        ids = np.arange(first_row + a, first_row + a + xb.shape[0], dtype=np.int64)
        lb = np.ascontiguousarray(lists[a : a + _ADD_BLOCK], dtype=np.int64)
        ivf.add_core(xb.shape[0], faiss.swig_ptr(xb), faiss.swig_ptr(ids), faiss.swig_ptr(lb))


def _top_k(sims: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest of ``sims``, best first (ties by position)."""
    k = min(k, sims.size)
    top = np.argpartition(-sims, k - 1)[:k] if k < sims.size else np.arange(sims.size)
    return top[np.argsort(-sims[top], kind="stable")]


class EmbeddingIndex:
    """A growing cosine-similarity index: exact when small, faiss IVF when big; thread-safe.

    Parameters
    ----------
    dim
        Embedding dimension.
    use_faiss
        Accepted for compatibility and ignored: exact search is numpy's, the IVF is faiss's.
    ivf_min_size
        From this many stored embeddings on, queries use the IVF (trained at the next query,
        or by :meth:`ensure_built`). ``None`` never trains one by itself (queries stay exact
        unless :meth:`build_ivf` is called).
    n_lists
        Number of IVF lists; ``None``: ``round(sqrt(N))`` at training (at least 16).
    nprobe
        Lists searched per query; ``None``: calibrated at training (see module notes).
    target_recall
        Recall@10 the nprobe calibration aims for.
    seed
        Seed of the training sample, k-means and calibration.
    build_in_query
        ``True``: a query that finds the IVF missing or out of date trains it (or merges its
        tail) first, in the querying thread. ``False``: queries never build; they search the
        previous IVF (new rows in its tail) or, before the first build, exactly, until
        :meth:`ensure_built` runs (the viewer calls it in a worker thread).

    Notes
    -----
    Keys are ``(slide, tile_id)`` pairs stored as two arrays, so a query returns where each
    match lives; the faiss ids are row numbers. Appends go to a list of chunks that are
    concatenated lazily at the next query, which keeps adding tiles one batch at a time
    cheap; stored rows are never reordered.

    Threads: one lock guards the stored arrays and the IVF state, and is held only for short
    bookkeeping; stored arrays are never changed in place (rows are appended by
    concatenation) and an installed faiss index is never changed (a build makes a new one
    or adds to a copy), so a query searches what it saw under the lock without holding it.
    A build (one at a time) works outside the lock and installs its result at the end; rows
    added meanwhile stay in the tail. A query during a build therefore never waits for it:
    it searches the previous IVF or, without one, every row exactly.
    """

    def __init__(
        self,
        dim: int,
        *,
        use_faiss: bool | None = None,
        ivf_min_size: int | None = IVF_MIN_SIZE,
        n_lists: int | None = None,
        nprobe: int | None = None,
        target_recall: float = 0.99,
        seed: int = 0,
        build_in_query: bool = True,
    ) -> None:
        del use_faiss  # kept for callers of the earlier signature
        self.dim = int(dim)
        self.ivf_min_size = ivf_min_size
        self.n_lists = n_lists
        self.nprobe = nprobe
        self.target_recall = float(target_recall)
        self.seed = int(seed)
        self.build_in_query = bool(build_in_query)
        self._lock = threading.RLock()  # stored arrays and IVF state
        self._build_lock = threading.Lock()  # one build (train or tail merge) at a time
        self._chunks: list[np.ndarray] = []
        self._slides: list[np.ndarray] = []
        self._tiles: list[np.ndarray] = []
        self._matrix = np.zeros((0, self.dim), np.float32)
        self._slide_ids = np.zeros(0, dtype=np.int32)
        self._tile_ids = np.zeros(0, dtype=np.int64)
        self.slide_names: list[str] = []
        # IVF state: rows [0, _n_indexed) are in the faiss index _ivf, row r in list
        # _row_lists[r]; rows [_n_indexed, N) are the tail, searched exactly.
        self._ivf: Any = None
        self._centroids: np.ndarray | None = None
        self._row_lists = np.zeros(0, dtype=np.int32)
        self._n_indexed = 0
        self._n_trained = 0
        self._auto_nprobe = 0
        self.build_seconds = 0.0
        #: one dict per finished build: ``{"kind": "train"|"merge", "thread": name,
        #: "rows": n, "seconds": s}`` (which thread built is what the viewer tests check)
        self.builds: list[dict[str, object]] = []

    def __len__(self) -> int:
        with self._lock:
            return int(self._matrix.shape[0] + sum(c.shape[0] for c in self._chunks))

    @property
    def is_ivf(self) -> bool:
        """Whether an IVF is trained (queries of an up-to-date index use it)."""
        return self._centroids is not None

    @property
    def ivf_lists(self) -> int:
        """Number of IVF lists (0 when untrained)."""
        c = self._centroids
        return 0 if c is None else int(c.shape[0])

    @property
    def effective_nprobe(self) -> int:
        """Lists searched per IVF query: ``nprobe`` if set, else the calibrated value."""
        p = self.nprobe if self.nprobe is not None else self._auto_nprobe
        return int(min(max(1, p), max(1, self.ivf_lists)))

    @property
    def building(self) -> bool:
        """Whether a build (IVF training or tail merge) is running in some thread."""
        return self._build_lock.locked()

    @property
    def last_build_thread(self) -> str | None:
        """Name of the thread that ran the last finished build (``None``: none yet)."""
        return str(self.builds[-1]["thread"]) if self.builds else None

    def _slide_index(self, slide: str) -> int:
        if slide not in self.slide_names:
            self.slide_names.append(slide)
        return self.slide_names.index(slide)

    def add(self, slide: str, tile_ids: np.ndarray, embeddings: np.ndarray) -> None:
        """Add the embeddings of ``tile_ids`` of ``slide`` (rows L2-normalised here)."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise SigmmaError(f"embeddings of shape {emb.shape} do not match index dim {self.dim}")
        if not np.all(np.isfinite(emb)):
            raise SigmmaError(f"embeddings for slide {slide!r} contain NaN or inf")
        emb = _normalise(emb)
        ids = np.asarray(tile_ids, dtype=np.int64).reshape(-1)
        if ids.shape[0] != emb.shape[0]:
            raise SigmmaError("tile_ids and embeddings differ in length")
        with self._lock:
            self._chunks.append(emb)
            self._tiles.append(ids)
            self._slides.append(np.full(ids.shape[0], self._slide_index(slide), np.int32))

    # -- maintenance (callers hold self._lock unless said otherwise) ---------------------------
    def _absorb(self) -> None:
        """Concatenate the pending chunks onto the matrix (only ever appends, so a build's
        snapshot stays a prefix of the stored rows)."""
        if self._chunks:
            self._matrix = np.concatenate([self._matrix, *self._chunks])
            self._tile_ids = np.concatenate([self._tile_ids, *self._tiles])
            self._slide_ids = np.concatenate([self._slide_ids, *self._slides])
            self._chunks, self._tiles, self._slides = [], [], []

    def _pending_work(self, extra: int = 0) -> str | None:
        """``"train"``, ``"merge"`` (the tail is too long) or ``None``, for the stored rows
        plus ``extra`` more."""
        n = self._matrix.shape[0] + sum(c.shape[0] for c in self._chunks) + int(extra)
        if self._centroids is None:
            if self.ivf_min_size is not None and n >= max(1, self.ivf_min_size):
                return "train"
            return None
        if n >= 2 * self._n_trained:  # grown a lot: the lists no longer fit the data
            return "train"
        if n - self._n_indexed > max(4096, self._n_indexed // 8):
            return "merge"
        return None

    def needs_build(self, extra: int = 0) -> bool:
        """Whether the index (with ``extra`` more rows) wants an IVF build or a tail merge,
        i.e. whether :meth:`ensure_built` would do something. Cheap: nothing is computed."""
        with self._lock:
            return self._pending_work(extra) is not None

    def _train(self, x: np.ndarray, cancel: CancelLike) -> tuple[np.ndarray, np.ndarray, int]:
        """Centroids, the list of every row of ``x`` and the calibrated nprobe (no lock
        needed; nothing of ``self`` changes)."""
        n = x.shape[0]
        n_lists = self.n_lists or max(16, round(math.sqrt(n)))
        n_lists = min(int(n_lists), n)
        rng = np.random.default_rng(self.seed)
        m = min(n, n_lists * _SAMPLE_PER_LIST)
        sample = x[np.sort(rng.choice(n, m, replace=False))]
        centroids = spherical_kmeans(sample, n_lists, seed=self.seed, cancel=cancel)
        del sample
        lists = _assign(x, centroids, cancel=cancel)
        auto = _calibrate(x, lists, centroids, rng, self.target_recall, cancel=cancel)
        return centroids, lists, auto

    def _build(self, cancel: CancelLike, *, force: bool, wait: bool) -> bool:
        """Train (``force``: always) or merge the tail, if needed, in this thread; the
        lock is held only to take the snapshot and to install the result. Returns False
        without doing anything when nothing is needed, or when another thread is building
        and ``wait`` is False."""
        if not self._build_lock.acquire(blocking=wait):
            return False
        try:
            with self._lock:
                self._absorb()
                work = "train" if force else self._pending_work()
                if work is None:
                    return False
                n0 = self._matrix.shape[0]
                if n0 == 0:
                    raise SigmmaError("cannot build an IVF over an empty retrieval index")
                snapshot = self._build_snapshot(work)
            check_cancel(cancel)
            t0 = time.perf_counter()
            result = self._build_arrays(work, snapshot, cancel)
            check_cancel(cancel)
            seconds = time.perf_counter() - t0
            with self._lock:
                auto = self._build_install(n0, result)
                if work == "train":
                    self._n_trained, self._auto_nprobe = n0, auto
                    self.build_seconds = seconds
                self.builds.append(
                    {
                        "kind": work,
                        "thread": threading.current_thread().name,
                        "rows": n0,
                        "seconds": seconds,
                    }
                )
            return True
        finally:
            self._build_lock.release()

    # the three steps of a build (overridden by the numpy IVF of the bench)
    def _build_snapshot(self, work: str) -> tuple[Any, ...]:
        """What a build of ``work`` needs, taken under the lock (nothing is copied)."""
        return (self._matrix, self._ivf, self._centroids, self._n_indexed, self._row_lists)

    def _build_arrays(self, work: str, snapshot: tuple[Any, ...], cancel: CancelLike) -> Any:
        """The build's work, without the lock: train (a new faiss index) or merge (a copy of
        the installed one gets the tail). Returns what :meth:`_build_install` installs."""
        x, old_ivf, centroids, n_idx, row_lists = snapshot
        n0 = x.shape[0]
        auto = 0  # calibrated at training only
        if work == "train":
            centroids, lists, auto = self._train(x, cancel)
            ivf = _new_ivf(centroids)
            _add_rows(ivf, x, 0, lists, cancel)
            row_lists = lists.astype(np.int32)
        else:  # same centroids: a copy of the index gets the tail
            assert old_ivf is not None and centroids is not None
            lists = _assign(x[n_idx:n0], centroids, cancel=cancel)
            ivf = _faiss().clone_index(old_ivf)
            _add_rows(ivf, x[n_idx:n0], n_idx, lists, cancel)
            row_lists = np.concatenate([row_lists, lists.astype(np.int32)])
        return ivf, centroids, row_lists, auto

    def _build_install(self, n0: int, result: Any) -> int:
        """Install a build's result over the first ``n0`` rows (caller holds the lock; rows
        added during the build stay in the tail); returns the calibrated nprobe."""
        ivf, centroids, row_lists, auto = result
        self._ivf, self._centroids, self._row_lists = ivf, centroids, row_lists
        self._n_indexed = n0
        return int(auto)

    def ensure_built(self, cancel: CancelLike = None, *, wait: bool = True) -> bool:
        """Do now, in this thread, the IVF work a query would otherwise do: train the IVF
        when the index has reached ``ivf_min_size`` (or doubled since training), or merge a
        long tail. Queries from other threads meanwhile do not wait (see class notes).

        Parameters
        ----------
        cancel
            Checked between k-means, assignment and add blocks; when it says stop,
            :class:`~napari_sigmma.errors.Cancelled` is raised and the index is unchanged.
        wait
            When another thread is building: wait for it, then check again (``True``), or
            return at once (``False``).

        Returns
        -------
        bool
            Whether a build ran here.
        """
        return self._build(cancel, force=False, wait=wait)

    def build_ivf(self, cancel: CancelLike = None) -> float:
        """Train (or retrain) the IVF now on everything stored; returns the seconds taken.

        ``cancel`` as in :meth:`ensure_built`.

        Raises
        ------
        SigmmaError
            If the index is empty.
        """
        self._build(cancel, force=True, wait=True)
        return self.build_seconds

    # -- queries ------------------------------------------------------------------------------
    def query(
        self,
        vector: np.ndarray,
        k: int = 10,
        *,
        exact: bool = False,
        nprobe: int | None = None,
    ) -> list[tuple[str, int, float]]:
        """Top-``k`` matches of one query vector as ``(slide, tile_id, cosine)``, best first.

        With ``build_in_query`` (the default) a missing or out-of-date IVF is built first,
        unless another thread is building it: then, as always without ``build_in_query``,
        the query searches the previous IVF or, before the first one, every row exactly.

        Parameters
        ----------
        vector
            Query embedding of the index's ``dim`` (normalised here).
        k
            Number of matches.
        exact
            Scan every stored embedding even when the IVF is in use.
        nprobe
            Lists to search for this query (IVF only); ``None``: :attr:`effective_nprobe`.

        Raises
        ------
        SigmmaError
            If the vector has the wrong size or contains NaN or inf.
        """
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise SigmmaError(
                f"query vector of size {v.shape[0]} does not match index dim {self.dim}"
            )
        if not np.all(np.isfinite(v)):
            raise SigmmaError("query vector contains NaN or inf")
        if self.build_in_query and not exact and self.needs_build():
            self._build(None, force=False, wait=False)
        q = _normalise(v.reshape(1, -1))
        with self._lock:
            self._absorb()
            # a consistent snapshot: these are replaced, never changed in place
            matrix, tile_ids, slide_ids = self._matrix, self._tile_ids, self._slide_ids
            names = list(self.slide_names)
            n = matrix.shape[0]
            if n == 0 or int(k) < 1:
                return []
            k = min(int(k), n)
            ivf, n_idx = (None, 0) if exact else (self._ivf, self._n_indexed)
            p = self.effective_nprobe if nprobe is None else int(nprobe)
        # the search itself runs without the lock, on the snapshot
        if ivf is None:
            sims = matrix @ q[0]
            idx = _top_k(sims, k)
            top = sims[idx]
        else:
            idx, top = self._search_ivf(ivf, matrix, n_idx, q, k, p)
        return [
            (names[slide_ids[i]], int(tile_ids[i]), float(s)) for i, s in zip(idx, top, strict=True)
        ]

    @staticmethod
    def _search_ivf(
        ivf: Any, matrix: np.ndarray, n_idx: int, q: np.ndarray, k: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and cosines of the top-``k``: faiss over the indexed rows (probing more lists
        when the chosen ones hold fewer than ``k`` rows), numpy over the tail."""
        faiss = _faiss()
        p = int(min(max(1, nprobe), ivf.nlist))
        kk = min(k, n_idx)
        with _OneThread():
            while True:
                params = faiss.SearchParametersIVF(nprobe=p)
                sims, rows = ivf.search(q, kk, params=params)
                if rows[0, -1] >= 0 or p >= ivf.nlist:
                    break
                p = min(ivf.nlist, 2 * p)
        found = rows[0] >= 0
        cand_i, cand_s = rows[0][found], sims[0][found]
        if matrix.shape[0] > n_idx:  # the tail, exactly
            tail_s = matrix[n_idx:] @ q[0]
            t = _top_k(tail_s, k)
            cand_i = np.concatenate([cand_i, t + n_idx])
            cand_s = np.concatenate([cand_s, tail_s[t]])
        top = _top_k(cand_s, k)
        return cand_i[top], cand_s[top]

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index (and its IVF, when trained) to ``path`` (``.npz``, no pickle),
        atomically. With ``build_in_query`` a due IVF build runs first (as at a query)."""
        if self.build_in_query and self.needs_build():
            self._build(None, force=False, wait=False)
        with self._lock:
            self._absorb()
            arrays = {
                "matrix": self._matrix,
                "tile_ids": self._tile_ids,
                "slide_ids": self._slide_ids,
                "slide_names": np.array(self.slide_names, dtype=np.str_),
            }
            arrays.update(self._ivf_arrays())
        return atomic_savez(path, arrays)

    def _ivf_arrays(self) -> dict[str, np.ndarray]:
        """The format mark and IVF arrays :meth:`save` writes (caller holds the lock)."""
        arrays = {"index_format": np.array(INDEX_FORMAT, np.int64)}
        if self._centroids is not None:
            state = [self._n_indexed, self._n_trained, self._auto_nprobe]
            arrays.update(
                ivf_centroids=self._centroids,
                ivf_row_lists=self._row_lists,
                ivf_state=np.array(state, np.int64),
            )
        return arrays

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        use_faiss: bool | None = None,
        ivf_min_size: int | None = IVF_MIN_SIZE,
        nprobe: int | None = None,
    ) -> EmbeddingIndex:
        """Read an index written by :meth:`save` (or by the numpy IVF before faiss, or
        before any IVF); never unpickles.

        A stored IVF is used as it is (no retraining, no reassignment); an index saved
        without one trains at its first query if it is big enough.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                matrix = z["matrix"]
                if matrix.ndim != 2:
                    raise ValueError(f"matrix has shape {matrix.shape}")
                index = cls(matrix.shape[1], ivf_min_size=ivf_min_size, nprobe=nprobe)
                index.slide_names = [str(s) for s in z["slide_names"]]
                index._matrix = matrix.astype(np.float32, copy=False)
                index._tile_ids = z["tile_ids"]
                index._slide_ids = z["slide_ids"]
                n = matrix.shape[0]
                if index._tile_ids.shape != (n,) or index._slide_ids.shape != (n,):
                    raise ValueError("tile_ids/slide_ids do not match the matrix")
                if "ivf_centroids" in z.files and ivf_min_size is not None:
                    index._read_ivf(z)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise SigmmaError(f"not a retrieval index ({err})", path=path) from err
        return index

    def _read_ivf(self, z: Any) -> None:
        """Install the IVF stored in the open ``.npz`` ``z`` (any format :meth:`load`
        reads); raises ``ValueError``/``KeyError`` when its arrays are inconsistent."""
        matrix, n = self._matrix, self._matrix.shape[0]
        cent = z["ivf_centroids"].astype(np.float32, copy=False)
        state = [int(v) for v in z["ivf_state"]]
        if "ivf_row_lists" in z.files:  # faiss IVF (format 2)
            lists = z["ivf_row_lists"].astype(np.int32, copy=False)
            n_idx, n_trained, auto = state
        else:  # the numpy IVF's format: rows sorted by list, then a tail
            off = z["ivf_offsets"].astype(np.int64, copy=False)
            tail = z["ivf_tail_lists"].astype(np.int32, copy=False)
            n_sorted, n_trained, auto = state
            if (
                off.ndim != 1
                or off.size != cent.shape[0] + 1
                or off[0] != 0
                or off[-1] != n_sorted
                or np.any(np.diff(off) < 0)
            ):
                raise ValueError("inconsistent IVF arrays")
            sizes = np.diff(off)
            lists = np.concatenate([np.repeat(np.arange(sizes.size, dtype=np.int32), sizes), tail])
            n_idx = n
        if (
            cent.ndim != 2
            or cent.shape[1] != matrix.shape[1]
            or lists.shape != (n_idx,)
            or not 0 < n_idx <= n
            or (lists.size and (lists.min() < 0 or lists.max() >= cent.shape[0]))
        ):
            raise ValueError("inconsistent IVF arrays")
        ivf = _new_ivf(cent)
        _add_rows(ivf, self._matrix[:n_idx], 0, lists)
        self._ivf, self._centroids, self._row_lists = ivf, cent, lists
        self._n_indexed, self._n_trained = n_idx, n_trained
        self._auto_nprobe = auto
