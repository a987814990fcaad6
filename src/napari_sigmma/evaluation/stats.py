"""Per-tile metrics, seed summaries and paired bootstrap confidence intervals.

Every gap between two models evaluated on the same test tiles is a *paired* comparison:
per test tile, the difference of the two models' per-tile values (tile PCC, tile MSE, a
retrieval hit 0/1), averaged over the seeds the models were trained with (seed k of one
model paired with seed k of the other); the 95 % interval is the percentile bootstrap of
the mean of these per-tile differences, resampling test tiles (the seeds stay pooled
inside every resampled tile). It covers the noise of the test-tile sample and, through
the pooling, part of the seed-to-seed variation; ``sd`` over seeds is reported beside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_sigmma.errors import SigmmaError


def mean_sd(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "sd", "values"}`` over seeds (sample sd, ddof=1; 0 for one value)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "sd": None, "values": []}
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "values": [float(x) for x in v],
    }


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Gap ``mean(a - b)`` with a paired percentile-bootstrap interval over test tiles.

    Parameters
    ----------
    a, b
        ``(n_tiles,)`` or ``(n_seeds, n_tiles)`` per-tile values of the two models on the
        same tiles in the same order (seed k of ``a`` paired with seed k of ``b``; with
        different seed counts, each is first averaged over its seeds).
    n_boot, level, seed
        Bootstrap resamples, interval level and the resampling seed.

    Returns
    -------
    dict
        ``gap``, ``lo``, ``hi``, ``level``, ``n_tiles``, ``n_seeds``, ``excludes_zero``.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise SigmmaError(
            f"paired bootstrap needs the same test tiles: {a.shape[1]} vs {b.shape[1]} tiles"
        )
    if a.shape[0] == b.shape[0]:
        d = np.nanmean(a - b, axis=0)
    else:
        d = np.nanmean(a, axis=0) - np.nanmean(b, axis=0)
    d = d[np.isfinite(d)]
    n = d.size
    if n == 0:
        return {"gap": None, "lo": None, "hi": None, "level": level, "n_tiles": 0}
    rng = np.random.default_rng(seed)
    boots = np.empty(int(n_boot))
    for k in range(0, int(n_boot), 500):
        m = min(500, int(n_boot) - k)
        idx = rng.integers(0, n, size=(m, n))
        boots[k : k + m] = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return {
        "gap": float(d.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "level": float(level),
        "n_tiles": int(n),
        "n_seeds": int(min(a.shape[0], b.shape[0])),
        "excludes_zero": bool(lo > 0 or hi < 0),
    }


def tile_pcc(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row Pearson correlation of ``pred`` and ``y`` (``(n, G)``; NaN for flat rows)."""
    p = np.asarray(pred, np.float64)
    t = np.asarray(y, np.float64)
    p = p - p.mean(axis=1, keepdims=True)
    t = t - t.mean(axis=1, keepdims=True)
    den = np.sqrt((p**2).sum(axis=1) * (t**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * t).sum(axis=1) / den, np.nan)


def tile_mse(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row mean squared error."""
    return ((np.asarray(pred, np.float64) - np.asarray(y, np.float64)) ** 2).mean(axis=1)


def retrieval_hits(he: np.ndarray, st: np.ndarray, p: float = 0.05) -> dict[str, np.ndarray]:
    """Per-query hit (0/1) at Recall@``p`` over all candidates, both directions."""
    from napari_sigmma.metrics import partner_ranks

    n = int(he.shape[0])
    k = max(1, math.ceil(p * n - 1e-9))
    return {
        "he_to_st": (partner_ranks(he, st) < k).astype(np.float64),
        "st_to_he": (partner_ranks(st, he) < k).astype(np.float64),
    }


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def group_hits(he: np.ndarray, st: np.ndarray, groups: Sequence[Any]) -> dict[str, Any]:
    """Recall among composition-matched candidates: per query, is its partner the most
    similar (cosine) of the test tiles of its own group? Both directions; queries alone in
    their group get NaN. ``chance`` = mean over queries of 1 / group size."""
    g = np.asarray([str(x) for x in groups])
    a, b = _unit(he), _unit(st)
    sim = a @ b.T
    n = sim.shape[0]
    out = {"he_to_st": np.full(n, np.nan), "st_to_he": np.full(n, np.nan)}
    sizes = np.zeros(n)
    for key in np.unique(g):
        idx = np.flatnonzero(g == key)
        sizes[idx] = idx.size
        if idx.size < 2:
            continue
        sub = sim[np.ix_(idx, idx)]
        diag = np.diag(sub)
        # a tie with the partner counts against it (strictly greater or equal elsewhere)
        out["he_to_st"][idx] = ((sub >= diag[:, None]).sum(axis=1) == 1).astype(float)
        out["st_to_he"][idx] = ((sub.T >= diag[:, None]).sum(axis=1) == 1).astype(float)
    ok = sizes >= 2
    out["chance"] = float(np.mean(1.0 / sizes[ok])) if ok.any() else None
    out["group_sizes"] = sizes
    return out
