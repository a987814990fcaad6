"""End-to-end evaluation: a tiny model briefly trained on a real synthetic Xenium bundle.

``metrics.json`` schema, report and plots on disk, the numbers recomputed from the dumped
embeddings by an independent implementation (scipy ``pearsonr`` loops, a plain sort-based
recall, a fresh sklearn probe) to 1e-6, an ablation trained on exactly the same split, and
the comparison table through the CLI. The headline comparison on ≥ 400 held-out synthetic
tiles is the slow test at the end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr

from _train_data import tiny_cfg
from napari_sigmma.errors import SigmmaError

PS = (0.05, 0.10, 0.15)
SCALES = ("micro", "meso", "macro")


@pytest.fixture(scope="module")
def trained(synthetic_medium, tmp_path_factory) -> tuple[Path, Path, object]:
    """A 6-epoch tiny run on ~80 tiles with 30 % held out for testing (enough training tiles
    for the HEST ridge probe to beat the training-mean floor)."""
    from napari_sigmma.train.loop import train

    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_cfg(
        synthetic_medium,
        root / "run",
        root / "features",
        split_fractions=[0.6, 0.1, 0.3],
        epochs=6,
        patience=6,
    )
    res = train(cfg)
    assert res.status == "completed"
    return root, Path(cfg.run_dir), cfg


@pytest.fixture(scope="module")
def evaluated(trained, synthetic_medium) -> tuple[Path, dict]:
    from napari_sigmma.evaluation.run import evaluate

    root, run, _ = trained
    out = root / "report"
    m = evaluate(synthetic_medium, run, out, dump_embeddings=True, device="cpu", throughput_tiles=1)
    return out, m


def test_metrics_json_has_the_schema(evaluated, trained) -> None:
    out, m = evaluated
    _, run, _ = trained
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["task1"]["pcc_mean"] == pytest.approx(m["task1"]["pcc_mean"])
    t1, t2 = on_disk["task1"], on_disk["task2"]
    for k in ("pcc_mean", "pcc_std", "mse_mean", "mse_std"):
        assert isinstance(t1[k], float) and math.isfinite(t1[k]), k
    assert t1["mse_std"] >= 0 and -1 <= t1["pcc_mean"] <= 1
    genes = on_disk["genes"]
    assert 0 < len(genes) <= 50 and len(set(genes)) == len(genes)
    assert set(t1["per_gene_pcc"]) == set(genes)
    assert not any(g.startswith(("BLANK", "NegControl")) for g in genes)
    for d in ("he_to_st", "st_to_he"):
        assert set(t2[d]) == {"R@5%", "R@10%", "R@15%"}
        assert all(0.0 <= v <= 1.0 for v in t2[d].values())
    split = json.loads((run / "split.json").read_text())
    assert on_disk["n_test_tiles"] == split["counts"]["test"] >= 10
    assert on_disk["n_train_tiles"] == split["counts"]["train"]
    assert on_disk["checkpoint"].endswith("best.pt") and on_disk["data"]
    assert t2["chance"]["R@5%"] == pytest.approx(
        math.ceil(0.05 * on_disk["n_test_tiles"]) / on_disk["n_test_tiles"]
    )
    assert set(on_disk["by_embedding"]) == {"micro", "meso", "macro", "concat"}
    fb = on_disk["frozen_backbone"]
    assert {"task1", "task2", "by_embedding"} <= set(fb)
    assert on_disk["variant"] == "full+fast" and on_disk["split"]["source"].endswith("split.json")
    thr = on_disk["throughput"]
    assert thr["fast"]["tiles_per_s"] > 0 and thr["paper"]["tiles_per_s"] > 0
    assert t1["mse_recalibrated_mean"] is not None


def test_report_and_plots_exist(evaluated) -> None:
    out, m = evaluated
    text = (out / "report.md").read_text()
    assert "Task 1" in text and "Task 2" in text and "chance" in text
    assert f"{m['task1']['pcc_mean']:.3f}" in text
    for name in ("pred_vs_measured.png", "calibration.png", "recall_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        assert f"({name})" in text


def _plain_recall(q: np.ndarray, c: np.ndarray, p: float) -> float:
    """Sort every query's candidates by cosine and look for the partner in the top k."""
    sim = _cos(q, c)
    n = sim.shape[0]
    k = max(1, math.ceil(round(p * n, 9)))
    hits = 0
    for i in range(n):
        order = sorted(range(n), key=lambda j: -sim[i, j])
        hits += i in order[:k]
    return hits / n


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def test_dumped_embeddings_recompute_the_numbers(evaluated) -> None:
    out, m = evaluated
    z = np.load(out / "embeddings.npz", allow_pickle=False)
    n = m["n_test_tiles"]
    assert z["test_ids"].shape == (n,) and list(z["genes"]) == m["genes"]
    for s in SCALES:
        assert z[f"he_{s}"].shape[0] == n and z[f"st_{s}"].shape[0] == n

    # Task 2, each scale: plain sort-based recall
    for s in SCALES:
        t2 = m["by_embedding"][s]["task2"]
        for p in PS:
            key = f"R@{round(p * 100)}%"
            assert _plain_recall(z[f"he_{s}"], z[f"st_{s}"], p) == pytest.approx(
                t2["he_to_st"][key], abs=1e-6
            )
            assert _plain_recall(z[f"st_{s}"], z[f"he_{s}"], p) == pytest.approx(
                t2["st_to_he"][key], abs=1e-6
            )
    assert m["task2"]["embedding"] == "macro"
    for d in ("he_to_st", "st_to_he"):
        assert m["task2"][d] == m["by_embedding"]["macro"]["task2"][d]
    # Task 2, concat: the mean of the per-scale cosine matrices, ranked by a plain sort
    scales = list(z["concat_scales"])
    t2c = m["by_embedding"]["concat"]["task2"]
    sim = sum(_cos(z[f"he_{s}"], z[f"st_{s}"]) for s in scales) / len(scales)
    for p in PS:
        k = max(1, math.ceil(round(p * n, 9)))
        he2st = np.mean([i in np.argsort(-sim[i], kind="stable")[:k] for i in range(n)])
        st2he = np.mean([i in np.argsort(-sim[:, i], kind="stable")[:k] for i in range(n)])
        key = f"R@{round(p * 100)}%"
        assert he2st == pytest.approx(t2c["he_to_st"][key], abs=1e-6)
        assert st2he == pytest.approx(t2c["st_to_he"][key], abs=1e-6)

    # Task 1 from the dumped predictions: scipy pearsonr loops and plain MSE
    y, pred = z["targets_test"], z["pred_test"]
    tile_r = [pearsonr(pred[i], y[i])[0] for i in range(n)]
    tile_mse = [float(np.mean((pred[i] - y[i]) ** 2)) for i in range(n)]
    t1 = m["task1"]
    assert np.nanmean(tile_r) == pytest.approx(t1["pcc_mean"], abs=1e-6)
    assert np.nanstd(tile_r) == pytest.approx(t1["pcc_std"], abs=1e-6)
    assert np.mean(tile_mse) == pytest.approx(t1["mse_mean"], abs=1e-6)
    assert np.std(tile_mse) == pytest.approx(t1["mse_std"], abs=1e-6)
    for j, g in enumerate(m["genes"]):
        if np.ptp(pred[:, j]) > 0 and np.ptp(y[:, j]) > 0:
            assert pearsonr(pred[:, j], y[:, j])[0] == pytest.approx(
                t1["per_gene_pcc"][g], abs=1e-6
            )

    # Task 1 refitted from the dumped train embeddings with a fresh sklearn pipeline
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    def cat(prefix: str) -> np.ndarray:
        parts = []
        for s in scales:
            a = np.asarray(z[f"{prefix}{s}"], np.float64)
            parts.append(a / np.linalg.norm(a, axis=1, keepdims=True))
        return np.hstack(parts)

    def refit(xtr: np.ndarray, xte: np.ndarray) -> tuple[np.ndarray, float]:
        ytr = z["targets_train"]
        mu = ytr.mean(axis=0)
        sc = StandardScaler()
        n_comp = min(256, *xtr.shape)
        pca = PCA(n_components=n_comp, random_state=int(z["seed"]))
        ztr = pca.fit_transform(sc.fit_transform(xtr))
        alpha = 100 / (n_comp * ytr.shape[1])
        ridge = Ridge(solver="lsqr", fit_intercept=False, alpha=alpha, max_iter=1000)
        ridge.fit(ztr, ytr - mu)
        zte = pca.transform(sc.transform(xte))
        # lsqr stops at a tolerance: the closed-form ridge agrees to that tolerance only
        w = np.linalg.solve(ztr.T @ ztr + alpha * np.eye(n_comp), ztr.T @ (ytr - mu))
        gap = float(np.abs(zte @ w - ridge.predict(zte)).max())
        return ridge.predict(zte) + mu, gap

    # the headline (macro): same predictions as dumped, same numbers
    pred_macro, gap = refit(
        np.asarray(z["train_he_macro"], np.float64), np.asarray(z["he_macro"], np.float64)
    )
    assert np.abs(pred_macro - pred).max() < 1e-6
    assert gap < 1e-2 * max(1.0, np.abs(pred).max())
    # concat: numbers recomputed from the refitted predictions
    pred_cat, _ = refit(cat("train_he_"), cat("he_"))
    t1c = m["by_embedding"]["concat"]["task1"]
    r = [pearsonr(pred_cat[i], y[i])[0] for i in range(n)]
    assert np.nanmean(r) == pytest.approx(t1c["pcc_mean"], abs=1e-6)
    assert np.mean((pred_cat - y) ** 2) == pytest.approx(t1c["mse_mean"], abs=1e-6)


