"""Clusters of the live embeddings at every scale, with colours that agree across scales.

Six sets of clusters are fitted on what the engine has encoded for a slide:

- ``he_micro`` / ``he_meso`` / ``he_macro``: the per-crop image embeddings (16 micro crops,
  4 meso crops, 1 macro crop per tile);
- ``cells_micro`` / ``cells_meso`` / ``cells_macro``: the graph encoder's node embeddings
  after each scale's layers (one point per cell).

Embeddings are L2-normalised first (the contrastive loss compares cosines). The default is
MiniBatchKMeans with ``k`` chosen by the user; Leiden on a kNN graph is an option (needs
``igraph``), with new points assigned to the nearest cluster mean.

Cluster numbers are arbitrary, so the same colour would mean unrelated things at two scales.
They are renumbered by Hungarian matching on *co-occurrence*: the micro image clusters are
the reference; each meso cluster takes the number of the micro cluster it overlaps most
(micro patches inside meso patches), each macro cluster the number of the meso cluster it
overlaps most, and the cell clusters at a scale the number of the image cluster of the patch
they sit in. When clusters are fitted again (more tiles encoded), each set is matched to the
previous fit on the points both saw instead, so colours do not jump between refits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from napari_sigmma.constants import SCALES
from napari_sigmma.errors import CancelLike, SigmmaError, check_cancel

if TYPE_CHECKING:
    from napari_sigmma.embed.result import TileResult

HE_KEYS = tuple(f"he_{s}" for s in SCALES)
# micro patch m (row-major 4×4) lies in meso patch MICRO_TO_MESO[m] (row-major 2×2)
MICRO_TO_MESO = np.array([2 * ((m // 4) // 2) + (m % 4) // 2 for m in range(16)], dtype=np.int64)
CLUSTER_METHODS = ("kmeans", "leiden")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def match_labels(contingency: np.ndarray) -> np.ndarray:
    """Renumbering of new clusters that best agrees with reference clusters.

    Parameters
    ----------
    contingency
        ``(n_new, n_ref)`` counts: how often new cluster ``i`` and reference cluster ``j``
        describe the same item (or overlapping items).

    Returns
    -------
    numpy.ndarray
        ``(n_new,)`` new number of each new cluster: the Hungarian-matched reference label,
        or the next unused numbers for clusters left unmatched (more new than reference).
    """
    from scipy.optimize import linear_sum_assignment

    c = np.asarray(contingency, dtype=np.float64)
    n_new, n_ref = c.shape
    rows, cols = linear_sum_assignment(-c)
    perm = np.full(n_new, -1, dtype=np.int64)
    perm[rows] = cols
    free = iter(sorted(set(range(max(n_new, n_ref))) - set(cols.tolist())))
    for i in range(n_new):
        if perm[i] < 0:
            perm[i] = next(free)
    return perm


def contingency(a: np.ndarray, b: np.ndarray, na: int, nb: int, weights=None) -> np.ndarray:
    """``(na, nb)`` co-occurrence counts of label pairs ``(a[i], b[i])``."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ok = (a >= 0) & (b >= 0)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[ok]
    flat = np.bincount(a[ok] * nb + b[ok], weights=w, minlength=na * nb)
    return flat[: na * nb].reshape(na, nb)


@dataclass
class ClusterSet:
    """Fitted clusters for every key, numbered consistently (see the module docstring).

    Attributes
    ----------
    k
        Requested number of clusters (Leiden may find another number; see ``n_clusters``).
    method
        ``"kmeans"`` or ``"leiden"``.
    centroids
        ``{key: (n_clusters, D)}`` unit-norm cluster means, row ``i`` = label ``i``.
    n_tiles
        How many tiles the fit saw.
    generation
        Incremented at every refit (layers use it to know when to recolour).
    """

    k: int
    method: str
    centroids: dict[str, np.ndarray] = field(default_factory=dict)
    n_tiles: int = 0
    generation: int = 0

    @property
    def n_clusters(self) -> int:
        return max((c.shape[0] for c in self.centroids.values()), default=0)

    def predict(self, key: str, x: np.ndarray) -> np.ndarray:
        """Label (row of ``centroids[key]``) of each embedding: nearest cluster by cosine."""
        x = np.asarray(x)
        if key not in self.centroids or x.size == 0:
            return np.full(x.shape[0] if x.ndim > 1 else 0, -1, dtype=np.int64)
        cent = self.centroids[key]
        scores = _unit(x) @ cent.T
        # rows left empty by renumbering (gaps) never win
        scores[:, np.linalg.norm(cent, axis=1) < 1e-6] = -np.inf
        return np.argmax(scores, axis=1).astype(np.int64)

    def tile_labels(self, res: TileResult) -> dict[str, np.ndarray]:
        """Labels of one tile: ``he_micro (16,)``, ``he_meso (4,)``, ``he_macro (1,)``,
        ``cells_<scale> (n,)``."""
        out: dict[str, np.ndarray] = {}
        crops = res.he_crops
        for key, sl in zip(HE_KEYS, (slice(0, 16), slice(16, 20), slice(20, 21)), strict=True):
            if key in self.centroids:
                out[key] = self.predict(key, crops[sl])
        for s in SCALES:
            key = f"cells_{s}"
            if key in self.centroids and s in res.nodes:
                out[key] = self.predict(key, res.nodes[s])
        return out


