"""Retrieval metrics (paper §6, Task 2).

Recall@p%: the fraction of queries whose true partner — the other modality of the same
tile, i.e. the candidate with the same row index — is among the ``ceil(p · N)`` candidates
most cosine-similar to the query, N being the number of candidates. Chance level is p.
"""

from __future__ import annotations

import math

import numpy as np

from napari_sigmma.errors import SigmmaError


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def partner_ranks(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """0-based rank of each query's partner among all candidates (cosine, descending).

    Ties count against the query (a candidate scoring equal to the partner ranks ahead of
    it), so a constant embedding never looks good.
    """
    q, c = _unit(query), _unit(candidates)
    if q.ndim != 2 or c.ndim != 2 or q.shape != c.shape:
        raise SigmmaError(
            f"query and candidates must be paired (N, D) arrays, got {q.shape} and {c.shape}"
        )
    sim = q @ c.T
    true = np.diag(sim)[:, None]
    return (sim >= true).sum(axis=1) - 1


def recall_at_percent(query: np.ndarray, candidates: np.ndarray, p: float) -> float:
    """Recall@p% of paired embeddings (row ``i`` of ``query`` ↔ row ``i`` of ``candidates``).

    Parameters
    ----------
    query, candidates
        ``(N, D)`` embeddings of the two modalities, paired by row.
    p
        The percentage as a fraction in ``(0, 1]`` (``0.05`` for Recall@5%); values in
        ``(1, 100]`` are read as percent (``5`` → 5%).

    Returns
    -------
    float
        Fraction of queries whose partner is in the top ``ceil(p · N)`` candidates.
    """
    p = float(p)
    if p > 1:
        p = p / 100.0
    if not 0 < p <= 1:
        raise SigmmaError(f"recall percentage must be in (0, 1] or (1, 100], got {p}")
    n = int(np.asarray(query).shape[0])
    if n == 0:
        return float("nan")
    k = max(1, math.ceil(p * n - 1e-9))
    return float((partner_ranks(query, candidates) < k).mean())


def retrieval_metrics(
    he: dict[str, np.ndarray],
    st: dict[str, np.ndarray],
    percents: tuple[float, ...] = (0.05, 0.10, 0.15),
) -> dict[str, float]:
    """HE→ST and ST→HE Recall@p% for every scale present in both dicts.

    Keys: ``"{scale}/he2st@5"``, ``"{scale}/st2he@5"``, … (p in percent).
    """
    out: dict[str, float] = {}
    for scale in he:
        if scale not in st:
            continue
        for p in percents:
            tag = f"{round(p * 100) if p <= 1 else round(p)}"
            out[f"{scale}/he2st@{tag}"] = recall_at_percent(he[scale], st[scale], p)
            out[f"{scale}/st2he@{tag}"] = recall_at_percent(st[scale], he[scale], p)
    return out