def test_trained_model_is_better_than_nothing(evaluated) -> None:
    """Against the floors that need no model: predicting the training mean for every test
    tile (Task 1: its per-tile PCC is high because every tile shares the mean profile; its
    MSE), and chance retrieval (Task 2: Recall@15 % averaged over the two directions, 28 test
    tiles). Six tiny epochs on ~50 training tiles, so only "better than nothing" is asked
    (the real comparison is the slow test)."""
    out, m = evaluated
    with np.load(out / "embeddings.npz", allow_pickle=False) as z:
        y, y_train = z["targets_test"], z["targets_train"]
    floor = np.broadcast_to(y_train.mean(axis=0), y.shape)
    floor_pcc = float(np.nanmean([pearsonr(floor[i], y[i])[0] for i in range(len(y))]))
    floor_mse = float(np.mean((floor - y) ** 2))
    t1, t2 = m["task1"], m["task2"]
    print(
        f"\nTask 1 PCC {t1['pcc_mean']:.3f} (training-mean floor {floor_pcc:.3f}), MSE "
        f"{t1['mse_mean']:.4f} (floor {floor_mse:.4f}); Task 2 HE->ST R@15% "
        f"{t2['he_to_st']['R@15%']:.3f}, ST->HE {t2['st_to_he']['R@15%']:.3f} "
        f"(chance {t2['chance']['R@15%']:.3f})"
    )
    assert t1["pcc_mean"] > floor_pcc
    assert t1["mse_mean"] < floor_mse
    mean_r15 = (t2["he_to_st"]["R@15%"] + t2["st_to_he"]["R@15%"]) / 2
    assert mean_r15 > t2["chance"]["R@15%"]


