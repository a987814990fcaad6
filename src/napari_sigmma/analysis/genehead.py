"""Gene-expression head: ridge maps from HE embeddings to log1p expression, saved with a run.

Two maps are fitted on the *training* tiles of a run:

- ``macro``: the tile's HE macro embedding → the tile's expression (``log1p`` of the mean
  normalised expression of its cells, as :func:`napari_sigmma.tiles.features.tile_gene_vectors`);
- ``micro``: each micro crop's embedding → the expression of the cells in that micro patch
  (patches with at least ``min_cells`` cells), so gene maps can be drawn at 4×4 per tile.

Embeddings are standardised, targets centred (an unpenalised intercept), and the ridge
penalty is chosen by efficient leave-one-out (``RidgeCV``). The head is stored as an
``.npz`` of plain arrays (``gene_head.npz`` in the run folder), read with
``allow_pickle=False``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_sigmma.errors import SigmmaError
from napari_sigmma.files import atomic_savez

if TYPE_CHECKING:
    from napari_sigmma.embed.result import TileResult
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide

GENE_HEAD_FILE = "gene_head.npz"
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


@dataclass
class RidgeMap:
    """``y = ((x - x_mean) / x_scale) @ coef + y_mean``."""

    x_mean: np.ndarray
    x_scale: np.ndarray
    coef: np.ndarray
    y_mean: np.ndarray
    alpha: float
    n_train: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``(n, G)`` float32 predictions for ``(n, D)`` embeddings."""
        x = np.asarray(x, dtype=np.float32)
        z = (x - self.x_mean) / self.x_scale
        return (z @ self.coef + self.y_mean).astype(np.float32)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, alphas: Sequence[float] = ALPHAS) -> RidgeMap:
        from sklearn.linear_model import RidgeCV

        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape[0] < 3:
            raise SigmmaError(f"gene head needs at least 3 training items, got {x.shape[0]}")
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale < 1e-8] = 1.0
        z = (x - mean) / scale
        y_mean = y.mean(axis=0)
        model = RidgeCV(alphas=tuple(alphas), fit_intercept=False).fit(z, y - y_mean)
        coef = np.asarray(model.coef_, dtype=np.float64).reshape(y.shape[1], -1).T
        return cls(
            x_mean=mean.astype(np.float32),
            x_scale=scale.astype(np.float32),
            coef=coef.astype(np.float32),
            y_mean=y_mean.astype(np.float32),
            alpha=float(model.alpha_),
            n_train=int(x.shape[0]),
        )


