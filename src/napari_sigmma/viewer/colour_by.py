"""Colour cells and tiles by a table column or a gene (what napari-spatialdata calls
"colour by").

:func:`colour_options` lists what a slide's cells can be coloured by: every column of the
cell table that is numeric, or categorical with at most :data:`MAX_CATEGORIES` values (a
per-cell id is not a colour), then every gene. :func:`colour_by` turns one of them into a
:class:`ColourBy`: a value per cell and the colours that go with it —

- **categorical** columns: one Glasbey colour per category (the palette of every SIGMMA
  layer, :mod:`napari_sigmma.viewer.palette`), listed in the legend with their counts;
- **numeric** columns and **genes** (log1p of the counts scaled to ``target_sum`` per cell,
  as the gene maps use): viridis over one robust range shared by cells and tiles — each
  one's 1st–99th percentile range, joined — shown as a colourbar.

:meth:`ColourBy.tile_raster` aggregates the cells per micro patch (4 × 4 per tile) for the
tiles layer: the mean for numeric values (for genes, log1p of the mean scaled expression,
like the measured gene map, which :func:`patch_means` and :func:`scaled_expression` also
make), the most frequent category for categorical ones. Plain numpy; each call is one pass
over the cells (done once per choice, never per frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.viewer.palette import NO_CATEGORY_RGBA, category_colours

if TYPE_CHECKING:
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide

#: the default: cells by their graph-node cluster, tiles by their image cluster
CLUSTERS = "SIGMMA clusters"
#: categorical columns with more values than this are identifiers, not colours
MAX_CATEGORIES = 256
NUMERIC_COLORMAP = "viridis"
GENE_UNITS = "log1p expression (counts scaled per cell)"
#: micro patches per tile side (the tiles layer's resolution)
PER_SIDE = 4


@dataclass
class ColourBy:
    """A colouring of a slide's cells by one column or gene.

    Attributes
    ----------
    name
        The column or gene.
    source
        ``"column"`` or ``"gene"``.
    kind
        ``"categorical"`` or ``"numeric"``.
    values
        ``(n_cells,)`` float values (numeric; NaN = missing) or int category codes
        (categorical; ``-1`` = missing).
    names
        Category names (categorical), in code order.
    colours
        ``(len(names), 3)`` RGB of the categories.
    limits
        ``(lo, hi)`` of the colour scale (numeric).
    units
        What a numeric value is (for the legend).
    """

    name: str
    source: str
    kind: str
    values: np.ndarray
    names: list[str] = field(default_factory=list)
    colours: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    limits: tuple[float, float] = (0.0, 1.0)
    units: str = ""
    _tiles: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    # a gene's scaled (not log) expression per cell: the tiles average it before log1p
    _raw: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def categorical(self) -> bool:
        return self.kind == "categorical"

    def rgba(self, cells: np.ndarray) -> np.ndarray:
        """``(n, 4)`` float32 RGBA of the cells ``cells`` (global indices)."""
        v = self.values[np.asarray(cells, dtype=np.int64)]
        out = np.tile(np.asarray(NO_CATEGORY_RGBA, np.float32), (v.size, 1))
        if self.categorical:
            ok = v >= 0
            out[ok, :3] = self.colours[v[ok]]
            out[ok, 3] = 1.0
            return out
        ok = np.isfinite(v)
        out[ok] = numeric_rgba(v[ok], self.limits)
        return out

    def counts(self, cells: np.ndarray | None = None) -> np.ndarray:
        """Cells per category (all cells, or those in ``cells``)."""
        v = self.values if cells is None else self.values[np.asarray(cells, dtype=np.int64)]
        v = v[v >= 0]
        return np.bincount(v, minlength=len(self.names))[: len(self.names)]

    def label(self, value: Any) -> str:
        """A cell's value as text (category name, or the number)."""
        if self.categorical:
            code = int(value)
            return self.names[code] if 0 <= code < len(self.names) else "—"
        v = float(value)
        return "—" if not np.isfinite(v) else f"{v:.3g}"

    def tile_raster(self, paired: PairedSlide, grid: TileGrid) -> np.ndarray:
        """Per micro patch of every tile, ``(n_rows * 4, n_cols * 4)``: mean value (float32,
        NaN without cells; for a gene the log1p of the mean scaled expression, as the
        measured gene map) or most frequent category + 1 (int32, 0 without cells)."""
        key = id(grid)
        if key not in self._tiles:
            self._tiles[key] = self._tile_raster(paired, grid)
        return self._tiles[key]

    def _tile_raster(self, paired: PairedSlide, grid: TileGrid) -> np.ndarray:
        if not self.categorical:
            if self.source == "gene":
                return np.log1p(patch_means(paired, grid, self._raw))
            return patch_means(paired, grid, self.values)
        patch, ok = patch_of_cells(paired, grid)
        shape = (grid.n_rows * PER_SIDE, grid.n_cols * PER_SIDE)
        n = shape[0] * shape[1]
        codes = self.values
        use = ok & (codes >= 0)
        m = max(len(self.names), 1)
        table = np.bincount(patch[use] * m + codes[use], minlength=n * m).reshape(n, m)
        out = np.where(table.sum(axis=1) > 0, np.argmax(table, axis=1) + 1, 0)
        return out.reshape(shape).astype(np.int32)


