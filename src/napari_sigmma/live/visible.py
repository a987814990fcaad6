"""Which tiles of a grid are on screen: pure geometry, no Qt (the viewer's controller and the
tests share it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from napari_sigmma.tiles.grid import TileGrid


def clip_box(box: Sequence[float], shape: Sequence[int]) -> tuple[float, float, float, float]:
    """Clip an ``(x0, y0, x1, y1)`` level-0 box to a slide of ``shape`` ``(H, W)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    h, w = float(shape[0]), float(shape[1])
    return (min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h))


def visible_indices(
    grid: TileGrid, box: Sequence[float], *, centre_first: bool = True
) -> np.ndarray:
    """Grid indices of the tiles that overlap ``box``, nearest the box centre first.

    Parameters
    ----------
    grid
        The slide's tile grid (bounds in level-0 pixels, half-open).
    box
        ``(x0, y0, x1, y1)`` in level-0 pixels (e.g. the viewer's visible region).
    centre_first
        Order by distance of the tile centre to the box centre (ties by index) instead of
        grid order.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` int64 indices into the grid. A tile touching the box only along an edge
        (zero-area overlap) is not visible.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if len(grid) == 0 or x1 <= x0 or y1 <= y0:
        return np.zeros(0, dtype=np.int64)
    b = grid.bounds
    hit = (b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0)
    idx = np.flatnonzero(hit).astype(np.int64)
    if centre_first and idx.size > 1:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        tc = (b[idx, :2] + b[idx, 2:]) / 2
        d = np.hypot(tc[:, 0] - cx, tc[:, 1] - cy)
        idx = idx[np.lexsort((idx, d))]
    return idx


def visible_tiles(grid: TileGrid, box: Sequence[float], *, centre_first: bool = True) -> list[str]:
    """Tile ids overlapping ``box`` (level-0 ``x0, y0, x1, y1``), centre first.

    See :func:`visible_indices`.
    """
    return [grid.tile_ids[int(i)] for i in visible_indices(grid, box, centre_first=centre_first)]
