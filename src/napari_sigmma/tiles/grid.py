"""Tile grid over the tissue at a target µm/px, and tile reading with resampling.

A tile is ``tile_px`` × ``tile_px`` pixels at ``target_mpp`` µm/px (paper: 256 px at
0.5 µm/px, i.e. 128 µm). Slides come at other resolutions (Xenium H&E is ~0.27 µm/px), so a
tile covers ``tile_px * target_mpp / slide_mpp`` level-0 pixels — generally not an integer —
and is resampled from the pyramid level nearest the target (never coarser than it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    from napari_sigmma.tiles.paired import PairedSlide

ALLOWED_TILE_PX = (224, 256, 512)


@dataclass
class TileGrid:
    """Regular grid of square tiles over one slide (only tissue tiles kept).

    Attributes
    ----------
    tile_px
        Tile side in pixels at ``target_mpp``.
    target_mpp, slide_mpp
        µm/px of the tiles and of the slide's level 0.
    bounds
        ``(T, 4)`` float64 ``x0, y0, x1, y1`` in level-0 pixels (half-open).
    rows, cols
        ``(T,)`` int64 grid position of each tile.
    tile_ids
        ``(T,)`` strings ``"r{row}_c{col}"``, unique within the slide.
    n_rows, n_cols
        Full grid size (before dropping background).
    tissue
        ``(T,)`` tissue fraction of each kept tile.
    origin
        ``(x, y)`` level-0 pixel of the grid's top-left corner.
    """

    tile_px: int
    target_mpp: float
    slide_mpp: float
    bounds: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    tile_ids: list[str]
    n_rows: int
    n_cols: int
    tissue: np.ndarray
    origin: tuple[float, float] = (0.0, 0.0)
    _lookup: dict[tuple[int, int], int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.bounds.shape[0])

    @property
    def tile_size(self) -> float:
        """Tile side in level-0 pixels."""
        return self.tile_px * self.target_mpp / self.slide_mpp

    @property
    def tile_um(self) -> float:
        """Tile side in µm."""
        return self.tile_px * self.target_mpp

    def index_of(self, row: int, col: int) -> int:
        """Tile index at a grid position, ``-1`` when that tile was dropped."""
        if self._lookup is None:
            self._lookup = {
                (int(r), int(c)): i
                for i, (r, c) in enumerate(zip(self.rows, self.cols, strict=True))
            }
        return self._lookup.get((int(row), int(col)), -1)

    def locate(self, xy: np.ndarray) -> np.ndarray:
        """Tile index of each level-0 point ``(N, 2)``; ``-1`` outside every kept tile."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        out = np.full(xy.shape[0], -1, dtype=np.int64)
        if len(self) == 0 or xy.shape[0] == 0:
            return out
        s = self.tile_size
        c = np.floor((xy[:, 0] - self.origin[0]) / s).astype(np.int64)
        r = np.floor((xy[:, 1] - self.origin[1]) / s).astype(np.int64)
        ok = (r >= 0) & (r < self.n_rows) & (c >= 0) & (c < self.n_cols)
        table = np.full((self.n_rows, self.n_cols), -1, dtype=np.int64)
        table[self.rows, self.cols] = np.arange(len(self))
        out[ok] = table[r[ok], c[ok]]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-type description (JSON / checkpoint friendly)."""
        return {
            "tile_px": int(self.tile_px),
            "target_mpp": float(self.target_mpp),
            "slide_mpp": float(self.slide_mpp),
            "n_rows": int(self.n_rows),
            "n_cols": int(self.n_cols),
            "origin": [float(self.origin[0]), float(self.origin[1])],
            "rows": self.rows.tolist(),
            "cols": self.cols.tolist(),
            "tissue": self.tissue.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TileGrid:
        rows = np.asarray(d["rows"], dtype=np.int64)
        cols = np.asarray(d["cols"], dtype=np.int64)
        return _make(
            int(d["tile_px"]),
            float(d["target_mpp"]),
            float(d["slide_mpp"]),
            rows,
            cols,
            int(d["n_rows"]),
            int(d["n_cols"]),
            np.asarray(d.get("tissue", np.ones(len(rows))), dtype=np.float64),
            tuple(d.get("origin", (0.0, 0.0))),
        )

    def subset(self, indices: np.ndarray) -> TileGrid:
        """A grid holding only ``indices`` (same geometry)."""
        idx = np.asarray(indices, dtype=np.int64)
        return _make(
            self.tile_px,
            self.target_mpp,
            self.slide_mpp,
            self.rows[idx],
            self.cols[idx],
            self.n_rows,
            self.n_cols,
            self.tissue[idx],
            self.origin,
        )


def _make(
    tile_px: int,
    target_mpp: float,
    slide_mpp: float,
    rows: np.ndarray,
    cols: np.ndarray,
    n_rows: int,
    n_cols: int,
    tissue: np.ndarray,
    origin: tuple[float, float] = (0.0, 0.0),
) -> TileGrid:
    s = tile_px * target_mpp / slide_mpp
    x0 = origin[0] + cols * s
    y0 = origin[1] + rows * s
    bounds = np.stack([x0, y0, x0 + s, y0 + s], axis=1).astype(np.float64).reshape(-1, 4)
    ids = [f"r{int(r)}_c{int(c)}" for r, c in zip(rows, cols, strict=True)]
    return TileGrid(
        tile_px=int(tile_px),
        target_mpp=float(target_mpp),
        slide_mpp=float(slide_mpp),
        bounds=bounds,
        rows=np.asarray(rows, dtype=np.int64),
        cols=np.asarray(cols, dtype=np.int64),
        tile_ids=ids,
        n_rows=int(n_rows),
        n_cols=int(n_cols),
        tissue=np.asarray(tissue, dtype=np.float64),
        origin=(float(origin[0]), float(origin[1])),
    )


def tissue_mask_rgb(rgb: np.ndarray) -> np.ndarray:
    """Tissue mask of an RGB thumbnail: saturation or optical density above Otsu.

    The Otsu thresholds are clamped to plausible ranges so a slide that is all tissue (or
    all glass) is not split in half by a threshold between two tissue shades.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    rgb = np.asarray(rgb, dtype=np.float32)[..., :3]
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    mx = rgb.max(axis=2)
    mn = rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    od = (-np.log10((rgb + 1.0) / 256.0)).mean(axis=2)

    def _otsu(v: np.ndarray, lo: float, hi: float) -> float:
        if float(v.max() - v.min()) < 1e-6:
            return hi
        return float(np.clip(threshold_otsu(v), lo, hi))

    t_sat = _otsu(sat, 0.05, 0.15)
    t_od = _otsu(od, 0.08, 0.3)
    mask = (sat > t_sat) | (od > t_od)
    # Close small gaps between nuclei and drop specks of dust.
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3)), iterations=2)
    mask = ndi.binary_opening(mask, structure=np.ones((3, 3)))
    return mask


