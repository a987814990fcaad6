"""Cross-modal tile retrieval for the viewer: HE→ST and ST→HE over one or more slides.

The Qt-free core of :mod:`napari_sigmma.viewer.retrieval`. A :class:`SlideEmbeddings` holds
the per-scale HE and ST embeddings of the encoded tiles of one slide (from the live engine's
:class:`~napari_sigmma.live.cache.TileResult` s or from
:func:`~napari_sigmma.embed.memory.embed_tiles`); a :class:`RetrievalStore` keeps several
slides (the loaded one and reference slides) and an
:class:`~napari_sigmma.retrieval.index.EmbeddingIndex` per (modality, scale), grown as
tiles arrive (a tile is added once). Queries return :class:`Match` es with where the tile is
(level-0 px box, centre in µm), so the viewer can draw and summarise them:
:func:`composition` (cell types, or cell clusters when the table has no ``cell_type``) and
:func:`top_genes` (highest mean log1p expression of the tile's cells).

ST→HE from a selection of cells uses the ST embedding of the tile holding most of the
selected cells (:func:`tile_of_cells`): the graph encoder was trained on whole-tile graphs,
so a whole-tile embedding is what it is calibrated for; re-running it on an arbitrary
subgraph would be a different (untrained) input distribution.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.constants import SCALES
from napari_sigmma.errors import CancelLike, SigmmaError, check_cancel
from napari_sigmma.files import atomic_savez
from napari_sigmma.retrieval.index import IVF_MIN_SIZE, EmbeddingIndex

if TYPE_CHECKING:
    from napari_sigmma.embed.memory import TileEmbeddings
    from napari_sigmma.embed.result import TileResult
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide

MODALITIES = ("he", "st")
RETRIEVAL_FILE = "retrieval.npz"
TOP_GENES_TARGET_SUM = 100.0


@dataclass
class Match:
    """One retrieved tile.

    Attributes
    ----------
    rank
        1-based rank.
    slide
        Slide name.
    tile_index, tile_id
        Position in that slide's grid.
    similarity
        Cosine similarity to the query.
    box_px
        ``(x0, y0, x1, y1)`` level-0 H&E pixels of the tile.
    center_um
        ``(x, y)`` tile centre in µm of the H&E (``he_mpp`` × px).
    """

    rank: int
    slide: str
    tile_index: int
    tile_id: str
    similarity: float
    box_px: tuple[float, float, float, float]
    center_um: tuple[float, float]


@dataclass
class SlideEmbeddings:
    """HE and ST tile embeddings of one slide, by grid index.

    Attributes
    ----------
    name
        Slide name (the key in queries).
    paired, grid
        The slide and its grid (``None`` for a slide known only from a saved file).
    he, st
        ``{scale: {tile index: (D,) float32}}``; ``st`` lacks tiles with too few cells.
    """

    name: str
    paired: PairedSlide | None
    grid: TileGrid | None
    he: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    st: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in SCALES:
            self.he.setdefault(s, {})
            self.st.setdefault(s, {})

    def __len__(self) -> int:
        return max((len(v) for v in self.he.values()), default=0)

    @property
    def tile_indices(self) -> np.ndarray:
        keys: set[int] = set()
        for v in self.he.values():
            keys.update(v)
        return np.array(sorted(keys), dtype=np.int64)

    def add_results(self, results: Iterable[TileResult]) -> int:
        """Add engine results (tiles already present are replaced); return how many."""
        n = 0
        for r in results:
            for s, v in r.he.items():
                self.he.setdefault(s, {})[int(r.index)] = np.asarray(v, np.float32)
            for s, v in (r.st or {}).items():
                self.st.setdefault(s, {})[int(r.index)] = np.asarray(v, np.float32)
            n += 1
        return n

    def add_tile_embeddings(self, emb: TileEmbeddings) -> int:
        """Add :func:`~napari_sigmma.embed.memory.embed_tiles` output."""
        idx = np.asarray(emb.indices, dtype=np.int64)
        for s, m in emb.he.items():
            d = self.he.setdefault(s, {})
            for i, v in zip(idx, np.asarray(m, np.float32), strict=True):
                d[int(i)] = v
        valid = np.asarray(emb.valid, bool)
        for s, m in emb.st.items():
            d = self.st.setdefault(s, {})
            for i, v, ok in zip(idx, np.asarray(m, np.float32), valid, strict=True):
                if ok and np.all(np.isfinite(v)):
                    d[int(i)] = v
        return int(idx.size)

    def vector(self, modality: str, scale: str, tile_index: int) -> np.ndarray | None:
        """The ``modality`` (``"he"``/``"st"``) embedding of a tile, or ``None``."""
        table = self.he if modality == "he" else self.st
        return table.get(scale, {}).get(int(tile_index))

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the embeddings to ``path`` (``.npz`` of plain arrays), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"name": np.array(self.name)}
        for mod, table in (("he", self.he), ("st", self.st)):
            for s, d in table.items():
                keys = np.array(sorted(d), dtype=np.int64)
                arrays[f"{mod}__{s}__idx"] = keys
                if keys.size:
                    arrays[f"{mod}__{s}__emb"] = np.stack([d[int(k)] for k in keys])
        return atomic_savez(path, arrays)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        paired: PairedSlide | None = None,
        grid: TileGrid | None = None,
    ) -> SlideEmbeddings:
        """Read embeddings written by :meth:`save` (never unpickles)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                out = cls(str(z["name"][()]), paired, grid)
                for key in z.files:
                    parts = key.split("__")
                    if len(parts) != 3 or parts[2] != "idx":
                        continue
                    mod, s = parts[0], parts[1]
                    keys = z[key]
                    table = out.he if mod == "he" else out.st
                    d = table.setdefault(s, {})
                    if keys.size:
                        emb = z[f"{mod}__{s}__emb"].astype(np.float32)
                        for k, v in zip(keys, emb, strict=True):
                            d[int(k)] = v
        except (OSError, KeyError, ValueError) as err:
            raise SigmmaError(f"not a SIGMMA retrieval file ({err})", path=path) from err
        return out


