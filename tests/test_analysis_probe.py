"""Task 1 probe: metrics right on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sigmma.errors import SigmmaError
from napari_sigmma.evaluation.probe import is_control, rowwise_pearson, run_probe, select_hvg


def _linear_data(n: int, d: int, g: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, g))
    y = x @ w * 0.1 + 2.0 + noise * rng.normal(size=(n, g))
    return x, y


def test_rowwise_pearson_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    ref = [np.corrcoef(a[i], b[i])[0, 1] for i in range(5)]
    assert np.allclose(rowwise_pearson(a, b), ref)
    assert np.isnan(rowwise_pearson(np.ones((1, 4)), b[:1, :4]))[0]


def test_probe_recovers_a_linear_relation() -> None:
    x, y = _linear_data(400, 32, 10, noise=0.0)
    genes = [f"G{i}" for i in range(10)]
    res = run_probe(x[:300], y[:300], x[300:], y[300:], genes)
    # per-gene r of a noiseless linear map is ~1; MSE ~0 (ridge shrinks a little)
    assert min(res.gene_pcc.values()) > 0.99
    assert res.summary()["mse_mean"] < 1e-3
    slope, _ = res.calibration["G0"]
    assert slope == pytest.approx(1.0, abs=0.05)


def test_probe_on_noise_is_near_zero() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 16))
    y = rng.normal(size=(400, 8))
    res = run_probe(x[:300], y[:300], x[300:], y[300:], [f"G{i}" for i in range(8)])
    assert abs(np.mean(list(res.gene_pcc.values()))) < 0.15


def test_probe_refuses_nan_embeddings() -> None:
    x, y = _linear_data(50, 4, 3, noise=0.1)
    x[3, 1] = np.nan
    with pytest.raises(SigmmaError, match="NaN"):
        run_probe(x[:40], y[:40], x[40:], y[40:], ["a", "b", "c"])


def test_hvg_excludes_controls_and_rare_genes() -> None:
    rng = np.random.default_rng(0)
    n = 200
    genes = [f"G{i}" for i in range(80)] + ["BLANK_0001", "NegControlProbe_ERCC-1", "RARE"]
    x = np.log1p(rng.poisson(rng.uniform(0.5, 5, size=83), size=(n, 83)).astype(float))
    x[:, -3:-1] *= 10  # very variable controls must still be excluded
    x[:, -1] = 0
    x[:5, -1] = 9.0  # present in 2.5 % of tiles only
    chosen = select_hvg(x, genes, n_top=50)
    names = {genes[i] for i in chosen}
    assert len(chosen) == 50
    assert not names & {"BLANK_0001", "NegControlProbe_ERCC-1", "RARE"}
    assert is_control("BLANK_0001") and not is_control("EPCAM")


def test_uncentred_probe_shows_the_offset_the_protocol_cannot_fit() -> None:
    x, y = _linear_data(400, 32, 10, noise=0.0)
    genes = [f"G{i}" for i in range(10)]
    raw = run_probe(x[:300], y[:300], x[300:], y[300:], genes, center_targets=False)
    # no intercept + centred features: the +2 offset stays as error, r is unaffected
    assert raw.summary()["mse_mean"] == pytest.approx(4.0, rel=0.1)
    assert min(raw.gene_pcc.values()) > 0.99
