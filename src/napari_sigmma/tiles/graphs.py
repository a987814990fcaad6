"""Cells of each tile and their proximity graph (the ST side of a paired tile).

A cell belongs to the tile whose half-open bounds contain its centroid. Inside a tile, cells
get positions in ``[0, 1)`` (x, y), a micro patch index (4×4 grid) and a meso patch index
(2×2 grid), and a proximity graph: Delaunay triangulation by default (as
``squidpy.gr.spatial_neighbors(delaunay=True)`` builds), or kNN / radius neighbours.
Tiles with fewer than ``min_cells`` cells are flagged invalid: kept for display, skipped for
training and retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide

GRAPH_METHODS = ("delaunay", "knn", "radius")


def cells_per_tile(cells_px: np.ndarray, grid: TileGrid) -> list[np.ndarray]:
    """Indices of the cells whose centroid lies inside each tile (level-0 px, half-open)."""
    owner = grid.locate(cells_px)
    order = np.argsort(owner, kind="stable")
    sorted_owner = owner[order]
    starts = np.searchsorted(sorted_owner, np.arange(len(grid)), side="left")
    ends = np.searchsorted(sorted_owner, np.arange(len(grid)), side="right")
    return [order[s:e].astype(np.int64) for s, e in zip(starts, ends, strict=True)]


def local_positions(xy_px: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Tile-local ``(x, y)`` in ``[0, 1)`` of level-0 points inside ``bounds`` (x0,y0,x1,y1)."""
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    x0, y0, x1, y1 = (float(v) for v in bounds)
    pos = (xy - [x0, y0]) / [x1 - x0, y1 - y0]
    return np.clip(pos, 0.0, np.nextafter(1.0, 0.0))