class RetrievalStore:
    """Tile embeddings of several slides and a cosine index over them per (modality, scale).

    Parameters
    ----------
    use_faiss
        Passed to :class:`~napari_sigmma.retrieval.index.EmbeddingIndex` (``None``: faiss
        when installed).
    ivf_min_size
        Passed to each index: from this many embeddings on, queries use an IVF.
    build_in_query
        Passed to each index. ``False`` (the viewer): queries never build an IVF; call
        :meth:`prepare` (in a worker thread) to build what is due.

    Notes
    -----
    Safe across threads: slides are added and indices grown under one lock (held for the
    bookkeeping, not for an IVF build), so a worker may add results and :meth:`prepare`
    while the GUI thread queries.
    """

    def __init__(
        self,
        *,
        use_faiss: bool | None = None,
        ivf_min_size: int | None = IVF_MIN_SIZE,
        build_in_query: bool = True,
    ) -> None:
        self.slides: dict[str, SlideEmbeddings] = {}
        self.use_faiss = use_faiss
        self.ivf_min_size = ivf_min_size
        self.build_in_query = bool(build_in_query)
        self._lock = threading.RLock()
        self._indices: dict[tuple[str, str], EmbeddingIndex] = {}
        # (modality, scale) -> {slide: tile indices already in that index}
        self._added: dict[tuple[str, str], dict[str, set[int]]] = {}

    # -- content ----------------------------------------------------------------------------
    def slide(self, name: str) -> SlideEmbeddings:
        try:
            return self.slides[name]
        except KeyError as err:
            raise SigmmaError(f"no slide {name!r} in the retrieval store") from err

    def add_slide(self, slide: SlideEmbeddings) -> SlideEmbeddings:
        """Add (or replace) a slide; indices are rebuilt on the next query."""
        with self._lock:
            if slide.name in self.slides:
                self._indices.clear()
                self._added.clear()
            self.slides[slide.name] = slide
        return slide

    def ensure_slide(self, name: str, paired: PairedSlide, grid: TileGrid) -> SlideEmbeddings:
        """The slide ``name``, created empty when new."""
        with self._lock:
            if name not in self.slides:
                self.slides[name] = SlideEmbeddings(name, paired, grid)
            se = self.slides[name]
            if se.paired is None:
                se.paired, se.grid = paired, grid
        return se

    def add_results(
        self, name: str, paired: PairedSlide, grid: TileGrid, results: Iterable[TileResult]
    ) -> int:
        """Add engine results of slide ``name`` (the indices grow on the next query)."""
        with self._lock:
            return self.ensure_slide(name, paired, grid).add_results(results)

    def n_tiles(self, modality: str = "st", scale: str = "macro") -> int:
        with self._lock:
            return sum(
                len(se.he[scale] if modality == "he" else se.st[scale])
                for se in self.slides.values()
            )

    # -- indices ----------------------------------------------------------------------------
    def _new_index(self, dim: int) -> EmbeddingIndex:
        return EmbeddingIndex(
            dim,
            use_faiss=self.use_faiss,
            ivf_min_size=self.ivf_min_size,
            build_in_query=self.build_in_query,
        )

    def index(self, modality: str, scale: str) -> EmbeddingIndex:
        """The up-to-date index of ``modality`` embeddings at ``scale`` (new embeddings are
        added to it here; an IVF is built only by the index's own rules)."""
        if modality not in MODALITIES:
            raise SigmmaError(f"modality must be 'he' or 'st', not {modality!r}")
        if scale not in SCALES:
            raise SigmmaError(f"scale must be one of {SCALES}, not {scale!r}")
        key = (modality, scale)
        with self._lock:
            added = self._added.setdefault(key, {})
            idx = self._indices.get(key)
            for se in list(self.slides.values()):
                table = (se.he if modality == "he" else se.st).get(scale, {})
                done = added.setdefault(se.name, set())
                if len(table) == len(done):  # tiles are only ever added (or replaced)
                    continue
                # a copy: the viewer may insert tiles of this slide from another thread
                new = [t for t in table.copy() if t not in done]
                if not new:
                    continue
                emb = np.stack([table[t] for t in new])
                if idx is None:
                    idx = self._indices[key] = self._new_index(emb.shape[1])
                idx.add(se.name, np.asarray(new, np.int64), emb)
                done.update(new)
            if idx is None:
                dim = next(
                    (
                        v.shape[0]
                        for se in self.slides.values()
                        for v in (se.he.get(scale) or {}).values()
                    ),
                    1,
                )
                idx = self._indices[key] = self._new_index(dim)
        return idx

    def _keys(
        self, scales: Sequence[str] | None, modalities: Sequence[str] | None
    ) -> list[tuple[str, str]]:
        return [(m, s) for s in (scales or SCALES) for m in (modalities or MODALITIES)]

    def needs_build(
        self, *, scales: Sequence[str] | None = None, modalities: Sequence[str] | None = None
    ) -> bool:
        """Whether :meth:`prepare` would build (or merge) an IVF, counting embeddings not yet
        in their index. Cheap (counts only): the GUI thread may ask before each query."""
        with self._lock:
            for m, s in self._keys(scales, modalities):
                if m not in MODALITIES or s not in SCALES:
                    raise SigmmaError(f"no index ({m!r}, {s!r})")
                added = self._added.get((m, s), {})
                n_all = n_pending = 0
                for se in self.slides.values():
                    n = len((se.he if m == "he" else se.st).get(s, {}))
                    n_all += n
                    n_pending += n - len(added.get(se.name, ()))
                idx = self._indices.get((m, s))
                if idx is None:
                    if self.ivf_min_size is not None and n_all >= max(1, self.ivf_min_size):
                        return True
                elif idx.needs_build(extra=n_pending):
                    return True
        return False

    def prepare(
        self,
        cancel: CancelLike = None,
        *,
        scales: Sequence[str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> float:
        """Bring the indices of ``scales`` × ``modalities`` (default: all, in that order) up
        to date and build every IVF that is due, in the calling thread: the viewer runs it
        in a worker so that a query never builds on the GUI thread. Queries from other
        threads meanwhile search the previous IVF or exactly.

        Parameters
        ----------
        cancel
            Checked between indices and inside each build (k-means iterations, assignment
            blocks); raises :class:`~napari_sigmma.errors.Cancelled`, leaving the index
            being built as it was.

        Returns
        -------
        float
            Seconds spent building.
        """
        seconds = 0.0
        for m, s in self._keys(scales, modalities):
            check_cancel(cancel)
            idx = self.index(m, s)
            n_before = len(idx.builds)
            if idx.ensure_built(cancel):
                seconds += sum(float(b["seconds"]) for b in idx.builds[n_before:])  # type: ignore[arg-type]
        return seconds

    # -- queries ----------------------------------------------------------------------------
    def query(self, vector: np.ndarray, *, target: str, scale: str, k: int = 10) -> list[Match]:
        """Top-``k`` tiles whose ``target`` (``"he"``/``"st"``) embedding is closest."""
        hits = self.index(target, scale).query(np.asarray(vector, np.float32), k=k)
        return [self._match(i + 1, s, t, sim) for i, (s, t, sim) in enumerate(hits)]

    def query_he_to_st(self, slide: str, tile_index: int, scale: str, k: int = 10) -> list[Match]:
        """ST tiles (all slides) matching the HE embedding of ``slide``'s tile."""
        v = self.slide(slide).vector("he", scale, tile_index)
        if v is None:
            raise SigmmaError(f"tile {tile_index} of {slide!r} has no {scale} HE embedding yet")
        return self.query(v, target="st", scale=scale, k=k)

    def query_st_to_he(self, slide: str, tile_index: int, scale: str, k: int = 10) -> list[Match]:
        """HE tiles (all slides) matching the ST embedding of ``slide``'s tile."""
        v = self.slide(slide).vector("st", scale, tile_index)
        if v is None:
            raise SigmmaError(
                f"tile {tile_index} of {slide!r} has no {scale} ST embedding (too few cells, "
                "or not encoded yet)"
            )
        return self.query(v, target="he", scale=scale, k=k)

    def _match(self, rank: int, slide: str, tile: int, sim: float) -> Match:
        se = self.slides[slide]
        if se.grid is None or se.paired is None:
            box, centre, tid = (np.nan,) * 4, (np.nan, np.nan), str(tile)
        else:
            b = np.asarray(se.grid.bounds[tile], dtype=float)
            box = (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
            mpp = float(se.paired.he_mpp)
            centre = ((box[0] + box[2]) / 2 * mpp, (box[1] + box[3]) / 2 * mpp)
            tid = se.grid.tile_ids[tile]
        return Match(rank, slide, int(tile), tid, float(sim), box, centre)

    # -- persistence --------------------------------------------------------------------------
    def save_slide(self, name: str, folder: str | os.PathLike[str]) -> Path:
        """Write slide ``name``'s embeddings to ``<folder>/retrieval.npz``."""
        return self.slide(name).save(Path(folder) / RETRIEVAL_FILE)


# -- where cells are -------------------------------------------------------------------------
def cell_tiles(paired: PairedSlide, grid: TileGrid) -> np.ndarray:
    """``(N,)`` grid index of each cell's tile (-1 outside the grid), cached on ``paired``."""
    cache = getattr(paired, "_sigmma_cell_tiles", None)
    if cache is not None and cache[0] is grid:
        return cache[1]
    loc = np.asarray(grid.locate(np.asarray(paired.cells_px, dtype=np.float64)), np.int64)
    try:
        paired._sigmma_cell_tiles = (grid, loc)  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return loc


def tile_cells(paired: PairedSlide, grid: TileGrid, tile_index: int) -> np.ndarray:
    """Rows (cells) of the slide's table whose centroid lies in the tile."""
    return np.flatnonzero(cell_tiles(paired, grid) == int(tile_index))


def cells_in_polygon(paired: PairedSlide, polygon_xy_px: np.ndarray) -> np.ndarray:
    """Rows of the cells whose centroid (level-0 H&E px) lies inside the polygon ``(x, y)``."""
    from skimage.measure import points_in_poly

    poly = np.asarray(polygon_xy_px, dtype=np.float64).reshape(-1, 2)
    if poly.shape[0] < 3:
        raise SigmmaError("a selection polygon needs at least 3 vertices")
    pts = np.asarray(paired.cells_px, dtype=np.float64)
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    cand = np.flatnonzero(np.all((pts >= lo) & (pts <= hi), axis=1))
    if cand.size == 0:
        return cand
    inside = points_in_poly(pts[cand], poly)
    return cand[inside]


def tile_of_cells(
    paired: PairedSlide,
    grid: TileGrid,
    cells: Sequence[int],
    *,
    has_st: Iterable[int] | None = None,
) -> int:
    """The tile holding most of ``cells`` (ties: the lower index), among ``has_st`` if given.

    Raises :class:`SigmmaError` when no selected cell lies in a (usable) tile.
    """
    loc = cell_tiles(paired, grid)[np.asarray(cells, dtype=np.int64)]
    loc = loc[loc >= 0]
    if has_st is not None:
        allowed = np.fromiter(has_st, dtype=np.int64)
        loc = loc[np.isin(loc, allowed)]
    if loc.size == 0:
        raise SigmmaError("none of the selected cells lies in an encoded tile with cells")
    vals, counts = np.unique(loc, return_counts=True)
    return int(vals[np.argmax(counts)])


# -- what is in a tile ---------------------------------------------------------------------------
def cell_clusters(paired: PairedSlide, k: int = 8, *, seed: int = 0) -> np.ndarray:
    """``(N,)`` k-means clusters of the cells' log1p-normalised expression (PCA ≤ 16),
    cached on ``paired``: the composition labels when the table has no ``cell_type``."""
    cache = getattr(paired, "_sigmma_cell_clusters", None)
    if cache is not None and cache[0] == k:
        return cache[1]
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA

    x = _log1p_norm(paired.counts)
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    ncomp = int(min(16, x.shape[1], max(n - 1, 1)))
    z = PCA(n_components=ncomp, random_state=seed).fit_transform(x) if ncomp >= 2 else x
    km = MiniBatchKMeans(n_clusters=int(min(k, n)), random_state=seed, n_init=3, batch_size=2048)
    labels = km.fit_predict(z).astype(np.int64)
    try:
        paired._sigmma_cell_clusters = (k, labels)  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return labels


def _log1p_norm(counts: Any, target_sum: float = TOP_GENES_TARGET_SUM) -> Any:
    """log1p of counts scaled to ``target_sum`` per cell (CSR in, CSR out)."""
    import scipy.sparse as sp

    m = sp.csr_matrix(counts, dtype=np.float32)
    tot = np.asarray(m.sum(axis=1)).ravel()
    scale = np.where(tot > 0, target_sum / np.maximum(tot, 1e-12), 0.0).astype(np.float32)
    m = sp.diags(scale) @ m
    m = sp.csr_matrix(m)
    m.data = np.log1p(m.data)
    return m


def composition(
    paired: PairedSlide,
    grid: TileGrid,
    tile_index: int,
    *,
    top: int = 3,
    labels: np.ndarray | None = None,
) -> list[tuple[str, float]]:
    """Most frequent cell types of a tile as ``(name, fraction)``, most frequent first.

    Uses ``obs["cell_type"]`` when present; else ``labels`` (per cell) or
    :func:`cell_clusters` (named ``"cluster <i>"``). A tile without cells gives ``[]``.
    """
    rows = tile_cells(paired, grid, tile_index)
    if rows.size == 0:
        return []
    obs = getattr(paired, "obs", None)
    if obs is not None and "cell_type" in getattr(obs, "columns", ()):
        names = np.asarray(obs["cell_type"].astype(str))[rows]
    else:
        lab = labels if labels is not None else cell_clusters(paired)
        names = np.array([f"cluster {int(v)}" for v in np.asarray(lab)[rows]])
    vals, counts = np.unique(names, return_counts=True)
    order = np.lexsort((vals, -counts))[:top]
    return [(str(vals[i]), float(counts[i] / rows.size)) for i in order]


def top_genes(
    paired: PairedSlide, grid: TileGrid, tile_index: int, *, n: int = 5
) -> list[tuple[str, float]]:
    """The ``n`` genes with the highest mean log1p expression (counts scaled to 100 per
    cell) over the tile's cells, as ``(gene, mean)``; ``[]`` for a tile without cells."""
    rows = tile_cells(paired, grid, tile_index)
    if rows.size == 0:
        return []
    import scipy.sparse as sp

    m = _log1p_norm(sp.csr_matrix(paired.counts)[rows])
    mean = np.asarray(m.mean(axis=0)).ravel()
    order = np.lexsort((np.arange(mean.size), -mean))[:n]
    return [(str(paired.genes[i]), float(mean[i])) for i in order if mean[i] > 0]


def format_pairs(pairs: Sequence[tuple[str, float]], *, percent: bool = False) -> str:
    """``"a 50%, b 30%"`` / ``"GENE 1.23, …"`` for a table cell."""
    if not pairs:
        return "—"
    if percent:
        return ", ".join(f"{n} {100 * v:.0f}%" for n, v in pairs)
    return ", ".join(f"{n} {v:.2f}" for n, v in pairs)
