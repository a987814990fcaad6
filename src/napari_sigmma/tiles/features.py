"""Node features of the cell graphs, and the per-tile gene vector.

The paper initialises the graph nodes with STEMO embeddings. STEMO is not public, so this
project substitutes the standard single-cell recipe: ``normalize_total`` (to the median
total count of the training cells) + ``log1p`` + PCA, fitted on the cells of the TRAINING
tiles only (no leakage from validation/test tiles). Users with a better cell embedding
(e.g. Novae's ``novae_latent``) can name an ``obsm`` key instead.

The fitted transform is plain arrays (gene list, ``target_sum``, ``mean``, ``components``)
so checkpoints can carry it and inference reuses exactly the same features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    import scipy.sparse as sp

    from napari_sigmma.tiles.paired import PairedSlide


def normalize_log1p(counts: Any, target_sum: float) -> sp.csr_matrix:
    """``log1p(counts / total * target_sum)`` per cell (cells with no counts stay 0)."""
    import scipy.sparse as sp

    X = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    X = sp.diags(scale) @ X
    X = sp.csr_matrix(X)
    X.data = np.log1p(X.data)
    return X


def align_counts(counts: Any, genes_from: list[str], genes_to: list[str]) -> sp.csr_matrix:
    """Reorder the columns of ``counts`` from ``genes_from`` to ``genes_to`` (missing = 0)."""
    import scipy.sparse as sp

    X = sp.csr_matrix(counts, dtype=np.float32)
    if list(genes_from) == list(genes_to):
        return X
    pos = {g: i for i, g in enumerate(genes_from)}
    src = np.array([pos.get(g, -1) for g in genes_to], dtype=np.int64)
    have = np.flatnonzero(src >= 0)
    # Selection matrix: column src[j] of the input goes to column j of the output.
    P = sp.csr_matrix(
        (np.ones(have.size, dtype=np.float32), (src[have], have)),
        shape=(X.shape[1], len(genes_to)),
    )
    return sp.csr_matrix(X @ P)


@dataclass
class NodeFeaturizer:
    """Fitted node-feature transform.

    Attributes
    ----------
    kind
        ``"pca"`` (normalize_total + log1p + PCA) or ``"obsm"`` (user features as given).
    genes
        Gene order the transform expects (counts of other slides are aligned to it).
    target_sum
        ``normalize_total`` target (median total count of the training cells).
    mean, components
        PCA centre ``(G,)`` and loadings ``(K, G)`` (``kind == "pca"``).
    obsm_key, n_obsm
        The ``obsm`` key and its width (``kind == "obsm"``).
    """

    kind: str
    genes: list[str]
    target_sum: float
    mean: np.ndarray | None = None
    components: np.ndarray | None = None
    obsm_key: str | None = None
    n_obsm: int = 0
    explained_variance: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_features(self) -> int:
        if self.kind == "pca":
            return int(self.components.shape[0])  # type: ignore[union-attr]
        return int(self.n_obsm)

    @classmethod
    def fit_pca(
        cls,
        counts: Any,
        genes: list[str],
        *,
        n_components: int = 32,
        target_sum: float | None = None,
    ) -> NodeFeaturizer:
        """Fit normalize_total + log1p + PCA on ``counts`` (the training tiles' cells).

        ``n_components`` is capped at ``min(n_cells - 1, n_genes)``. PCA is the eigen-
        decomposition of the gene covariance (deterministic; signs fixed so the largest
        loading of each component is positive).
        """
        import scipy.sparse as sp

        X = sp.csr_matrix(counts, dtype=np.float64)
        n, g = X.shape
        if n < 2 or g < 1:
            raise SigmmaError(
                f"cannot fit PCA node features on {n} cells × {g} genes (need ≥ 2 cells)"
            )
        totals = np.asarray(X.sum(axis=1)).ravel()
        if target_sum is None:
            pos = totals[totals > 0]
            target_sum = float(np.median(pos)) if pos.size else 1.0
        L = normalize_log1p(X, target_sum)
        mean = np.asarray(L.mean(axis=0)).ravel()
        gram = np.asarray((L.T @ L).todense())
        cov = (gram - n * np.outer(mean, mean)) / (n - 1)
        evals, evecs = np.linalg.eigh(cov)
        k = int(max(1, min(n_components, n - 1, g)))
        order = np.argsort(evals)[::-1][:k]
        comps = evecs[:, order].T
        flip = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
        flip[flip == 0] = 1.0
        comps = comps * flip[:, None]
        return cls(
            kind="pca",
            genes=list(genes),
            target_sum=float(target_sum),
            mean=mean.astype(np.float32),
            components=comps.astype(np.float32),
            explained_variance=np.clip(evals[order], 0, None).astype(np.float32),
        )

    @classmethod
    def from_obsm(cls, key: str, width: int, genes: list[str], target_sum: float = 1.0):
        """Features taken as given from ``obsm[key]`` (width ``width``)."""
        return cls(
            kind="obsm",
            genes=list(genes),
            target_sum=float(target_sum),
            obsm_key=key,
            n_obsm=int(width),
        )

    def transform_counts(self, counts: Any, genes: list[str] | None = None) -> np.ndarray:
        """PCA features ``(N, K)`` float32 of raw counts (aligned to :attr:`genes` first)."""
        if self.kind != "pca":
            raise SigmmaError(f"node features come from obsm[{self.obsm_key!r}], not counts")
        X = counts if genes is None else align_counts(counts, genes, self.genes)
        L = normalize_log1p(X, self.target_sum)
        Z = np.asarray(L @ self.components.T) - (self.mean @ self.components.T)  # type: ignore[union-attr]
        return Z.astype(np.float32)

    def features(self, paired: PairedSlide) -> np.ndarray:
        """Node features ``(N, F)`` float32 of every cell of ``paired``."""
        if self.kind == "obsm":
            if paired.node_features is None:
                raise SigmmaError(
                    f"the model expects node features from obsm[{self.obsm_key!r}] but the "
                    "slide was opened without them",
                    path=paired.source,
                )
            f = np.asarray(paired.node_features, dtype=np.float32)
            if f.shape[1] != self.n_obsm:
                raise SigmmaError(
                    f"obsm[{self.obsm_key!r}] has {f.shape[1]} columns, expected {self.n_obsm}",
                    path=paired.source,
                )
            bad = ~np.isfinite(f).all(axis=1)
            if bad.any():
                raise SigmmaError(
                    f"obsm[{self.obsm_key!r}] holds NaN or inf node features in "
                    f"{int(bad.sum())} cell(s)",
                    path=paired.source,
                )
            return f
        if paired.n_cells == 0:
            return np.zeros((0, self.n_features), dtype=np.float32)
        # A partly different panel is aligned (missing genes count 0); a disjoint one would
        # silently give every cell the same features, so it is refused.
        if not set(self.genes) & set(paired.genes):
            raise SigmmaError(
                f"the slide's {len(paired.genes)} genes share none with the model's "
                f"{len(self.genes)}-gene panel (e.g. {', '.join(self.genes[:3])})",
                path=paired.source,
            )
        return self.transform_counts(paired.counts, paired.genes)

    def to_arrays(self) -> dict[str, Any]:
        """Plain description: numpy arrays, strings, numbers (for npz and checkpoints)."""
        d: dict[str, Any] = {
            "kind": self.kind,
            "genes": list(self.genes),
            "target_sum": float(self.target_sum),
            "obsm_key": self.obsm_key or "",
            "n_obsm": int(self.n_obsm),
        }
        if self.kind == "pca":
            d["mean"] = np.asarray(self.mean, dtype=np.float32)
            d["components"] = np.asarray(self.components, dtype=np.float32)
        return d

    @classmethod
    def from_arrays(cls, d: dict[str, Any]) -> NodeFeaturizer:
        """Inverse of :meth:`to_arrays` (accepts numpy arrays or torch tensors)."""

        def arr(v: Any) -> np.ndarray:
            if hasattr(v, "detach"):
                v = v.detach().cpu().numpy()
            return np.asarray(v, dtype=np.float32)

        kind = str(d["kind"])
        return cls(
            kind=kind,
            genes=[str(g) for g in d["genes"]],
            target_sum=float(d["target_sum"]),
            mean=arr(d["mean"]) if kind == "pca" else None,
            components=arr(d["components"]) if kind == "pca" else None,
            obsm_key=(str(d.get("obsm_key")) or None) if kind == "obsm" else None,
            n_obsm=int(d.get("n_obsm", 0)),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an ``.npz`` (no pickle)."""
        d = self.to_arrays()
        np.savez(
            path,
            kind=np.array(d["kind"]),
            genes=np.array(d["genes"], dtype=str),
            target_sum=np.array(d["target_sum"]),
            obsm_key=np.array(d["obsm_key"]),
            n_obsm=np.array(d["n_obsm"]),
            mean=d.get("mean", np.zeros(0, np.float32)),
            components=d.get("components", np.zeros((0, 0), np.float32)),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeFeaturizer:
        """Read a file written by :meth:`save`."""
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise SigmmaError(f"cannot read node-feature file: {err}", path=path) from err
        with z:
            try:
                arrays = {
                    "kind": str(z["kind"]),
                    "genes": [str(g) for g in z["genes"]],
                    "target_sum": float(z["target_sum"]),
                    "obsm_key": str(z["obsm_key"]),
                    "n_obsm": int(z["n_obsm"]),
                    "mean": z["mean"],
                    "components": z["components"],
                }
            except (KeyError, ValueError, TypeError) as err:
                # Object arrays (pickles) are refused by allow_pickle=False: never run.
                raise SigmmaError(f"not a node-feature file: {err}", path=path) from err
        return cls.from_arrays(arrays)


def tile_gene_vectors(
    counts: Any,
    cells_per_tile: list[np.ndarray],
    target_sum: float,
) -> np.ndarray:
    """Per-tile gene vector ``(T, G)`` float32: ``log1p`` of the mean normalised expression.

    Each cell is scaled to ``target_sum`` total counts, the tile's cells are averaged (a
    pseudo-bulk), then ``log1p``. Tiles without cells get zeros. This is the input of the
    no-graph ablation (paper Table 4).
    """
    import scipy.sparse as sp

    X = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    N = sp.csr_matrix(sp.diags(scale) @ X)
    out = np.zeros((len(cells_per_tile), X.shape[1]), dtype=np.float32)
    for t, cells in enumerate(cells_per_tile):
        if len(cells):
            out[t] = np.log1p(np.asarray(N[cells].mean(axis=0)).ravel())
    return out