def patch_indices(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Micro (4×4, ``4*floor(4y)+floor(4x)``) and meso (2×2) patch index of each position."""
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 2)
    q4 = np.clip(np.floor(pos * 4), 0, 3).astype(np.int64)
    q2 = np.clip(np.floor(pos * 2), 0, 1).astype(np.int64)
    return 4 * q4[:, 1] + q4[:, 0], 2 * q2[:, 1] + q2[:, 0]


def _symmetric(pairs: np.ndarray, n: int) -> np.ndarray:
    """Undirected edge list with both directions, no self loops, no duplicates, sorted."""
    if pairs.size == 0:
        return np.zeros((2, 0), dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    both = np.concatenate([pairs, pairs[:, ::-1]], axis=0)
    key = np.unique(both[:, 0] * n + both[:, 1])
    return np.stack([key // n, key % n]).astype(np.int64)


def tile_graph(
    local_xy: np.ndarray,
    *,
    method: str = "delaunay",
    k: int = 6,
    radius: float | None = None,
    max_dist: float | None = None,
) -> np.ndarray:
    """Proximity graph of the points of one tile.

    Parameters
    ----------
    local_xy
        ``(n, 2)`` positions (any unit; ``radius`` and ``max_dist`` are in the same unit).
    method
        ``"delaunay"`` (default), ``"knn"`` (``k`` nearest, symmetrised) or ``"radius"``.
    k
        Neighbours for ``"knn"``.
    radius
        Neighbourhood radius for ``"radius"`` (required there).
    max_dist
        Drop edges longer than this (any method); ``None`` keeps all.

    Returns
    -------
    numpy.ndarray
        ``(2, E)`` int64, both directions of every undirected edge.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(local_xy, dtype=np.float64).reshape(-1, 2)
    n = xy.shape[0]
    if method not in GRAPH_METHODS:
        raise SigmmaError(f"unknown graph method {method!r}; choose one of {GRAPH_METHODS}")
    if n < 2:
        return np.zeros((2, 0), dtype=np.int64)
    if method == "delaunay":
        uniq, first, inv = np.unique(xy, axis=0, return_index=True, return_inverse=True)
        if len(uniq) < n:
            # Coincident cells (e.g. a duplicated row of a cell table): qhull would drop all
            # but one of them, leaving the others isolated. Triangulate the distinct points
            # and give every copy its twin and its twin's neighbours.
            return _with_copies(tile_graph(uniq, k=k), first, inv.ravel(), xy, max_dist)
        if n == 2:
            pairs = np.array([[0, 1]])
        else:
            s = _delaunay_simplices(xy)
            if s is None:
                # Degenerate beyond repair (e.g. all points equal): nearest neighbours.
                return tile_graph(xy, method="knn", k=k, max_dist=max_dist)
            pairs = np.concatenate([s[:, [0, 1]], s[:, [1, 2]], s[:, [0, 2]]], axis=0)
    elif method == "knn":
        kk = int(min(max(k, 1), n - 1))
        _, nb = cKDTree(xy).query(xy, k=kk + 1)
        nb = np.asarray(nb).reshape(n, kk + 1)[:, 1:]
        pairs = np.stack([np.repeat(np.arange(n), kk), nb.ravel()], axis=1)
    else:
        if radius is None or radius <= 0:
            raise SigmmaError("graph method 'radius' needs a positive radius")
        pairs = cKDTree(xy).query_pairs(float(radius), output_type="ndarray")
    ei = _symmetric(pairs, n)
    if max_dist is not None and ei.shape[1]:
        d = np.linalg.norm(xy[ei[0]] - xy[ei[1]], axis=1)
        ei = ei[:, d <= max_dist]
    return ei


def tile_cell_graph(
    pos: np.ndarray,
    tile_um: float,
    *,
    method: str = "delaunay",
    k: int = 6,
    radius_um: float | None = 30.0,
    max_dist_um: float | None = None,
    micro_blocks: bool = True,
) -> np.ndarray:
    """The proximity graph G_micro of one tile's cells.

    Parameters
    ----------
    pos
        ``(n, 2)`` tile-local positions in ``[0, 1)``.
    tile_um
        Tile side in µm (distances are in µm).
    method, k, radius_um, max_dist_um
        As :func:`tile_graph` (``radius_um`` → ``radius``, ``max_dist_um`` → ``max_dist``).
    micro_blocks
        True (default, the paper's G_micro): the proximity method runs inside each micro
        block (4×4 grid) on that block's cells only, so every block with ≥ 2 cells is
        connected within itself. False: one graph over the whole tile (its edges that cross
        micro blocks are then dropped by the encoder, which leaves cells of sparse blocks
        isolated when their Delaunay neighbours lie in other blocks).

    Returns
    -------
    numpy.ndarray
        ``(2, E)`` int64, both directions, sorted; with ``micro_blocks`` every edge joins
        two cells of one micro block.
    """
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 2)
    n = pos.shape[0]
    if n < 2:
        return np.zeros((2, 0), dtype=np.int64)
    xy = pos * float(tile_um)

    def one(points: np.ndarray) -> np.ndarray:
        return tile_graph(points, method=method, k=k, radius=radius_um, max_dist=max_dist_um)

    if not micro_blocks:
        return one(xy)
    micro, _ = patch_indices(pos)
    parts = []
    for blk in np.unique(micro):
        members = np.flatnonzero(micro == blk)
        if members.size >= 2:
            parts.append(members[one(xy[members])])
    if not parts:
        return np.zeros((2, 0), dtype=np.int64)
    ei = np.concatenate(parts, axis=1)
    order = np.lexsort((ei[1], ei[0]))
    return ei[:, order].astype(np.int64)


def isolated_fraction(cells: list[TileCells]) -> float:
    """Fraction of the cells of valid tiles that have no G_micro edge (no neighbour inside
    their micro block)."""
    n = iso = 0
    for c in cells:
        if not c.valid:
            continue
        deg = np.bincount(c.edge_index[0], minlength=c.n_cells) if c.n_cells else np.zeros(0)
        if c.edge_index.size:
            keep = c.micro[c.edge_index[0]] == c.micro[c.edge_index[1]]
            deg = np.bincount(c.edge_index[0][keep], minlength=c.n_cells)
        n += c.n_cells
        iso += int((deg == 0).sum())
    return iso / max(n, 1)