def slide_tissue_mask(paired: PairedSlide, *, max_side: int = 2048) -> tuple[np.ndarray, float]:
    """Tissue mask of the slide and its downsample from level 0.

    Uses :func:`napari_sigmma.io.wsi.tissue_mask` on the slide's pyramid, else (an image
    that does not offer what it reads) a thumbnail-level saturation / optical-density Otsu
    mask (:func:`tissue_mask_rgb`).
    """
    from napari_sigmma.io.wsi import tissue_mask

    try:
        mask, ds = tissue_mask(paired.image)
        return np.asarray(mask, dtype=bool), float(ds)
    except (AttributeError, TypeError, KeyError):
        # The io mask wants a real Slide object; the paired image is only its duck type.
        pass
    thumb, ds = paired.image.thumbnail(max_side)
    return tissue_mask_rgb(thumb), float(ds)


def _rect_fractions(mask: np.ndarray, ds: float, bounds: np.ndarray) -> np.ndarray:
    """Mean of ``mask`` over each level-0 rectangle (integral image in mask pixels)."""
    h, w = mask.shape
    ii = np.zeros((h + 1, w + 1), dtype=np.float64)
    ii[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    b = bounds / ds
    x0 = np.clip(np.floor(b[:, 0] + 0.5), 0, w).astype(np.int64)
    y0 = np.clip(np.floor(b[:, 1] + 0.5), 0, h).astype(np.int64)
    x1 = np.clip(np.floor(b[:, 2] + 0.5), 0, w).astype(np.int64)
    y1 = np.clip(np.floor(b[:, 3] + 0.5), 0, h).astype(np.int64)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    s = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return s / area


def make_tile_grid(
    paired: PairedSlide,
    *,
    tile_px: int = 256,
    target_mpp: float = 0.5,
    min_tissue: float = 0.25,
    mask: tuple[np.ndarray, float] | None = None,
) -> TileGrid:
    """Tile the slide at ``target_mpp`` and keep tiles with enough tissue.

    Parameters
    ----------
    paired
        The slide (only ``image`` and ``he_mpp`` are used).
    tile_px
        Tile side at the target resolution: 224, 256 (paper default) or 512.
    target_mpp
        µm/px of the tiles (paper: 0.5, i.e. 20×).
    min_tissue
        Minimum tissue fraction of a kept tile; 0 keeps every tile.
    mask
        ``(mask, downsample)`` to use instead of computing the tissue mask.

    Returns
    -------
    TileGrid
        Whole tiles inside the slide (``floor(W / size)`` × ``floor(H / size)``, as in the
        paper), background tiles dropped.
    """
    if int(tile_px) not in ALLOWED_TILE_PX:
        raise SigmmaError(f"tile_px must be one of {ALLOWED_TILE_PX}, got {tile_px}")
    if not target_mpp or target_mpp <= 0:
        raise SigmmaError(f"target µm/px must be positive, got {target_mpp}")
    slide_mpp = float(paired.he_mpp)
    size = tile_px * target_mpp / slide_mpp
    h, w = paired.image.shape
    n_rows = math.floor(h / size + 1e-9)
    n_cols = math.floor(w / size + 1e-9)
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rr.ravel(), cc.ravel()
    full = _make(tile_px, target_mpp, slide_mpp, rows, cols, n_rows, n_cols, np.ones(rows.size))
    if len(full) == 0:
        return full
    if min_tissue and min_tissue > 0:
        m, ds = mask if mask is not None else slide_tissue_mask(paired)
        frac = _rect_fractions(np.asarray(m, dtype=bool), float(ds), full.bounds)
        keep = frac >= min_tissue
        return _make(
            tile_px,
            target_mpp,
            slide_mpp,
            rows[keep],
            cols[keep],
            n_rows,
            n_cols,
            frac[keep],
        )
    return full


def read_tile(paired: PairedSlide, grid: TileGrid, i: int) -> np.ndarray:
    """Read tile ``i`` as ``(S, S, 3)`` uint8 at the grid's target µm/px.

    Reads lazily from the pyramid level nearest the target (not coarser) and resamples the
    exact, generally fractional, level rectangle to ``S × S`` (antialiased bilinear).
    """
    from PIL import Image

    img = paired.image
    s_out = int(grid.tile_px)
    level = img.best_level(grid.target_mpp)
    ds = img.downsamples[level]
    bx0, by0, bx1, by1 = (grid.bounds[i] / ds).tolist()
    ix0, iy0 = math.floor(bx0), math.floor(by0)
    ix1, iy1 = math.ceil(bx1), math.ceil(by1)
    region = img.read_region(ix0, iy0, ix1 - ix0, iy1 - iy0, level=level)
    box = (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)
    if (
        region.shape[0] == s_out
        and region.shape[1] == s_out
        and abs(box[0]) < 1e-6
        and abs(box[1]) < 1e-6
    ):
        return region
    pil = Image.fromarray(region)
    out = pil.resize((s_out, s_out), resample=Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8)


def read_tiles(
    paired: PairedSlide,
    grid: TileGrid,
    indices: np.ndarray | None = None,
    *,
    progress: Any = None,
) -> np.ndarray:
    """Read many tiles ``(n, S, S, 3)`` uint8; holds the source level in memory when small."""
    idx = np.arange(len(grid)) if indices is None else np.asarray(indices, dtype=np.int64)
    s = int(grid.tile_px)
    out = np.empty((idx.size, s, s, 3), dtype=np.uint8)
    level = paired.image.best_level(grid.target_mpp)
    # Release afterwards only what this call loaded.
    held = level not in paired.image._memory and paired.image.hold_level(level)
    try:
        for k, i in enumerate(idx):
            out[k] = read_tile(paired, grid, int(i))
            if progress is not None:
                progress(k + 1, idx.size)
    finally:
        if held:
            paired.image.release(level)
    return out
