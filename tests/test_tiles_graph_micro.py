"""G_micro built inside each micro block: edges never cross blocks, every block with ≥ 2
cells is connected within itself, and fewer cells are isolated than with the tile-wide
Delaunay filtered to the blocks — on a synthetic tile and on the embedded sample."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sigmma.tiles.graphs import isolated_fraction, patch_indices, tile_cell_graph


def _filtered(pos: np.ndarray, tile_um: float, **kw) -> np.ndarray:
    """The former G_micro: the tile-wide graph, filtered to the micro blocks."""
    ei = tile_cell_graph(pos, tile_um, micro_blocks=False, **kw)
    micro, _ = patch_indices(pos)
    return ei[:, micro[ei[0]] == micro[ei[1]]]


def _isolated(ei: np.ndarray, n: int) -> int:
    return int((np.bincount(ei[0], minlength=n) == 0).sum())


@pytest.mark.parametrize("method", ["delaunay", "knn", "radius"])
def test_edges_stay_inside_micro_blocks_and_blocks_are_connected(method):
    rng = np.random.default_rng(0)
    # a dense half and a sparse half: the sparse blocks hold 2-4 cells
    pos = np.vstack([rng.random((150, 2)) * [0.5, 1.0], 0.5 + rng.random((20, 2)) * 0.499])
    pos[-20:, 1] = rng.random(20) * 0.999
    ei = tile_cell_graph(pos, 128.0, method=method, k=3, radius_um=40.0)
    micro, _ = patch_indices(pos)
    assert ei.shape[0] == 2 and ei.shape[1] > 0
    assert (micro[ei[0]] == micro[ei[1]]).all()
    pairs = set(map(tuple, ei.T.tolist()))
    assert all((v, u) in pairs for u, v in pairs)  # both directions
    if method != "radius":  # (a radius graph may leave far cells alone by design)
        for b in np.unique(micro):
            members = np.flatnonzero(micro == b)
            if members.size >= 2:
                assert _isolated(ei[:, np.isin(ei[0], members)], len(pos)) == len(pos) - len(
                    members
                ), b
    # the tile-wide graph is still available
    whole = tile_cell_graph(pos, 128.0, method=method, k=3, radius_um=40.0, micro_blocks=False)
    assert (micro[whole[0]] != micro[whole[1]]).any()


def _patchy_tile(rng: np.random.Generator) -> np.ndarray:
    """Micro blocks that are dense (20 cells) or sparse (2 cells), at random."""
    pts = []
    for blk in range(16):
        r, c = divmod(blk, 4)
        m = 20 if rng.random() < 0.6 else 2
        pts.append((np.array([c, r]) + rng.random((m, 2)) * 0.999) / 4)
    return np.vstack(pts)


def test_sparse_blocks_are_no_longer_isolated_synthetic():
    rng = np.random.default_rng(1)
    before = after = n = 0
    for _ in range(20):
        pos = _patchy_tile(rng)
        before += _isolated(_filtered(pos, 128.0, method="knn", k=6), len(pos))
        after += _isolated(tile_cell_graph(pos, 128.0, method="knn", k=6), len(pos))
        n += len(pos)
    # every block has ≥ 2 cells: per-block graphs leave no cell alone; the tile-wide kNN
    # graph, filtered to the blocks, does when a sparse block's cells look outward
    assert after == 0 < before, (before, n)
    # Delaunay: a sparse block whose two cells sit in opposite corners amid dense blocks
    pts = [
        np.array([[1.05, 1.05], [1.95, 1.95]]) / 4
        if blk == 5
        else (np.array(divmod(blk, 4)[::-1]) + rng.random((40, 2)) * 0.999) / 4
        for blk in range(16)
    ]
    pos = np.vstack(pts)
    assert _isolated(_filtered(pos, 128.0), len(pos)) > 0
    assert _isolated(tile_cell_graph(pos, 128.0), len(pos)) == 0


def test_fewer_isolated_cells_on_the_embedded_sample(embedded_bundle):
    from napari_sigmma.io import load_any, slide_name
    from napari_sigmma.tiles.dataset import GraphSettings, prepare_slide
    from napari_sigmma.tiles.paired import PairedSlide

    paired = PairedSlide.from_sdata(load_any(embedded_bundle), name=slide_name(embedded_bundle))
    new = prepare_slide(paired)
    old = prepare_slide(paired, settings=GraphSettings(micro_blocks=False), grid=new.grid)
    f_new, f_old = isolated_fraction(new.cells), isolated_fraction(old.cells)
    assert f_new < f_old, (f_new, f_old)
    for c in new.cells:
        if c.edge_index.size:
            assert (c.micro[c.edge_index[0]] == c.micro[c.edge_index[1]]).all()
        # a cell is isolated only when it is alone in its micro block
        deg = np.bincount(c.edge_index[0], minlength=c.n_cells) if c.n_cells else []
        alone = np.bincount(c.micro, minlength=16)[c.micro] == 1
        assert np.array_equal(np.asarray(deg) == 0, alone) or c.n_cells < 2
    assert (
        GraphSettings().edges(new.cells[0].pos, new.grid.tile_um).shape
        == new.cells[0].edge_index.shape
    )
