"""Task 1 / Task 2 metrics on constructed cases whose answer is known in advance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr

from napari_sigmma.errors import SigmmaError
from napari_sigmma.evaluation.probe import rowwise_pearson
from napari_sigmma.evaluation.run import (
    chance_level,
    concat_embedding,
    probe_block,
    retrieval_block,
)
from napari_sigmma.metrics import partner_ranks, recall_at_percent, retrieval_metrics


def _with_partner_ranks(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries and candidates whose partner sits at exactly ``ranks[i]`` (0-based).

    Candidates are one-hot vectors, so cos(q_i, c_j) is proportional to q_i[j]: query i
    gets distinct weights with exactly ``ranks[i]`` other candidates above its partner.
    """
    n = ranks.size
    c = np.eye(n)
    q = np.zeros((n, n))
    for i, r in enumerate(ranks):
        others = [j for j in range(n) if j != i]
        weights = np.linspace(1.0, 0.1, n)  # distinct, decreasing
        order = [*others[:r], i, *others[r:]]
        q[i, order] = weights
    return q, c


def test_perfect_alignment_gives_recall_one() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    for p in (0.05, 0.10, 0.15):
        assert recall_at_percent(x, x, p) == 1.0
        # a positive rescaling of the partner does not change cosine ranks
        assert recall_at_percent(x, 3.0 * x, p) == 1.0
    block = retrieval_block(x, x)
    assert block["he_to_st"] == {"R@5%": 1.0, "R@10%": 1.0, "R@15%": 1.0}
    assert block["st_to_he"] == {"R@5%": 1.0, "R@10%": 1.0, "R@15%": 1.0}
    assert block["median_rank"]["he_to_st"] == 1.0


def test_shuffled_pairs_are_about_chance() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    he = rng.normal(size=(n, 32))
    st = he[rng.permutation(n)] + 0.01 * rng.normal(size=(n, 32))  # pairs broken
    block = retrieval_block(he, st)
    for p in (0.05, 0.10, 0.15):
        k = f"R@{round(p * 100)}%"
        sd = math.sqrt(p * (1 - p) / n)
        for d in ("he_to_st", "st_to_he"):
            assert abs(block[d][k] - p) < 5 * sd, (d, k, block[d][k])
        assert block["chance"][k] == pytest.approx(math.ceil(p * n) / n)
    # the whole curve hugs the diagonal
    curve = np.array(block["curve"]["he_to_st"])
    assert np.abs(curve - np.array(block["curve"]["p"])).max() < 0.04
    assert curve[-1] == 1.0


def test_known_ranks_give_known_recall() -> None:
    rng = np.random.default_rng(2)
    n = 40
    ranks = rng.integers(0, n, size=n)
    q, c = _with_partner_ranks(ranks)
    assert np.array_equal(partner_ranks(q, c), ranks)
    for p in (0.05, 0.10, 0.15, 0.5):
        k = math.ceil(p * n)
        assert recall_at_percent(q, c, p) == pytest.approx((ranks < k).mean())


def test_top_k_is_ceil_of_p_times_n_at_the_boundary() -> None:
    # 0.15 * 20 = 3.0000000000000004 in floating point: the window is still 3, not 4
    n = 20
    for p, k in ((0.05, 1), (0.10, 2), (0.15, 3)):
        at_edge = _with_partner_ranks(np.full(n, k - 1))  # last place inside the window
        outside = _with_partner_ranks(np.full(n, k))  # first place outside
        assert recall_at_percent(*at_edge, p) == 1.0
        assert recall_at_percent(*outside, p) == 0.0
        assert chance_level(n, p) == k / n
    # a fractional p·N rounds up: 0.15 * 30 = 4.5 → the top 5
    n = 30
    assert recall_at_percent(*_with_partner_ranks(np.full(n, 4)), 0.15) == 1.0
    assert recall_at_percent(*_with_partner_ranks(np.full(n, 5)), 0.15) == 0.0
    # fewer candidates than 1/p: the window is never empty
    assert recall_at_percent(*_with_partner_ranks(np.zeros(5, dtype=int)), 0.05) == 1.0
    # percent given as 5 means 5 %
    q, c = _with_partner_ranks(np.full(20, 1))
    assert recall_at_percent(q, c, 10) == recall_at_percent(q, c, 0.10) == 1.0


def test_ties_count_against_the_query() -> None:
    const = np.ones((50, 4))
    assert recall_at_percent(const, const, 0.15) == 0.0
    assert recall_at_percent(const, const, 1.0) == 1.0


def test_bad_inputs_raise() -> None:
    x = np.ones((4, 3))
    with pytest.raises(SigmmaError):
        recall_at_percent(x, np.ones((5, 3)), 0.05)
    with pytest.raises(SigmmaError):
        recall_at_percent(x, x, 0.0)