@dataclass
class GeneHead:
    """Ridge maps (per scale) from HE embeddings to log1p expression of ``genes``.

    Attributes
    ----------
    genes
        Target gene names (columns of every prediction).
    target_sum
        Counts each cell was scaled to before averaging and ``log1p``.
    maps
        ``{"macro": RidgeMap, "micro": RidgeMap}`` (micro may be missing).
    run
        Run folder or checkpoint the embeddings came from (provenance).
    """

    genes: list[str]
    target_sum: float
    maps: dict[str, RidgeMap] = field(default_factory=dict)
    run: str = ""

    def gene_index(self, names: Sequence[str]) -> list[int]:
        """Columns of ``names``; unknown names raise :class:`SigmmaError`."""
        pos = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in names if g not in pos]
        if missing:
            raise SigmmaError(f"genes not in the gene head: {', '.join(missing[:5])}")
        return [pos[g] for g in names]

    def predict_tile(self, res: TileResult) -> tuple[np.ndarray, np.ndarray | None]:
        """``(G,)`` tile prediction and ``(16, G)`` micro-patch prediction (or ``None``)."""
        tile = self.maps["macro"].predict(res.he["macro"][None])[0]
        micro = self.maps["micro"].predict(res.he_crops[:16]) if "micro" in self.maps else None
        return tile, micro

    def apply(self, results: Sequence[TileResult]) -> None:
        """Fill ``genes_pred`` / ``genes_pred_micro`` of ``results`` in place."""
        for r in results:
            r.genes_pred, r.genes_pred_micro = self.predict_tile(r)

    # -- files --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an ``.npz`` of plain arrays (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "genes": np.array(self.genes, dtype=str),
            "target_sum": np.array(float(self.target_sum)),
            "scales": np.array(list(self.maps), dtype=str),
            "run": np.array(str(self.run)),
        }
        for s, m in self.maps.items():
            arrays[f"{s}__x_mean"] = m.x_mean
            arrays[f"{s}__x_scale"] = m.x_scale
            arrays[f"{s}__coef"] = m.coef
            arrays[f"{s}__y_mean"] = m.y_mean
            arrays[f"{s}__alpha"] = np.array(m.alpha)
            arrays[f"{s}__n_train"] = np.array(m.n_train)
        return atomic_savez(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GeneHead:
        """Read a file written by :meth:`save`."""
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise SigmmaError(f"cannot read gene head: {err}", path=path) from err
        with z:
            try:
                maps = {
                    str(s): RidgeMap(
                        x_mean=z[f"{s}__x_mean"],
                        x_scale=z[f"{s}__x_scale"],
                        coef=z[f"{s}__coef"],
                        y_mean=z[f"{s}__y_mean"],
                        alpha=float(z[f"{s}__alpha"]),
                        n_train=int(z[f"{s}__n_train"]),
                    )
                    for s in z["scales"]
                }
                return cls(
                    genes=[str(g) for g in z["genes"]],
                    target_sum=float(z["target_sum"]),
                    maps=maps,
                    run=str(z["run"]),
                )
            except KeyError as err:
                raise SigmmaError(f"not a gene head file (missing {err})", path=path) from err
            except (ValueError, TypeError) as err:
                # e.g. object arrays, refused by allow_pickle=False (a pickle never runs)
                raise SigmmaError(f"not a gene head file ({err})", path=path) from err


def default_genes(paired: PairedSlide) -> list[str]:
    """The slide's genes without control probes / codewords."""
    from napari_sigmma.constants import is_control

    return [g for g in paired.genes if not is_control(g)]


def _aligned_counts(paired: PairedSlide, genes: Sequence[str]):
    from napari_sigmma.tiles.features import align_counts

    return align_counts(paired.counts, paired.genes, list(genes))


def median_target_sum(paired: PairedSlide) -> float:
    """Median total count of the cells with any count (``normalize_total``'s default)."""
    totals = np.asarray(paired.counts.sum(axis=1)).ravel()
    pos = totals[totals > 0]
    return float(np.median(pos)) if pos.size else 1.0


def measured_expression(
    paired: PairedSlide,
    grid: TileGrid,
    indices: Sequence[int] | None = None,
    *,
    genes: Sequence[str],
    target_sum: float,
    micro: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Measured log1p expression of tiles (or of their 16 micro patches).

    Parameters
    ----------
    paired, grid
        The slide and its grid.
    indices
        Grid indices (default: every tile).
    genes
        Gene columns wanted (aligned by name; absent genes are zero).
    target_sum
        Per-cell normalisation target.
    micro
        Per micro patch instead of per tile.

    Returns
    -------
    (expr, n_cells)
        ``expr`` ``(n, G)`` (or ``(n, 16, G)``) float32 and the number of cells behind each
        value ``(n,)`` (or ``(n, 16)``).
    """
    from napari_sigmma.tiles.features import tile_gene_vectors
    from napari_sigmma.tiles.graphs import cells_per_tile, local_positions, patch_indices

    idx = np.arange(len(grid)) if indices is None else np.asarray(indices, dtype=np.int64)
    counts = _aligned_counts(paired, genes)
    per_tile = cells_per_tile(paired.cells_px, grid)
    if not micro:
        groups = [per_tile[int(i)] for i in idx]
        expr = tile_gene_vectors(counts, groups, target_sum)
        return expr, np.array([g.size for g in groups], dtype=np.int64)
    groups = []
    for i in idx:
        cells = per_tile[int(i)]
        m, _ = patch_indices(local_positions(paired.cells_px[cells], grid.bounds[int(i)]))
        groups.extend(cells[m == j] for j in range(16))
    expr = tile_gene_vectors(counts, groups, target_sum)
    n = np.array([g.size for g in groups], dtype=np.int64)
    return expr.reshape(idx.size, 16, -1), n.reshape(idx.size, 16)


def fit_gene_head(
    results: Sequence[TileResult],
    paired: PairedSlide,
    grid: TileGrid,
    *,
    genes: Sequence[str] | None = None,
    target_sum: float | None = None,
    min_cells: int = 3,
    micro_min_cells: int = 1,
    run: str = "",
    alphas: Sequence[float] = ALPHAS,
) -> GeneHead:
    """Fit the macro (and micro) ridge maps on encoded training tiles.

    Parameters
    ----------
    results
        Encoded *training* tiles (their ``index`` is the grid index).
    paired, grid
        Where the measured expression comes from.
    genes
        Target genes (default: every non-control gene of the panel).
    target_sum
        Per-cell normalisation (default: the median cell total).
    min_cells, micro_min_cells
        Tiles / micro patches with fewer cells are not used as targets.
    run
        Provenance stored in the file.
    """
    genes = list(genes) if genes is not None else default_genes(paired)
    if not genes:
        raise SigmmaError("the slide has no genes to predict", path=paired.source)
    target_sum = float(target_sum) if target_sum else median_target_sum(paired)
    idx = np.array([r.index for r in results], dtype=np.int64)
    y, n = measured_expression(paired, grid, idx, genes=genes, target_sum=target_sum)
    keep = n >= min_cells
    if keep.sum() < 3:
        raise SigmmaError(
            f"only {int(keep.sum())} training tiles have ≥ {min_cells} cells; "
            "cannot fit a gene head",
            path=paired.source,
        )
    x = np.stack([r.he["macro"] for r in results])
    head = GeneHead(genes=genes, target_sum=target_sum, run=str(run))
    head.maps["macro"] = RidgeMap.fit(x[keep], y[keep], alphas)
    ym, nm = measured_expression(paired, grid, idx, genes=genes, target_sum=target_sum, micro=True)
    xm = np.stack([r.he_crops[:16] for r in results])
    km = nm >= micro_min_cells
    if km.sum() >= 3:
        head.maps["micro"] = RidgeMap.fit(xm[km], ym[km], alphas)
    return head