def _with_copies(
    ei_unique: np.ndarray,
    first: np.ndarray,
    inv: np.ndarray,
    xy: np.ndarray,
    max_dist: float | None,
) -> np.ndarray:
    """Edges of all points from the graph of their distinct positions (see ``tile_graph``)."""
    n = len(inv)
    rep = first[inv]  # each point's twin that stands for its position
    # every point joins the representative of each position adjacent to its own position
    src, dst = ei_unique
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv, minlength=len(first))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    members = [order[starts[g] : starts[g] + counts[g]] for g in src]
    pairs = [
        np.stack([m, np.full(len(m), first[d])], axis=1) for m, d in zip(members, dst, strict=True)
    ]
    pairs.append(np.stack([np.arange(n), rep], axis=1))  # and its own twins
    ei = _symmetric(np.concatenate(pairs, axis=0), n)
    if max_dist is not None and ei.shape[1]:
        d = np.linalg.norm(xy[ei[0]] - xy[ei[1]], axis=1)
        ei = ei[:, d <= max_dist]
    return ei


def _delaunay_simplices(xy: np.ndarray) -> np.ndarray | None:
    from scipy.spatial import Delaunay, QhullError

    try:
        return Delaunay(xy).simplices
    except QhullError:
        pass
    try:
        # Collinear or duplicated points: joggle the input to get a triangulation anyway.
        return Delaunay(xy, qhull_options="QJ").simplices
    except QhullError:
        return None


@dataclass
class TileCells:
    """The cells of one tile and their graph.

    Attributes
    ----------
    tile
        Index of the tile in its grid.
    cells
        ``(n,)`` int64 indices into the slide's cells.
    pos
        ``(n, 2)`` float32 tile-local ``(x, y)`` in ``[0, 1)``.
    micro, meso
        ``(n,)`` int64 patch indices (0..15, 0..3).
    edge_index
        ``(2, E)`` int64 proximity edges (both directions).
    valid
        ``n >= min_cells``: used for training and retrieval.
    """

    tile: int
    cells: np.ndarray
    pos: np.ndarray
    micro: np.ndarray
    meso: np.ndarray
    edge_index: np.ndarray
    valid: bool

    @property
    def n_cells(self) -> int:
        return int(self.cells.size)


def has_graph(n_cells: Any, min_cells: int) -> Any:
    """Whether a tile with ``n_cells`` cells (scalar or array) is valid: at least
    ``min_cells`` cells, and at least one."""
    return np.asarray(n_cells) >= max(int(min_cells), 1)


def build_tile_cells(
    paired: PairedSlide,
    grid: TileGrid,
    *,
    method: str = "delaunay",
    k: int = 6,
    radius_um: float = 30.0,
    max_dist_um: float | None = None,
    min_cells: int = 3,
    indices: np.ndarray | None = None,
    per_tile: list[np.ndarray] | None = None,
    micro_blocks: bool = True,
) -> list[TileCells]:
    """Cells, positions, patch indices and proximity graph of every tile (or ``indices``).

    The graph is :func:`tile_cell_graph`: built inside each micro block by default
    (``micro_blocks``), the tile-wide graph otherwise.

    The one tile-graph builder: training, embedding and the live view all call it. Distances
    (``radius_um``, ``max_dist_um``) are in µm, so graphs do not depend on the slide's
    resolution. ``per_tile`` (:func:`cells_per_tile` of this grid) may be passed by callers
    that build a few tiles at a time, so the cells are assigned to tiles once.
    """
    if per_tile is None:
        per_tile = cells_per_tile(paired.cells_px, grid)
    idx = np.arange(len(grid)) if indices is None else np.asarray(indices, dtype=np.int64)
    out: list[TileCells] = []
    tile_um = grid.tile_um
    for i in idx:
        cells = per_tile[int(i)]
        pos = local_positions(paired.cells_px[cells], grid.bounds[int(i)])
        micro, meso = patch_indices(pos)
        valid = has_graph(cells.size, min_cells)
        ei = tile_cell_graph(
            pos,
            tile_um,
            method=method,
            k=k,
            radius_um=radius_um,
            max_dist_um=max_dist_um,
            micro_blocks=micro_blocks,
        )
        out.append(
            TileCells(
                tile=int(i),
                cells=cells,
                pos=pos.astype(np.float32),
                micro=micro,
                meso=meso,
                edge_index=ei,
                valid=bool(valid),
            )
        )
    return out
