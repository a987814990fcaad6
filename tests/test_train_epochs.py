"""What an epoch is made of and what it logs (issues 14 and 17, training side).

No tiny contrastive batches (a short last batch is merged into the one before it), the
best checkpoint chosen with a margin of one binomial standard error of the validation
score, TensorBoard event files whose scalars equal ``metrics.jsonl``, and the per-epoch
diagnostics hook (numbers logged, the training run unchanged by it). One real tiny run on
the synthetic sample serves the checks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_data import tiny_cfg
from napari_sigmma.train.checkpoint import load_checkpoint
from napari_sigmma.train.config import TrainConfig
from napari_sigmma.train.data import epoch_batches, load_slides, make_split, split_entries
from napari_sigmma.train.loop import RunResult, train
from napari_sigmma.train.validation import BestSelector

EPOCHS = 3


def _records(run: Path, kind: str) -> list[dict]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == kind]


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("epoch-features")


@pytest.fixture(scope="module")
def awkward(synthetic_small: Path, feature_cache: Path, tmp_path_factory):
    """A config whose batch size leaves a last batch of fewer than half a batch, and the
    number of training tiles."""
    probe = tiny_cfg(synthetic_small, tmp_path_factory.mktemp("probe") / "r", feature_cache)
    slides = load_slides(probe)
    n_train = len(split_entries(make_split(probe, slides), slides)["train"])
    bs = next(b for b in range(3, 13) if 0 < n_train % b and 2 * (n_train % b) < b)
    return {"batch_size": bs, "grad_accum": 1, "epochs": EPOCHS, "val_every": 1}, n_train


@pytest.fixture(scope="module")
def run(synthetic_small: Path, feature_cache: Path, tmp_path_factory, awkward):
    changes, n_train = awkward
    cfg = tiny_cfg(synthetic_small, tmp_path_factory.mktemp("epochs") / "run", feature_cache,
                   **changes)  # fmt: skip
    res = train(cfg)
    assert res.status == "completed"
    return cfg, res, n_train


def test_epoch_batches_are_never_tiny() -> None:
    for world in (1, 2, 3):
        for bs in range(2, 13):
            for n in range(2, 61):
                shares = [
                    epoch_batches(np.arange(n), bs, rank=r, world=world) for r in range(world)
                ]
                sizes = [[len(b) for b in s] for s in shares]
                assert all(s == sizes[0] for s in sizes)  # every rank in step
                share = math.ceil(n / world)
                if share >= 2:
                    assert sum(sizes[0]) == share  # no tile of the share left out
                for s in sizes[0]:
                    assert s >= 2 and (len(sizes[0]) == 1 or 2 * s >= bs), (world, bs, n, s)
                    assert s <= bs + max((bs - 1) // 2, 1)  # a merged batch: ≤ 1.5 x


def test_a_training_epoch_holds_no_tiny_batch(run) -> None:
    cfg, _, n_train = run
    assert 2 * (n_train % cfg.batch_size) < cfg.batch_size  # the naive cut would be tiny
    steps = _records(Path(cfg.run_dir), "step")
    for epoch in range(EPOCHS):
        sizes = [b for r in steps if r["epoch"] == epoch for b in r["batches"]]
        assert sum(sizes) == n_train  # every training tile, once
        assert min(sizes) * 2 >= cfg.batch_size, sizes


def test_best_checkpoint_needs_an_improvement_beyond_the_standard_error(run) -> None:
    cfg, res, _ = run
    epochs = _records(Path(cfg.run_dir), "epoch")
    assert len(epochs) == EPOCHS and all("val/score" in r for r in epochs)
    best, best_epoch = None, None
    for r in epochs:
        n, score = r["val/n_tiles"], r["val/score"]
        if best is not None:
            p = min(max(best, 1 / n), 1 - 1 / n)
            assert r["val/best_margin"] == pytest.approx(math.sqrt(p * (1 - p) / n))
        improved = best is None or score > best + math.sqrt(
            min(max(best, 1 / n), 1 - 1 / n) * (1 - min(max(best, 1 / n), 1 - 1 / n)) / n
        )
        assert r["improved"] == improved
        if improved:
            best, best_epoch = score, r["epoch"]
    assert res.best_epoch == best_epoch and res.best_score == pytest.approx(best)
    ck = load_checkpoint(res.best_checkpoint)
    assert ck["epoch"] == best_epoch + 1 and ck["best"]["epoch"] == best_epoch


def test_selection_on_a_noise_plateau_switches_half_as_often() -> None:
    """A model whose true mean recall never changes (binomial noise only, 40 validation
    tiles, 10 validations): the plain maximum moves the best checkpoint 1.6 times per run,
    the margin rule half as often; a real gain of 3 standard errors is always taken."""
    rng = np.random.default_rng(0)
    n, p = 40, 0.3
    naive_moves, rule_moves = [], []
    for _ in range(1000):
        scores = rng.binomial(n, p, size=10) / n
        sel, top, a, b = BestSelector(), None, 0, 0
        for e, s in enumerate(scores):
            if top is not None and s > top:
                a += 1
            top = s if top is None else max(top, s)
            had = sel.score is not None
            b += int(sel.update(float(s), n, e) and had)
        naive_moves.append(a)
        rule_moves.append(b)
    assert np.mean(rule_moves) <= 0.6 * np.mean(naive_moves)
    sel = BestSelector()
    score = 0.1
    for e in range(4):
        assert sel.update(score, n, e) and sel.epoch == e
        score += 3 * sel.margin(n)
    assert not sel.update(sel.score + 0.5 * sel.margin(n), n, 4) and sel.bad_evals == 1


def test_tensorboard_events_hold_the_logged_scalars(run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, _ = run
    folder = Path(cfg.run_dir)
    assert list(folder.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"train/loss", "train/lr", "train/temperature", "val/score", "epoch/train_loss"}
    want |= {f"train/loss_{s}" for s in ("micro", "meso", "macro")}
    want |= {f"val/{s}/{d}@5" for s in ("micro", "meso", "macro") for d in ("he2st", "st2he")}
    assert want <= tags, want - tags
    steps = _records(folder, "step")
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in steps]
    np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in steps], rtol=1e-6)
    lr = acc.Scalars("train/lr")
    np.testing.assert_allclose([e.value for e in lr], [r["lr"] for r in steps], rtol=1e-6)
    micro = acc.Scalars("train/loss_micro")
    np.testing.assert_allclose(
        [e.value for e in micro], [r["parts"]["micro"] for r in steps], rtol=1e-6
    )
    val = acc.Scalars("val/micro/he2st@5")
    epochs = _records(folder, "epoch")
    np.testing.assert_allclose([e.value for e in val], [r["val/micro/he2st@5"] for r in epochs])


def test_epoch_diagnostics_hook_is_logged_and_leaves_training_unchanged(run, monkeypatch) -> None:
    """A model with ``epoch_diagnostics(batch)`` (here: a stochastic one, drawing from
    torch's RNG) gets its numbers logged per epoch; the run's losses and weights equal the
    run without it."""
    from napari_sigmma.models.sigmma import SigmmaModel

    cfg, res, _ = run
    seen: list[tuple[bool, int]] = []

    def diag(self, batch):  # type: ignore[no-untyped-def]
        x, gb = batch
        seen.append((torch.is_grad_enabled(), int(x.shape[0])))
        return {"edges/meso/accept_train": float(torch.rand(())), "n_nodes": gb.num_nodes}

    monkeypatch.setattr(SigmmaModel, "epoch_diagnostics", diag, raising=False)
    other = cfg.replace(run_dir=str(Path(cfg.run_dir).with_name("with-diag")))
    res2: RunResult = train(other)
    assert len(seen) == EPOCHS and not any(g for g, _ in seen)
    assert all(0 < b <= cfg.batch_size for _, b in seen)
    epochs = _records(Path(other.run_dir), "epoch")
    for r in epochs:
        assert 0.0 <= r["diagnostics/edges/meso/accept_train"] <= 1.0
        assert r["diagnostics/n_nodes"] > 0
    np.testing.assert_allclose(res2.step_losses, res.step_losses, rtol=0, atol=1e-6)
    a = load_checkpoint(res.last_checkpoint)["model"]
    b = load_checkpoint(res2.last_checkpoint)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert TrainConfig.from_yaml(Path(other.run_dir) / "config.yaml") == other