def numeric_rgba(values: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    """``(n, 4)`` viridis RGBA of ``values`` over ``limits`` (clipped at both ends)."""
    from napari.utils.colormaps import ensure_colormap

    lo, hi = limits
    t = np.clip((np.asarray(values, np.float64) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return np.asarray(ensure_colormap(NUMERIC_COLORMAP).map(t), dtype=np.float32)


def patch_of_cells(
    paired: PairedSlide, grid: TileGrid, per_side: int = PER_SIDE
) -> tuple[np.ndarray, np.ndarray]:
    """Row-major index of each cell's patch in the ``(n_rows * per_side, n_cols *
    per_side)`` raster, and whether the cell lies in a kept tile (the grouping of
    :func:`napari_sigmma.analysis.genehead.measured_expression`: the tile holding the
    centroid, then ``floor(per_side * local position)``)."""
    xy = np.asarray(paired.cells_px, dtype=np.float64).reshape(-1, 2)
    tile = grid.locate(xy)
    ok = tile >= 0
    t = np.where(ok, tile, 0)
    b = np.asarray(grid.bounds, dtype=np.float64)[t]
    pos = np.clip((xy - b[:, :2]) / np.maximum(b[:, 2:] - b[:, :2], 1e-12), 0.0, 1.0)
    q = np.clip(np.floor(pos * per_side), 0, per_side - 1).astype(np.int64)
    row = np.asarray(grid.rows, np.int64)[t] * per_side + q[:, 1]
    col = np.asarray(grid.cols, np.int64)[t] * per_side + q[:, 0]
    return row * (grid.n_cols * per_side) + col, ok


def patch_means(
    paired: PairedSlide, grid: TileGrid, values: np.ndarray, per_side: int = PER_SIDE
) -> np.ndarray:
    """Mean of a per-cell value over the cells of every patch, ``(n_rows * per_side,
    n_cols * per_side)`` float32 (NaN without cells); one pass over the cells."""
    patch, ok = patch_of_cells(paired, grid, per_side)
    shape = (grid.n_rows * per_side, grid.n_cols * per_side)
    n = shape[0] * shape[1]
    vals = np.asarray(values, dtype=np.float64)
    use = ok & np.isfinite(vals)
    total = np.bincount(patch[use], weights=vals[use], minlength=n)
    count = np.bincount(patch[use], minlength=n)
    mean = np.divide(total, count, out=np.full(n, np.nan), where=count > 0)
    return mean.reshape(shape).astype(np.float32)


def scaled_expression(
    paired: PairedSlide,
    gene: str,
    *,
    target_sum: float | None = None,
    total_genes: list[str] | None = None,
) -> np.ndarray:
    """A gene's counts per cell, each cell scaled so that its counts over ``total_genes``
    (default: every non-control gene, as the gene head's targets) sum to ``target_sum``
    (default: the median cell total) — the normalisation of the gene head's targets, so
    measured and predicted maps are on one scale. (Scaling over the one gene alone would
    put every cell that has any of it at ``target_sum``.)"""
    import scipy.sparse as sp

    from napari_sigmma.analysis.genehead import default_genes, median_target_sum
    from napari_sigmma.errors import SigmmaError
    from napari_sigmma.tiles.features import align_counts

    if gene not in paired.genes:
        raise SigmmaError(f"no gene {gene!r} in the cell table")
    genes = list(total_genes) if total_genes is not None else default_genes(paired)
    ts = float(target_sum) if target_sum else median_target_sum(paired)
    totals = np.asarray(align_counts(paired.counts, paired.genes, genes).sum(axis=1))
    totals = totals.astype(np.float64).ravel()
    counts = sp.csr_matrix(paired.counts)
    col = np.asarray(counts[:, paired.genes.index(gene)].todense(), np.float64).ravel()
    return np.divide(col * ts, totals, out=np.zeros_like(col), where=totals > 0)


def _is_categorical(series: Any) -> bool:
    import pandas as pd

    return not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)


def colour_options(paired: PairedSlide) -> tuple[list[str], list[str]]:
    """``(columns, genes)`` the cells of ``paired`` can be coloured by."""
    columns = []
    obs = paired.obs
    for col in obs.columns:
        s = obs[col]
        if _is_categorical(s) and s.nunique(dropna=True) > MAX_CATEGORIES:
            continue  # an identifier (cell ids), not a category
        columns.append(str(col))
    return columns, [str(g) for g in paired.genes]


def robust_range(*arrays: np.ndarray) -> tuple[float, float]:
    """Each array's 1st–99th percentile range, joined (at most 1 % of each is clipped at
    either end); ``(0, 1)`` without finite values."""
    los, his = [], []
    for a in arrays:
        v = np.asarray(a, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if v.size:
            los.append(float(np.percentile(v, 1)))
            his.append(float(np.percentile(v, 99)))
    if not los:
        return 0.0, 1.0
    lo, hi = min(los), max(his)
    return (lo, hi) if hi > lo else (lo, lo + 1e-3)


def colour_by(
    paired: PairedSlide,
    name: str,
    *,
    grid: TileGrid | None = None,
    target_sum: float | None = None,
    total_genes: list[str] | None = None,
) -> ColourBy:
    """The colouring of ``paired``'s cells by column or gene ``name`` (columns first).

    ``grid`` (when given) makes the numeric colour scale cover the tiles' values as well as
    the cells'; genes are scaled as :func:`scaled_expression` does (``target_sum``,
    ``total_genes``: the gene head's).
    """
    from napari_sigmma.errors import SigmmaError

    obs = paired.obs
    if name in obs.columns:
        s = obs[name]
        if _is_categorical(s):
            ok = s.notna().to_numpy()
            text = s.astype(str).to_numpy()
            names = sorted({str(v) for v in text[ok]})
            if len(names) > MAX_CATEGORIES:
                raise SigmmaError(
                    f"column {name!r} has {len(names)} values: too many to colour "
                    f"(at most {MAX_CATEGORIES})"
                )
            import pandas as pd

            codes = np.asarray(pd.Categorical(text, categories=names).codes, np.int64)
            codes[~ok] = -1
            return ColourBy(
                name=name,
                source="column",
                kind="categorical",
                values=codes.astype(np.int64),
                names=names,
                colours=category_colours(len(names)),
            )
        vals = s.to_numpy(dtype=np.float64, na_value=np.nan)
        cb = ColourBy(name=name, source="column", kind="numeric", values=vals, units=name)
    elif name in paired.genes:
        scaled = scaled_expression(paired, name, target_sum=target_sum, total_genes=total_genes)
        cb = ColourBy(
            name=name, source="gene", kind="numeric", values=np.log1p(scaled), units=GENE_UNITS
        )
        cb._raw = scaled
    else:
        raise SigmmaError(f"no column or gene {name!r} in the cell table")
    tiles = cb.tile_raster(paired, grid) if grid is not None else np.zeros(0)
    cb.limits = robust_range(cb.values, tiles)
    return cb
