"""Cells per tile (through the transforms), tile-local positions, patch indices, graphs."""

from __future__ import annotations

import numpy as np
import pytest

from _tiles_data import make_sdata
from napari_sigmma.errors import SigmmaError
from napari_sigmma.tiles.graphs import (
    build_tile_cells,
    cells_per_tile,
    local_positions,
    patch_indices,
    tile_graph,
)
from napari_sigmma.tiles.grid import make_tile_grid
from napari_sigmma.tiles.paired import PairedSlide


def test_cells_in_tiles_through_a_non_identity_affine():
    # 0.3 µm/px → tile side 426.67 level-0 px at 256 px × 0.5 µm/px; 2 rows × 3 cols.
    he_mpp = 0.3
    size = 256 * 0.5 / he_mpp
    # Cells at chosen tile-local positions (in H&E px) of chosen tiles.
    wanted = [
        # (row, col, local x, local y)
        (0, 0, 0.10, 0.90),
        (0, 0, 0.60, 0.30),
        (0, 2, 0.99, 0.01),
        (1, 1, 0.50, 0.50),
        (1, 1, 0.26, 0.74),
        (1, 2, 0.0001, 0.9999),
    ]
    pts = np.array([[(c + lx) * size, (r + ly) * size] for r, c, lx, ly in wanted])
    # Plus one cell outside every tile (beyond the last full column).
    pts = np.vstack([pts, [3 * size + 5, 10.0]])
    sdata, _, _ = make_sdata(
        h=900, w=1350, he_mpp=he_mpp, angle_deg=-23.0, translate=(300.0, 75.0), cells_px=pts
    )
    p = PairedSlide.from_sdata(sdata)
    g = make_tile_grid(p, min_tissue=0)
    assert (g.n_rows, g.n_cols) == (2, 3)
    per = cells_per_tile(p.cells_px, g)
    assert sum(len(c) for c in per) == len(wanted)  # the outside cell belongs nowhere
    for k, (r, c, lx, ly) in enumerate(wanted):
        t = g.index_of(r, c)
        assert k in per[t]
        pos = local_positions(p.cells_px[[k]], g.bounds[t])
        np.testing.assert_allclose(pos[0], [lx, ly], atol=1e-9)
    micro, meso = patch_indices(np.array([[lx, ly] for _, _, lx, ly in wanted]))
    # micro = 4*floor(4y) + floor(4x); meso = 2*floor(2y) + floor(2x)
    assert micro.tolist() == [12, 4 + 2, 3, 8 + 2, 8 + 1, 12]
    assert meso.tolist() == [2, 1, 1, 3, 2, 2]
    assert micro.dtype == np.int64


def test_positions_stay_below_one_on_the_far_edge():
    pos = local_positions(np.array([[10.0, 10.0], [0.0, 0.0]]), np.array([0.0, 0.0, 10.0, 10.0]))
    assert (pos < 1).all() and (pos >= 0).all()
    micro, meso = patch_indices(pos)
    assert micro.tolist() == [15, 0] and meso.tolist() == [3, 0]


def _is_symmetric(ei: np.ndarray) -> bool:
    a = set(map(tuple, ei.T.tolist()))
    return all((v, u) in a for u, v in a)


def test_delaunay_knn_radius_graphs():
    g = np.stack(np.meshgrid(np.arange(4.0), np.arange(4.0)), -1).reshape(-1, 2)
    g = g + np.random.default_rng(0).normal(scale=0.01, size=g.shape)  # break co-circularity
    ei = tile_graph(g, method="delaunay")
    assert ei.dtype == np.int64 and ei.shape[0] == 2
    assert _is_symmetric(ei) and not (ei[0] == ei[1]).any()
    # A triangulation of a 4×4 lattice: the 24 lattice edges plus one diagonal per square.
    assert 2 * 24 < ei.shape[1] <= 2 * (3 * 16 - 6)
    knn = tile_graph(g, method="knn", k=4)
    assert _is_symmetric(knn)
    assert np.bincount(knn[0], minlength=16).min() >= 4
    rad = tile_graph(g, method="radius", radius=1.05)
    # Unit-spaced 4×4 lattice: 24 lattice edges within radius ~1.
    assert rad.shape[1] == 2 * 24
    pruned = tile_graph(g, method="delaunay", max_dist=1.05)
    assert pruned.shape[1] == 2 * 24
    with pytest.raises(SigmmaError):
        tile_graph(g, method="radius")
    with pytest.raises(SigmmaError):
        tile_graph(g, method="nope")


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_graphs_do_not_crash(n):
    ei = tile_graph(np.random.default_rng(1).random((n, 2)))
    assert ei.shape == (2, 0 if n < 2 else 2)


def test_collinear_and_duplicate_points_still_get_a_graph():
    line = np.c_[np.arange(5.0), np.zeros(5)]
    ei = tile_graph(line)
    assert ei.shape[1] > 0 and _is_symmetric(ei)
    dup = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    ei = tile_graph(dup)
    assert ei.shape[0] == 2 and set(ei.ravel()) == {0, 1, 2}  # nobody left alone
    # a duplicated row in an otherwise normal tile: qhull keeps one of each coincident pair,
    # so the copy must get its twin and its twin's neighbours, not be isolated
    rng = np.random.default_rng(3)
    xy = rng.random((30, 2))
    with_copy = np.vstack([xy, xy[[4, 17]]])  # cells 30 and 31 copy cells 4 and 17
    ei = tile_graph(with_copy)
    assert _is_symmetric(ei)
    nbrs = {i: set(ei[1][ei[0] == i].tolist()) for i in range(32)}
    assert all(nbrs[i] for i in range(32))
    base = tile_graph(xy)
    for copy, twin in ((30, 4), (31, 17)):
        assert twin in nbrs[copy]
        assert nbrs[copy] - {twin} == set(base[1][base[0] == twin].tolist())


def test_tiles_with_few_cells_are_flagged_not_dropped():
    he_mpp = 0.5  # 256 px tiles in level 0
    pts = [[10, 10], [20, 30], [200, 40], [100, 100]]  # tile (0,0): 4 cells
    pts += [[300, 10]]  # tile (0,1): 1 cell
    pts += [[10, 300], [60, 310]]  # tile (1,0): 2 cells;  tile (1,1): none
    sdata, _, _ = make_sdata(h=512, w=512, he_mpp=he_mpp, cells_px=np.array(pts, float))
    p = PairedSlide.from_sdata(sdata)
    g = make_tile_grid(p, min_tissue=0)
    tc = build_tile_cells(p, g, min_cells=3)
    by_rc = {(int(g.rows[t.tile]), int(g.cols[t.tile])): t for t in tc}
    assert by_rc[(0, 0)].valid and by_rc[(0, 0)].n_cells == 4
    assert not by_rc[(0, 1)].valid and by_rc[(0, 1)].edge_index.shape == (2, 0)
    assert not by_rc[(1, 0)].valid and by_rc[(1, 0)].edge_index.shape == (2, 2)
    assert not by_rc[(1, 1)].valid and by_rc[(1, 1)].n_cells == 0
    assert by_rc[(1, 1)].pos.shape == (0, 2) and by_rc[(1, 1)].micro.shape == (0,)
    knn = build_tile_cells(p, g, method="knn", k=2, min_cells=1)
    assert all(t.valid for t in knn if t.n_cells)
