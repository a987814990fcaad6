"""Categorical colours for every SIGMMA layer: colorcet's Glasbey palette.

Cell types and clusters (every scale, image and cell layers alike) take their colours from
one palette of 256 maximally distinct colours (Glasbey et al. 2007, as colorcet ships it,
without the near-black and near-white entries), so that 30 or more categories stay
distinguishable and cluster ``i`` has the same colour in every layer and in the legend.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

#: RGBA of cells / patches without a category (no cluster yet)
NO_CATEGORY_RGBA = (0.75, 0.75, 0.75, 0.8)


@lru_cache(maxsize=1)
def glasbey() -> np.ndarray:
    """``(256, 3)`` float RGB in [0, 1]."""
    import colorcet

    return np.asarray(colorcet.glasbey_bw_minc_20, dtype=np.float32)


def category_colours(n: int) -> np.ndarray:
    """``(n, 3)`` RGB: colour ``i`` of the palette for category ``i`` (cycling past 256)."""
    pal = glasbey()
    return pal[np.arange(int(n)) % len(pal)]


def label_rgba(labels: np.ndarray) -> np.ndarray:
    """``(N, 4)`` float32 RGBA per label (``-1``: neutral grey)."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.tile(np.asarray(NO_CATEGORY_RGBA, np.float32), (labels.size, 1))
    ok = labels >= 0
    pal = glasbey()
    out[ok, :3] = pal[labels[ok] % len(pal)]
    out[ok, 3] = 1.0
    return out


def categorical(values: Sequence[object]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names (sorted), per-value category index and counts of a categorical column."""
    arr = np.asarray([str(v) for v in values], dtype=object)
    names, codes, counts = np.unique(arr, return_inverse=True, return_counts=True)
    return [str(n) for n in names], codes.astype(np.int64), counts.astype(np.int64)


def to_hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(255 * float(v)):02x}" for v in list(rgb)[:3])