def test_retrieval_metrics_keys_per_scale() -> None:
    rng = np.random.default_rng(3)
    he = {s: rng.normal(size=(30, 8)) for s in ("micro", "macro")}
    st = {"micro": he["micro"], "macro": rng.normal(size=(30, 8))}
    m = retrieval_metrics(he, st)
    assert m["micro/he2st@5"] == 1.0 and m["micro/st2he@15"] == 1.0
    assert set(m) == {f"{s}/{d}@{p}" for s in he for d in ("he2st", "st2he") for p in (5, 10, 15)}


def test_concat_cosine_is_the_mean_of_scale_cosines() -> None:
    rng = np.random.default_rng(4)
    a = {s: rng.normal(size=(10, 6)) * rng.uniform(0.1, 9) for s in ("micro", "meso", "macro")}
    b = {s: rng.normal(size=(10, 6)) for s in a}

    def cos(x, y):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        return x @ y.T

    ca, cb = concat_embedding(a, list(a)), concat_embedding(b, list(b))
    mean_cos = sum(cos(a[s], b[s]) for s in a) / 3
    assert np.allclose(cos(ca, cb), mean_cos)
    with pytest.raises(SigmmaError):
        concat_embedding(a, ["nope"])


def test_pcc_of_a_known_linear_relation() -> None:
    rng = np.random.default_rng(5)
    # exact affine relation: r = 1 for every row, whatever the slope and offset
    x = rng.normal(size=(7, 50))
    assert np.allclose(rowwise_pearson(x, 3.0 * x + 2.0), 1.0)
    assert np.allclose(rowwise_pearson(x, -0.5 * x), -1.0)
    # y = x + noise of variance s²: r → 1 / sqrt(1 + s²)
    big = rng.normal(size=(1, 200_000))
    noisy = big + 0.75 * rng.normal(size=big.shape)
    assert rowwise_pearson(big, noisy)[0] == pytest.approx(1 / math.sqrt(1 + 0.75**2), abs=5e-3)
    # agrees with scipy row by row
    y = rng.normal(size=(7, 50))
    ref = [pearsonr(x[i], y[i])[0] for i in range(7)]
    assert np.allclose(rowwise_pearson(x, y), ref, atol=1e-12)


def test_probe_on_an_exact_linear_map_scores_perfectly() -> None:
    rng = np.random.default_rng(6)
    n, d, g = 500, 20, 12
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, g))
    y = 0.2 * x @ w + rng.uniform(1, 3, size=g)
    genes = [f"G{i}" for i in range(g)]
    block, res = probe_block(x[:400], y[:400], x[400:], y[400:], genes)
    assert block["pcc_mean"] > 0.999 and block["pcc_std"] < 1e-3
    assert block["mse_mean"] < 1e-4
    assert min(block["per_gene_pcc"].values()) > 0.999
    # per-gene and tile-level PCC are what scipy computes from the predictions
    for j, gname in enumerate(genes):
        assert block["per_gene_pcc"][gname] == pytest.approx(
            pearsonr(res.y_pred[:, j], y[400:, j])[0], abs=1e-9
        )
    tile = [pearsonr(res.y_pred[i], y[400 + i])[0] for i in range(100)]
    assert block["pcc_mean"] == pytest.approx(np.mean(tile), abs=1e-9)
    # unrelated features: per-gene r near 0
    noise = rng.normal(size=(n, d))
    block0, _ = probe_block(noise[:400], y[:400], noise[400:], y[400:], genes)
    assert abs(block0["per_gene_pcc_mean"]) < 0.15


def test_cross_fitted_recalibration_undoes_overfitting() -> None:
    # 1 informative feature among 150 noise features, 300 training tiles: the probe's
    # near-zero ridge penalty overfits and its test predictions are too spread out; the
    # out-of-fold recalibration sees that (slope < 1) and lowers the test MSE.
    rng = np.random.default_rng(7)
    n, d = 400, 150
    x = rng.normal(size=(n, d))
    y = np.stack([0.5 * x[:, 0] + rng.normal(size=n) + 3.0 for _ in range(4)], axis=1)
    block, _ = probe_block(x[:300], y[:300], x[300:], y[300:], ["a", "b", "c", "d"])
    assert block["mse_recalibrated_mean"] < 0.9 * block["mse_mean"]
    assert all(c["slope"] < 1 for c in block["recalibration"].values())
    off, _ = probe_block(x[:300], y[:300], x[300:], y[300:], list("abcd"), recalibrate=False)
    assert off["mse_recalibrated_mean"] is None and off["mse_mean"] == block["mse_mean"]