def _gather(results: Sequence[TileResult]) -> dict[str, dict[str, np.ndarray]]:
    """Per key: ``x`` embeddings, ``tile`` row of each item, ``patch`` (micro/meso patch)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    if not results:
        return out
    crops = np.stack([r.he_crops for r in results])  # (T, 21, D)
    t = np.arange(len(results))
    out["he_micro"] = {
        "x": crops[:, :16].reshape(-1, crops.shape[-1]),
        "tile": np.repeat(t, 16),
        "micro": np.tile(np.arange(16), len(results)),
    }
    out["he_meso"] = {
        "x": crops[:, 16:20].reshape(-1, crops.shape[-1]),
        "tile": np.repeat(t, 4),
        "meso": np.tile(np.arange(4), len(results)),
    }
    out["he_macro"] = {"x": crops[:, 20], "tile": t}
    for s in SCALES:
        xs, ts, ms, ids = [], [], [], []
        for i, r in enumerate(results):
            if s in r.nodes and r.nodes[s].shape[0]:
                xs.append(r.nodes[s])
                ts.append(np.full(r.nodes[s].shape[0], i))
                ms.append(r.cell_micro if r.cell_micro.size else np.zeros(r.n_cells, np.int64))
                ids.append(r.cell_index)
        if xs:
            out[f"cells_{s}"] = {
                "x": np.concatenate(xs),
                "tile": np.concatenate(ts),
                "micro": np.concatenate(ms).astype(np.int64),
                "cell": np.concatenate(ids).astype(np.int64),
            }
    return out


def _fit_one(
    x: np.ndarray, k: int, method: str, seed: int, init: np.ndarray | None, resolution: float
) -> np.ndarray:
    """Unit-norm centroids ``(n_clusters, D)`` of ``x``."""
    xu = _unit(x)
    n = xu.shape[0]
    if n == 0:
        return np.zeros((0, x.shape[1]), dtype=np.float32)
    if method == "kmeans":
        from sklearn.cluster import MiniBatchKMeans

        kk = int(min(k, n))
        use_init = init is not None and init.shape == (kk, xu.shape[1])
        km = MiniBatchKMeans(
            n_clusters=kk,
            init=init if use_init else "k-means++",
            n_init=1 if use_init else 3,
            random_state=seed,
            batch_size=1024,
        )
        km.fit(xu)
        return _unit(km.cluster_centers_)
    if method == "leiden":
        labels = _leiden(xu, seed=seed, resolution=resolution)
        n_lab = int(labels.max()) + 1
        cent = np.stack([xu[labels == i].mean(axis=0) for i in range(n_lab)])
        return _unit(cent)
    raise SigmmaError(f"unknown clustering method {method!r}; choose one of {CLUSTER_METHODS}")


def _leiden(xu: np.ndarray, *, seed: int, resolution: float, n_neighbors: int = 15) -> np.ndarray:
    try:
        import igraph as ig
    except ImportError as err:
        raise SigmmaError(
            "Leiden clustering needs the 'igraph' package (pip install igraph); "
            "use k-means otherwise"
        ) from err
    from sklearn.neighbors import NearestNeighbors

    n = xu.shape[0]
    kk = int(min(n_neighbors, max(n - 1, 1)))
    nn = NearestNeighbors(n_neighbors=kk + 1).fit(xu)
    _, idx = nn.kneighbors(xu)
    src = np.repeat(np.arange(n), kk)
    dst = idx[:, 1:].ravel()
    g = ig.Graph(n=n, edges=np.stack([src, dst], 1).tolist(), directed=False)
    g.simplify()
    import random

    random.seed(seed)
    ig.set_random_number_generator(random)
    part = g.community_leiden(objective_function="modularity", resolution=resolution)
    return np.asarray(part.membership, dtype=np.int64)


def fit_clusters(
    results: Sequence[TileResult],
    k: int,
    scales: Sequence[str] = SCALES,
    *,
    method: str = "kmeans",
    previous: ClusterSet | None = None,
    seed: int = 0,
    resolution: float = 1.0,
    cells: bool = True,
    cancel: CancelLike = None,
) -> ClusterSet:
    """Fit clusters on the encoded tiles and number them consistently across scales.

    Parameters
    ----------
    results
        Encoded tiles (any subset of the slide).
    k
        Number of clusters per set (k-means; capped by the number of items).
    scales
        Which scales to cluster.
    method
        ``"kmeans"`` (MiniBatchKMeans) or ``"leiden"`` (kNN graph + Leiden, needs igraph).
    previous
        An earlier fit: new clusters are numbered to agree with it (no colour jumps), and
        k-means starts from its centroids.
    seed
        Random state.
    resolution
        Leiden resolution.
    cells
        Also cluster the graph encoder's node embeddings.
    cancel
        Event or callable, checked before each of the (up to six) fits and before the
        renumbering; when set, :class:`~napari_sigmma.errors.Cancelled` is raised.

    Returns
    -------
    ClusterSet
    """
    if k < 1:
        raise SigmmaError(f"number of clusters must be at least 1, got {k}")
    if method not in CLUSTER_METHODS:
        raise SigmmaError(f"unknown clustering method {method!r}; choose one of {CLUSTER_METHODS}")
    data = _gather(results)
    keys = [f"he_{s}" for s in scales] + ([f"cells_{s}" for s in scales] if cells else [])
    cs = ClusterSet(
        k=int(k),
        method=method,
        n_tiles=len(results),
        generation=(previous.generation + 1) if previous is not None else 0,
    )
    labels: dict[str, np.ndarray] = {}
    for key in keys:
        check_cancel(cancel)
        if key not in data:
            continue
        init = None
        if previous is not None and method == "kmeans":
            init = previous.centroids.get(key)
        cent = _fit_one(data[key]["x"], k, method, seed, init, resolution)
        cs.centroids[key] = cent
        labels[key] = cs.predict(key, data[key]["x"])

    def renumber(key: str, contingency_mat: np.ndarray) -> None:
        perm = match_labels(contingency_mat)
        cent = cs.centroids[key]
        new = np.zeros((max(int(perm.max()) + 1, cent.shape[0]), cent.shape[1]), np.float32)
        new[perm] = cent
        # Unused rows (gaps when matched to a larger reference) never win the argmax.
        cs.centroids[key] = new
        labels[key] = perm[labels[key]]

    nk = lambda key: cs.centroids[key].shape[0]  # noqa: E731
    check_cancel(cancel)

    if previous is not None:
        # Refit: agree with the previous numbering on the same points.
        for key in list(cs.centroids):
            if key in previous.centroids and previous.centroids[key].shape[0]:
                old = previous.predict(key, data[key]["x"])
                c = contingency(labels[key], old, nk(key), previous.centroids[key].shape[0])
                renumber(key, c)
        return cs

    # First fit: chain the numbering across scales by co-occurrence.
    if "he_micro" in labels and "he_meso" in labels:
        d = data["he_micro"]
        meso_of_micro = d["tile"] * 4 + MICRO_TO_MESO[d["micro"]]
        meso_lab = labels["he_meso"][meso_of_micro]  # he_meso items are tile*4 + patch
        renumber(
            "he_meso", contingency(meso_lab, labels["he_micro"], nk("he_meso"), nk("he_micro"))
        )
    if "he_meso" in labels and "he_macro" in labels:
        d = data["he_meso"]
        macro_lab = labels["he_macro"][d["tile"]]
        renumber(
            "he_macro", contingency(macro_lab, labels["he_meso"], nk("he_macro"), nk("he_meso"))
        )
    for s in SCALES:
        key, ref = f"cells_{s}", f"he_{s}"
        if key not in labels or ref not in labels:
            continue
        d = data[key]
        if s == "micro":
            ref_lab = labels[ref][d["tile"] * 16 + d["micro"]]
        elif s == "meso":
            ref_lab = labels[ref][d["tile"] * 4 + MICRO_TO_MESO[d["micro"]]]
        else:
            ref_lab = labels[ref][d["tile"]]
        renumber(key, contingency(labels[key], ref_lab, nk(key), nk(ref)))
    return cs


# A categorical palette (Okabe-Ito first, then tab20-like) so cluster i has the same colour
# in every layer; label 0 of a Labels layer is background, so cluster i is drawn as i + 1.
PALETTE = np.array(
    [
        [0.902, 0.624, 0.000],
        [0.337, 0.706, 0.914],
        [0.000, 0.620, 0.451],
        [0.941, 0.894, 0.259],
        [0.000, 0.447, 0.698],
        [0.835, 0.369, 0.000],
        [0.800, 0.475, 0.655],
        [0.580, 0.404, 0.741],
        [0.549, 0.337, 0.294],
        [0.498, 0.498, 0.498],
        [0.737, 0.741, 0.133],
        [0.090, 0.745, 0.812],
        [0.682, 0.780, 0.910],
        [1.000, 0.733, 0.471],
        [0.596, 0.875, 0.541],
        [1.000, 0.596, 0.588],
        [0.773, 0.690, 0.835],
        [0.769, 0.612, 0.580],
        [0.969, 0.714, 0.824],
        [0.859, 0.859, 0.553],
    ],
    dtype=np.float32,
)


def cluster_colour(labels: np.ndarray) -> np.ndarray:
    """``(n, 4)`` RGBA colours of cluster labels (``-1`` → transparent)."""
    labels = np.asarray(labels, dtype=np.int64)
    rgba = np.zeros((labels.size, 4), dtype=np.float32)
    ok = labels >= 0
    rgba[ok, :3] = PALETTE[labels[ok] % len(PALETTE)]
    rgba[ok, 3] = 1.0
    return rgba