def test_ablation_on_the_same_split_and_compare_table(trained, evaluated, synthetic_medium):
    from napari_sigmma.cli import main
    from napari_sigmma.evaluation.baselines import train_variant, variant_config

    root, run, cfg = trained
    out, _ = evaluated
    from napari_sigmma.tiles.split import TileSplit
    from napari_sigmma.train.data import load_slides, make_split

    vcfg = variant_config(cfg, "single_scale", root / "single", ref_run=run, epochs=1)
    assert vcfg.model.scales == ("macro",) and vcfg.split_fractions == cfg.split_fractions
    # another split seed: left to itself the trainer would make another split
    vcfg = vcfg.replace(split_seed=7)
    own = make_split(vcfg, load_slides(vcfg)).to_dict()["slides"]
    assert own != TileSplit.load(run / "split.json").to_dict()["slides"]
    best = train_variant(vcfg, run / "split.json")
    a = json.loads((run / "split.json").read_text())
    b = json.loads((root / "single" / "split.json").read_text())
    assert a["slides"] == b["slides"]
    # an unchanged finished run is reused, a different one in the same folder is refused
    assert train_variant(vcfg, run / "split.json") == best
    with pytest.raises(SigmmaError, match="different run"):
        train_variant(vcfg.replace(epochs=2), run / "split.json")

    cmp_dir = root / "compare"
    code = main(
        [
            "evaluate",
            "--compare",
            str(out),
            str(root / "single"),
            "--out",
            str(cmp_dir),
            "--throughput-tiles",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    md = (cmp_dir / "compare.md").read_text()
    assert "frozen backbone" in md and "full+fast" in md and "single_scale+fast" in md
    assert "same" in md and "Warning" not in md  # one split for every row
    assert "leave-one-out order" in md
    table = json.loads((cmp_dir / "compare.json").read_text())
    labels = [r["label"] for r in table["rows"]]
    assert labels == ["frozen backbone (fast)", "full+fast", "single_scale+fast"]
    assert len({r["test_ids_sha1"] for r in table["rows"]}) == 1
    assert table["order_check"]["present"] == ["full+fast", "single_scale+fast"]
    assert (cmp_dir / "compare_recall.png").stat().st_size > 10_000
    assert (cmp_dir / "runs" / "single" / "metrics.json").is_file()


def test_errors_name_the_problem(tmp_path, trained) -> None:
    from napari_sigmma.evaluation.run import evaluate

    with pytest.raises(SigmmaError, match="not found"):
        evaluate(None, tmp_path / "nope.pt", tmp_path / "out")
    _, run, _ = trained
    with pytest.raises(SigmmaError, match="split file not found"):
        evaluate(None, run, tmp_path / "out", split=tmp_path / "missing.json")


@pytest.mark.slow
def test_headline_comparison_on_400_held_out_synthetic_tiles(sigmma_cache, tmp_path) -> None:
    """Full SIGMMA vs the frozen backbone, BLEEP-style and the three ablations, all on one
    split with ≥ 400 test tiles (the sample of the trainer's headline test)."""
    import torch

    from napari_sigmma.evaluation.baselines import train_and_compare
    from napari_sigmma.samples.synthetic import write_synthetic_sample

    torch.set_num_threads(1)
    data = sigmma_cache / "synthetic_8704_seed1"
    if not (data / "experiment.xenium").is_file():
        write_synthetic_sample(data, size=8704, seed=1)
    table = train_and_compare(
        data,
        tmp_path / "cmp",
        config={
            "epochs": 12,
            "batch_size": 32,
            "warmup_steps": 20,
            "patience": 4,
            "split_block": 4,
            "split_fractions": [0.4, 0.08, 0.52],
            "device": "cpu",
            "feature_cache_dir": str(sigmma_cache / "features"),
            "model": {"fast_multicrop": True},
        },
        variants=("bleep", "no_graph", "single_scale", "no_sparsify"),
        throughput_tiles=4,
        log=print,
    )
    print(table["markdown"])
    rows = {r["variant"]: r for r in table["rows"]}
    m = json.loads((tmp_path / "cmp" / "report" / "metrics.json").read_text())
    assert m["n_test_tiles"] >= 400
    full, frozen = rows["full+fast"], rows["frozen_backbone+fast"]
    assert full["task1"]["pcc_mean"] > frozen["task1"]["pcc_mean"]
    assert full["task1"]["mse_mean"] < frozen["task1"]["mse_mean"]
    r5 = lambda r: r["task2"]["he_to_st"]["R@5%"] + r["task2"]["st_to_he"]["R@5%"]  # noqa: E731
    assert r5(full) > r5(frozen)
    assert set(rows) >= {"bleep+fast", "no_graph+fast", "single_scale+fast", "no_sparsify+fast"}
    assert "leave-one-out order" in table["markdown"]
