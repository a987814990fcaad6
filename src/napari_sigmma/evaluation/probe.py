"""Paper Task 1: gene-expression prediction by a linear probe on HE embeddings.

The protocol is the HEST-1k benchmark's (``mahmoodlab/HEST`` ``bench/``), as the SIGMMA paper
uses it: StandardScaler + PCA(256) fitted on the training tiles' embeddings, then
``Ridge(solver="lsqr", fit_intercept=False, alpha=100 / (n_features * n_genes))`` on
``log1p`` counts of the top-50 highly variable genes chosen on the training tiles (genes
present in at least 10 % of tiles, control probes excluded).

Two summaries are reported, and named apart because the literature mixes them:

- *tile-level* PCC / MSE (the SIGMMA paper's tables): for each test tile, Pearson r and
  MSE between the predicted and measured 50-gene vectors, then mean ± std over tiles;
- *per-gene* PCC (the HEST benchmark's): for each gene, Pearson r across test tiles.

One deliberate addition: the ridge has no intercept (as HEST), and StandardScaler centres
the features, so log1p targets with a positive mean could never be reached and MSE would
measure the mean offset alone. By default the training-tile mean of each target is
subtracted before the fit and added back to the predictions (``center_targets=True``),
which equals fitting an unpenalised intercept. Per-gene PCC is unaffected either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_sigmma.constants import is_control


def select_hvg(
    train_log1p: np.ndarray,
    genes: list[str],
    *,
    n_top: int = 50,
    min_tile_fraction: float = 0.10,
) -> list[int]:
    """Indices of the top highly variable genes on the training tiles.

    Uses scanpy's ``highly_variable_genes`` (seurat flavour on log1p data) when there are
    enough genes, after dropping control probes and genes expressed in fewer than
    ``min_tile_fraction`` of the training tiles.

    Parameters
    ----------
    train_log1p
        (tiles, genes) log1p expression of the training tiles.
    genes
        Gene names, one per column.
    n_top
        How many genes to keep (fewer if fewer qualify).
    min_tile_fraction
        A gene must be non-zero in at least this fraction of training tiles.
    """
    x = np.asarray(train_log1p, dtype=np.float64)
    present = (x > 0).mean(axis=0) >= min_tile_fraction
    keep = np.array([present[i] and not is_control(g) for i, g in enumerate(genes)])
    cand = np.flatnonzero(keep)
    if cand.size <= n_top:
        return cand.tolist()
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(x[:, cand].astype(np.float32))
    adata.var_names = [genes[i] for i in cand]
    try:
        sc.pp.highly_variable_genes(adata, n_top_genes=n_top, flavor="seurat")
        score = np.where(
            adata.var["highly_variable"].to_numpy(),
            adata.var["dispersions_norm"].to_numpy(),
            -np.inf,
        )
        score = np.nan_to_num(score, nan=-np.inf)
        order = np.argsort(-score, kind="stable")[:n_top]
    except (ValueError, IndexError):
        # degenerate dispersions (tiny data): fall back to the variance ranking
        order = np.argsort(-x[:, cand].var(axis=0), kind="stable")[:n_top]
    return sorted(cand[order].tolist())


@dataclass
class ProbeResult:
    """Predictions and metrics of the linear probe on the test tiles."""

    genes: list[str]
    y_true: np.ndarray
    y_pred: np.ndarray
    tile_pcc: np.ndarray
    tile_mse: np.ndarray
    gene_pcc: dict[str, float]
    calibration: dict[str, tuple[float, float]] = field(default_factory=dict)
    recalibrated_mse: float | None = None

    def summary(self) -> dict[str, object]:
        """The ``task1`` block of ``metrics.json``."""
        out: dict[str, object] = {
            "pcc_mean": float(np.nanmean(self.tile_pcc)),
            "pcc_std": float(np.nanstd(self.tile_pcc)),
            "mse_mean": float(np.mean(self.tile_mse)),
            "mse_std": float(np.std(self.tile_mse)),
            "per_gene_pcc": {g: float(r) for g, r in self.gene_pcc.items()},
            "per_gene_pcc_mean": float(np.nanmean(list(self.gene_pcc.values()))),
            "calibration": {
                g: {"slope": s, "intercept": b} for g, (s, b) in self.calibration.items()
            },
        }
        if self.recalibrated_mse is not None:
            out["mse_recalibrated_mean"] = self.recalibrated_mse
        return out


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row of ``a`` with the same row of ``b`` (NaN for a constant row)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / den, np.nan)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, *, seed: int = 0, n_pca: int = 256):
    """Fit the HEST-bench probe; return a sklearn pipeline (scaler, PCA, ridge).

    ``n_pca`` is capped by the number of training tiles and of features.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_comp = int(min(n_pca, x_train.shape[0], x_train.shape[1]))
    alpha = 100.0 / (n_comp * y_train.shape[1])
    pipe = make_pipeline(
        StandardScaler(),
        PCA(n_components=n_comp, random_state=seed),
        Ridge(solver="lsqr", fit_intercept=False, alpha=alpha, max_iter=1000),
    )
    pipe.fit(x_train, y_train)
    return pipe


def run_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    genes: list[str],
    *,
    seed: int = 0,
    recalibrate: bool = True,
    center_targets: bool = True,
) -> ProbeResult:
    """Fit on train tiles, predict test tiles, compute tile-level and per-gene metrics.

    Parameters
    ----------
    x_train, x_test
        (tiles, features) HE embeddings.
    y_train, y_test
        (tiles, genes) log1p targets, already restricted to the chosen genes.
    genes
        Names of the target columns.
    recalibrate
        Also fit a per-gene linear map prediction → measurement on the *training* tiles
        and report the test MSE after applying it (the paper's calibration weakness).
    center_targets
        Subtract the training mean of each target before the no-intercept ridge and add
        it back (see the module docstring).
    """
    if not np.all(np.isfinite(x_train)) or not np.all(np.isfinite(x_test)):
        from napari_sigmma.errors import SigmmaError

        raise SigmmaError("embeddings contain NaN or inf values; cannot fit the probe")
    offset = y_train.mean(axis=0) if center_targets else np.zeros(y_train.shape[1])
    pipe = fit_probe(x_train, y_train - offset, seed=seed)
    pred = pipe.predict(x_test) + offset
    tile_pcc = rowwise_pearson(pred, y_test)
    tile_mse = ((pred - y_test) ** 2).mean(axis=1)
    gene_r = rowwise_pearson(pred.T, y_test.T)
    gene_pcc = {g: float(r) for g, r in zip(genes, gene_r, strict=True)}
    calib: dict[str, tuple[float, float]] = {}
    for j, g in enumerate(genes):
        # measured ≈ slope · predicted + intercept on the test tiles (slope < 1: shrinkage)
        p = pred[:, j]
        if np.ptp(p) > 0:
            slope, intercept = np.polyfit(p, y_test[:, j], 1)
            calib[g] = (float(slope), float(intercept))
    recal_mse = None
    if recalibrate:
        train_pred = pipe.predict(x_train) + offset
        adj = pred.copy()
        for j in range(pred.shape[1]):
            if np.ptp(train_pred[:, j]) > 0:
                s, b = np.polyfit(train_pred[:, j], y_train[:, j], 1)
                adj[:, j] = s * pred[:, j] + b
        recal_mse = float(((adj - y_test) ** 2).mean())
    return ProbeResult(
        genes=list(genes),
        y_true=y_test,
        y_pred=pred,
        tile_pcc=tile_pcc,
        tile_mse=tile_mse,
        gene_pcc=gene_pcc,
        calibration=calib,
        recalibrated_mse=recal_mse,
    )
