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
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import numpy as np

from napari_sigmma.errors import CancelLike, SigmmaError, check_cancel
from napari_sigmma.files import atomic_savez

IVF_MIN_SIZE = 50_000
"""Indices with at least this many embeddings are searched through the IVF by default."""

_CAL_K = 10  # nprobe is calibrated for top-10
_SAMPLE_PER_LIST = 32  # k-means training points per list
_CAL_ROWS = 200_000  # rows the nprobe calibration searches
_KMEANS_ITERS = 8
_MAX_PROBE_FRACTION = 1 / 8


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _dot(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``m @ v`` in one thread (numpy's own loop)."""
    return np.einsum("ij,j->i", m, v)


def _assign(x: np.ndarray, centroids: np.ndarray, *, cancel: CancelLike = None) -> np.ndarray:
    """Nearest (highest inner product) centroid of each row, in blocks of ≤ 32 MB scores
    (``cancel`` checked between blocks)."""
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
    """Unit-norm centroids of L2-normalised rows ``x`` by Lloyd iterations on the sphere.

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


def _search_ivf(
    matrix: np.ndarray,
    centroids: np.ndarray,
    off: np.ndarray,
    n_sorted: int,
    tail_lists: np.ndarray,
    nprobe: int,
    q: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows and cosines of the top-``k`` of ``q`` among the ``nprobe`` lists whose
    centroids score best (an :class:`EmbeddingIndex` snapshot: rows ``[0, n_sorted)`` sorted
    by list, list ``l`` at ``off[l]:off[l + 1]``, the rest in ``tail_lists``)."""
    # einsum, not BLAS: OpenBLAS splits these small products over threads, and on a
    # busy machine waiting for the second thread costs far more than the product
    order = np.argsort(-_dot(centroids, q))
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
            parts_s.append(_dot(matrix[a:b], q))
            parts_i.append(np.arange(a, b))
    if tail_lists.size:
        rows = n_sorted + np.flatnonzero(np.isin(tail_lists, lists))
        parts_s.append(_dot(matrix[rows], q))
        parts_i.append(rows)
    sims = np.concatenate(parts_s)
    cand = np.concatenate(parts_i)
    k = min(k, sims.size)
    top = np.argpartition(-sims, k - 1)[:k] if k < sims.size else np.arange(sims.size)
    top = top[np.argsort(-sims[top], kind="stable")]
    return cand[top], sims[top]


class NumpyIVFIndex:
    """A growing cosine-similarity index: exact when small, IVF when big; thread-safe.

    Parameters
    ----------
    dim
        Embedding dimension.
    use_faiss
        ``None`` uses faiss (for the exact search) when it can be imported.
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
        Seed of the training sample, k-means and calibration (training is deterministic).
    build_in_query
        ``True``: a query that finds the IVF missing or out of date trains it (or merges its
        tail) first, in the querying thread. ``False``: queries never build; they search the
        previous IVF (new rows in its tail) or, before the first build, exactly, until
        :meth:`ensure_built` runs (the viewer calls it in a worker thread).

    Notes
    -----
    Keys are ``(slide, tile_id)`` pairs stored as two arrays, so a query returns where each
    match lives. Appends go to a list of chunks that are concatenated lazily at the next
    query, which keeps adding tiles one batch at a time cheap. Training reorders the stored
    rows (by list); nothing outside depends on the row order.

    Threads: one lock guards the stored arrays and the IVF state, and is held only for short
    bookkeeping; stored arrays are never changed in place (rows are appended by
    concatenation, a build installs new arrays), so a query searches the arrays it saw under
    the lock without holding it. A build (one at a time) trains on a snapshot outside the
    lock and installs the result at the end; rows added meanwhile join the new lists' tail.
    A query during a build therefore never waits for it: it searches the previous IVF or,
    without one, every row exactly.
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
        self.dim = int(dim)
        self.ivf_min_size = ivf_min_size
        self.n_lists = n_lists
        self.nprobe = nprobe
        self.target_recall = float(target_recall)
        self.seed = int(seed)
        self.build_in_query = bool(build_in_query)
        self._lock = threading.RLock()  # stored arrays, IVF state, faiss
        self._build_lock = threading.Lock()  # one build (train or tail merge) at a time
        self._chunks: list[np.ndarray] = []
        self._slides: list[np.ndarray] = []
        self._tiles: list[np.ndarray] = []
        self._matrix = np.zeros((0, self.dim), np.float32)
        self._slide_ids = np.zeros(0, dtype=np.int32)
        self._tile_ids = np.zeros(0, dtype=np.int64)
        self.slide_names: list[str] = []
        # IVF state: rows [0, _n_sorted) are sorted by list (list l is rows
        # _offsets[l]:_offsets[l + 1]); rows [_n_sorted, N) are the tail, in _tail_lists.
        self._centroids: np.ndarray | None = None
        self._offsets = np.zeros(1, dtype=np.int64)
        self._n_sorted = 0
        self._tail_lists = np.zeros(0, dtype=np.int32)
        self._n_trained = 0
        self._auto_nprobe = 0
        self.build_seconds = 0.0
        #: one dict per finished build: ``{"kind": "train"|"merge", "thread": name,
        #: "rows": n, "seconds": s}`` (which thread built is what the viewer tests check)
        self.builds: list[dict[str, object]] = []
        self._faiss = None
        if use_faiss is None or use_faiss:
            try:
                import faiss  # type: ignore[import-not-found]

                self._faiss = faiss.IndexFlatIP(self.dim)
            except ImportError:
                if use_faiss:
                    raise SigmmaError("faiss was requested but is not installed") from None

    def __len__(self) -> int:
        with self._lock:
            return int(self._matrix.shape[0] + sum(c.shape[0] for c in self._chunks))

    @property
    def is_ivf(self) -> bool:
        """Whether an IVF quantiser is trained (queries of an up-to-date index use it)."""
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
    def _append_chunks(self) -> int:
        """Concatenate the pending chunks onto the matrix; returns the previous row count."""
        n_old = self._matrix.shape[0]
        if self._chunks:
            self._matrix = np.concatenate([self._matrix, *self._chunks])
            self._tile_ids = np.concatenate([self._tile_ids, *self._tiles])
            self._slide_ids = np.concatenate([self._slide_ids, *self._slides])
            self._chunks, self._tiles, self._slides = [], [], []
        return n_old

    def _absorb(self) -> None:
        """Append pending rows; with an IVF, new rows join their nearest list's tail. Only
        ever appends, so a build's snapshot stays a prefix of the stored rows."""
        n_old = self._append_chunks()
        if self._centroids is not None and self._matrix.shape[0] > n_old:
            new = _assign(self._matrix[n_old:], self._centroids)
            self._tail_lists = np.concatenate([self._tail_lists, new])
        self._sync_faiss(False)

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
        if n - self._n_sorted > max(4096, self._n_sorted // 8):
            return "merge"
        return None

    def needs_build(self, extra: int = 0) -> bool:
        """Whether the index (with ``extra`` more rows) wants an IVF build or a tail merge,
        i.e. whether :meth:`ensure_built` would do something. Cheap: nothing is computed."""
        with self._lock:
            return self._pending_work(extra) is not None

    def _sync_faiss(self, reordered: bool) -> None:
        if self._faiss is None:
            return
        if reordered:
            self._faiss.reset()
        if self._faiss.ntotal < self._matrix.shape[0]:
            # rows only ever append between reorders, so faiss ids stay row numbers
            self._faiss.add(self._matrix[self._faiss.ntotal :])

    def _row_lists(self) -> np.ndarray:
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
        n_lists = self.n_lists or max(16, round(math.sqrt(n)))
        n_lists = min(int(n_lists), n)
        rng = np.random.default_rng(self.seed)
        m = min(n, n_lists * _SAMPLE_PER_LIST)
        sample = x[np.sort(rng.choice(n, m, replace=False))]
        centroids = spherical_kmeans(sample, n_lists, seed=self.seed, cancel=cancel)
        del sample
        lists = _assign(x, centroids, cancel=cancel)
        order = np.argsort(lists, kind="stable")
        counts = np.bincount(lists, minlength=centroids.shape[0])
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        sorted_lists = lists[order]
        del lists
        auto = self._calibrate(x[order], sorted_lists, centroids, rng, cancel=cancel)
        return centroids, order, offsets, auto

    def _calibrate(
        self,
        x_all: np.ndarray,
        row_lists: np.ndarray,
        c: np.ndarray,
        rng: np.random.Generator,
        n_queries: int = 200,
        cancel: CancelLike = None,
    ) -> int:
        """Smallest nprobe whose leave-one-out recall@10 on sampled rows meets the target."""
        n_lists = c.shape[0]
        # ground truth within a random subset of rows: its neighbours are farther apart than
        # in the whole index, so the nprobe found is on the safe side, at a bounded cost
        n_all = x_all.shape[0]
        sub = np.sort(rng.choice(n_all, min(n_all, _CAL_ROWS), replace=False))
        x, sub_lists = x_all[sub], row_lists[sub]
        n = x.shape[0]
        k = min(_CAL_K, n - 1)
        if k < 1:
            return n_lists
        qi = np.sort(rng.choice(n, min(n_queries, n), replace=False))
        q = x[qi]
        rows = np.arange(qi.size)
        best_i = _exact_topk_rows(q, x, k, exclude=qi, cancel=cancel)
        nb_lists = sub_lists[best_i]
        # rank of every list by centroid score, per query
        order = np.argsort(-(q @ c.T), axis=1)
        rank = np.empty_like(order)
        rank[rows[:, None], order] = np.arange(n_lists)[None, :]
        needed = np.sort(rank[rows[:, None], nb_lists].ravel())
        p = int(needed[max(0, math.ceil(self.target_recall * needed.size) - 1)]) + 1
        cap = max(min(8, n_lists), int(n_lists * _MAX_PROBE_FRACTION))
        return int(min(max(p, min(8, n_lists)), cap))

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
                x = self._matrix
                n0 = x.shape[0]
                if n0 == 0:
                    raise SigmmaError("cannot build an IVF over an empty retrieval index")
                tiles, slides = self._tile_ids, self._slide_ids
                old_lists = self._row_lists() if work == "merge" else None
                centroids, auto = self._centroids, self._auto_nprobe
            check_cancel(cancel)
            t0 = time.perf_counter()
            if work == "train":
                centroids, order, offsets, auto = self._train_arrays(x, cancel)
            else:
                assert old_lists is not None and centroids is not None
                order = np.argsort(old_lists, kind="stable")
                counts = np.bincount(old_lists, minlength=centroids.shape[0])
                offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            check_cancel(cancel)
            x_new, tiles_new, slides_new = x[order], tiles[order], slides[order]
            seconds = time.perf_counter() - t0
            with self._lock:
                self._absorb()
                late = self._matrix.shape[0] - n0  # rows added during the build
                if late:
                    x_new = np.concatenate([x_new, self._matrix[n0:]])
                    tiles_new = np.concatenate([tiles_new, self._tile_ids[n0:]])
                    slides_new = np.concatenate([slides_new, self._slide_ids[n0:]])
                if work == "train":
                    tail = _assign(x_new[n0:], centroids)
                else:  # same centroids: the late rows keep the lists _absorb gave them
                    tail = self._tail_lists[n0 - self._n_sorted :]
                self._matrix, self._tile_ids, self._slide_ids = x_new, tiles_new, slides_new
                self._centroids, self._offsets = centroids, offsets
                self._n_sorted, self._tail_lists = n0, tail.astype(np.int32, copy=False)
                if work == "train":
                    self._n_trained, self._auto_nprobe = n0, auto
                    self.build_seconds = seconds
                self._sync_faiss(True)
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

    def ensure_built(self, cancel: CancelLike = None, *, wait: bool = True) -> bool:
        """Do now, in this thread, the IVF work a query would otherwise do: train the IVF
        when the index has reached ``ivf_min_size`` (or doubled since training), or merge a
        long tail. Queries from other threads meanwhile do not wait (see class notes).

        Parameters
        ----------
        cancel
            Checked between k-means iterations and assignment blocks; when it says stop,
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
            # a consistent snapshot: these arrays are replaced, never changed in place
            matrix, tile_ids, slide_ids = self._matrix, self._tile_ids, self._slide_ids
            names = list(self.slide_names)
            n = matrix.shape[0]
            if n == 0 or int(k) < 1:
                return []
            k = min(int(k), n)
            ivf = found = None
            if self._centroids is not None and not exact:
                p = self.effective_nprobe if nprobe is None else int(nprobe)
                ivf = (self._centroids, self._offsets, self._n_sorted, self._tail_lists, p)
            elif self._faiss is not None:  # faiss is not safe against a concurrent add
                found = self._faiss.search(q, k)
        # the search itself runs without the lock, on the snapshot
        if ivf is not None:
            idx, top = _search_ivf(matrix, *ivf, q[0], k)
        elif found is not None:
            idx, top = found[1][0], found[0][0]
        else:
            sims = matrix @ q[0]
            idx = np.argpartition(-sims, k - 1)[:k] if k < n else np.arange(n)
            idx = idx[np.argsort(-sims[idx], kind="stable")]
            top = sims[idx]
        return [
            (names[slide_ids[i]], int(tile_ids[i]), float(s)) for i, s in zip(idx, top, strict=True)
        ]

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
            if self._centroids is not None:
                state = [self._n_sorted, self._n_trained, self._auto_nprobe]
                arrays.update(
                    ivf_centroids=self._centroids,
                    ivf_offsets=self._offsets,
                    ivf_tail_lists=self._tail_lists,
                    ivf_state=np.array(state, np.int64),
                )
        return atomic_savez(path, arrays)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        use_faiss: bool | None = None,
        ivf_min_size: int | None = IVF_MIN_SIZE,
        nprobe: int | None = None,
    ) -> NumpyIVFIndex:
        """Read an index written by :meth:`save`; never unpickles.

        A stored IVF is used as it is (no retraining); an index saved without one trains at
        its first query if it is big enough.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                matrix = z["matrix"]
                if matrix.ndim != 2:
                    raise ValueError(f"matrix has shape {matrix.shape}")
                index = cls(
                    matrix.shape[1], use_faiss=use_faiss, ivf_min_size=ivf_min_size, nprobe=nprobe
                )
                index.slide_names = [str(s) for s in z["slide_names"]]
                index._matrix = matrix.astype(np.float32, copy=False)
                index._tile_ids = z["tile_ids"]
                index._slide_ids = z["slide_ids"]
                n = matrix.shape[0]
                if index._tile_ids.shape != (n,) or index._slide_ids.shape != (n,):
                    raise ValueError("tile_ids/slide_ids do not match the matrix")
                if "ivf_centroids" in z.files and ivf_min_size is not None:
                    cent = z["ivf_centroids"].astype(np.float32, copy=False)
                    off = z["ivf_offsets"].astype(np.int64, copy=False)
                    tail = z["ivf_tail_lists"].astype(np.int32, copy=False)
                    n_sorted, n_trained, auto = (int(v) for v in z["ivf_state"])
                    if (
                        cent.ndim != 2
                        or cent.shape[1] != matrix.shape[1]
                        or off.shape != (cent.shape[0] + 1,)
                        or off[0] != 0
                        or off[-1] != n_sorted
                        or np.any(np.diff(off) < 0)
                        or n_sorted + tail.size != n
                        or (tail.size and (tail.min() < 0 or tail.max() >= cent.shape[0]))
                    ):
                        raise ValueError("inconsistent IVF arrays")
                    index._centroids, index._offsets, index._tail_lists = cent, off, tail
                    index._n_sorted, index._n_trained = n_sorted, n_trained
                    index._auto_nprobe = auto
        except (OSError, KeyError, ValueError) as err:
            raise SigmmaError(f"not a retrieval index ({err})", path=path) from err
        index._sync_faiss(True)
        return index
