"""The trainer on a real synthetic Xenium bundle with the real (tiny) SIGMMA model.

Run folder contents, checkpoints loadable with ``weights_only=True``, node features fitted
on training tiles only, the frozen-backbone feature cache, exact resume after a cancel
(mid-epoch, with gradient accumulation), cancel from another thread, the CLI (train and
embed), and a kill-and-resume from a periodic checkpoint (slow).
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_data import TINY_MODEL, tiny_cfg
from napari_sigmma.train.checkpoint import load_checkpoint, model_from_checkpoint
from napari_sigmma.train.config import TrainConfig
from napari_sigmma.train.data import epoch_batches
from napari_sigmma.train.loop import RunResult, train, warmup_cosine


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def baseline(synthetic_small, feature_cache, tmp_path_factory) -> tuple[TrainConfig, RunResult]:
    """An uninterrupted 2-epoch run (the reference for the resume tests)."""
    run = tmp_path_factory.mktemp("runs") / "baseline"
    cfg = tiny_cfg(synthetic_small, run, feature_cache)
    res = train(cfg)
    return cfg, res


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _step_losses(run: Path) -> list[float]:
    return [r["loss"] for r in _records(run) if r["kind"] == "step"]


def test_two_epoch_run_writes_the_run_folder(baseline):
    cfg, res = baseline
    run = Path(cfg.run_dir)
    assert res.status == "completed" and res.epoch == 2
    for name in ("config.yaml", "split.json", "metrics.jsonl", "features.npz"):
        assert (run / name).is_file(), name
    assert res.last_checkpoint == run / "checkpoints" / "last.pt"
    assert res.best_checkpoint == run / "checkpoints" / "best.pt"
    assert TrainConfig.from_yaml(run / "config.yaml") == cfg
    recs = _records(run)
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, res.global_step + 1))
    assert all(
        np.isfinite(r["loss"]) and set(r["parts"]) == {"micro", "meso", "macro"} for r in steps
    )
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for s in ("micro", "meso", "macro"):
        for d in ("he2st", "st2he"):
            assert 0.0 <= epochs[-1][f"val/{s}/{d}@5"] <= 1.0
    assert any(r["kind"] == "test" for r in recs) and res.test_metrics["n_tiles"] >= 2
    # Warm-up then cosine: the learning rate rises, then falls.
    lrs = [r["lr"] for r in steps]
    assert lrs[1] > lrs[0] and lrs[-1] < max(lrs)

    split = json.loads((run / "split.json").read_text())
    sl = split["slides"][0]
    per_block = defaultdict(set)
    for b, v in zip(sl["block"], sl["split"], strict=True):
        per_block[b].add(v)
    assert all(len(v) == 1 for v in per_block.values())
    assert split["counts"] == res.n_tiles and res.n_tiles["train"] > res.n_tiles["val"] > 0


def test_checkpoints_are_plain_and_load_with_weights_only(baseline):
    cfg, res = baseline
    for path in (res.last_checkpoint, res.best_checkpoint):
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert ck["format"] == "napari-sigmma-checkpoint"
        assert ck["config"] == cfg.to_dict()
        assert {"model", "optimizer", "scheduler", "rng", "data_generator"} <= set(ck)
        assert isinstance(ck["features"]["components"], torch.Tensor)
        assert isinstance(ck["genes"], list) and len(ck["genes"]) == ck["n_genes"]
    last = load_checkpoint(res.last_checkpoint)
    assert last["epoch"] == 2 and last["batch"] == 0 and last["global_step"] == res.global_step
    model, feat = model_from_checkpoint(res.best_checkpoint)
    assert feat.n_features == 16 and model.cfg.fast_multicrop


def test_node_features_are_fitted_on_training_tiles_only(baseline, synthetic_small):
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.split import TileSplit
    from napari_sigmma.train.data import load_slides

    cfg, _ = baseline
    run = Path(cfg.run_dir)
    saved = NodeFeaturizer.load(run / "features.npz")
    slide = load_slides(cfg)[0]
    split = TileSplit.load(run / "split.json").slides[0]
    pos = {t: i for i, t in enumerate(slide.grid.tile_ids)}

    def cells_of(which):
        tiles = [pos[t] for t, v in zip(split.tile_ids, split.split, strict=True) if v in which]
        return np.concatenate([slide.cells[t].cells for t in tiles])

    counts = slide.paired.counts
    train_only = NodeFeaturizer.fit_pca(
        counts[cells_of({"train"})], slide.paired.genes, n_components=16
    )
    everything = NodeFeaturizer.fit_pca(
        counts[cells_of({"train", "val", "test"})], slide.paired.genes, n_components=16
    )
    np.testing.assert_allclose(saved.mean, train_only.mean, rtol=1e-6)
    np.testing.assert_allclose(saved.components, train_only.components, atol=1e-6)
    assert not np.allclose(saved.mean, everything.mean, rtol=1e-6)


def test_frozen_backbone_features_are_cached_on_disk(baseline, feature_cache):
    _, res = baseline
    npys = list(feature_cache.glob("*/*.npy"))
    assert len(npys) == 1
    arr = np.load(npys[0], allow_pickle=False)
    ids = json.loads(npys[0].with_suffix(".json").read_text())["tile_ids"]
    assert arr.shape[0] == len(ids) == sum(res.n_tiles.values())
    assert arr.shape[1] == 21 and arr.dtype == np.float32
    assert npys[0].name.startswith("efficientnet_lite0-")


def test_resume_after_cancel_replays_the_same_steps(
    baseline, synthetic_small, feature_cache, tmp_path
):
    _, res_a = baseline
    cfg = tiny_cfg(synthetic_small, tmp_path / "b", feature_cache)
    stop = threading.Event()
    n_stop = 2  # mid-epoch: an epoch has more optimiser steps than this

    class StopAt:
        def on_step(self, step, epoch, loss, parts):
            if step == n_stop:
                stop.set()  # cancel requested while step 2 is still being handled

    first = train(cfg, callbacks=StopAt(), cancel=stop)
    assert first.status == "cancelled" and first.global_step == n_stop
    ck = load_checkpoint(first.last_checkpoint)
    assert ck["global_step"] == n_stop and ck["epoch"] == 0 and ck["batch"] > 0
    rest = train(cfg, resume=True)
    assert rest.status == "completed" and rest.global_step == res_a.global_step
    got = first.step_losses + rest.step_losses
    np.testing.assert_allclose(got, res_a.step_losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_step_losses(tmp_path / "b"), res_a.step_losses, atol=1e-5)
    a = load_checkpoint(res_a.last_checkpoint)["model"]
    b = load_checkpoint(rest.last_checkpoint)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_cancel_from_another_thread_checkpoints_and_resumes(
    synthetic_small, feature_cache, tmp_path
):
    cfg = tiny_cfg(synthetic_small, tmp_path / "c", feature_cache, max_steps_per_epoch=2)
    ev = threading.Event()
    started = threading.Event()

    class Started:
        def on_step(self, step, epoch, loss, parts):
            started.set()

    def stopper():
        started.wait(120)
        ev.set()

    th = threading.Thread(target=stopper)
    th.start()
    t0 = time.perf_counter()
    res = train(cfg, callbacks=Started(), cancel=ev)
    th.join()
    assert res.status == "cancelled"
    ck = load_checkpoint(res.last_checkpoint)
    assert ck["global_step"] == res.global_step >= 1
    assert time.perf_counter() - t0 < 300
    again = train(cfg, resume=True)
    assert again.status == "completed" and again.epoch == 2
    assert again.global_step > res.global_step


def test_partial_finetuning_trains_the_last_backbone_stages(synthetic_small, tmp_path):
    """finetune=last_k: tile images are pre-extracted (not features), the last backbone
    stage is trained, the frozen stages keep their pretrained weights."""
    from napari_sigmma.models.sigmma import SigmmaModel

    cfg = tiny_cfg(
        synthetic_small,
        tmp_path / "ft",
        tmp_path / "cache",
        epochs=1,
        max_steps_per_epoch=2,
        grad_accum=1,
        warmup_steps=0,
        backbone_lr=1e-3,
        model={**TINY_MODEL, "finetune": "last_k", "last_k": 1},
    )
    res = train(cfg)
    assert res.status == "completed" and res.global_step == 2
    assert list((tmp_path / "ft" / "cache").glob("tiles_*.npy"))  # images, not features
    ck = load_checkpoint(res.last_checkpoint)
    fresh = SigmmaModel(cfg.model, ck["n_node_features"], ck["n_genes"])  # pretrained weights
    trained = ck["model"]
    changed, kept = [], []
    for name, p in fresh.named_parameters():
        if not name.startswith("image.backbone."):
            continue
        same = torch.equal(p.detach(), trained[name])
        (kept if same else changed).append((name, p.requires_grad))
    assert changed and all(req for _, req in changed)  # only trainable parameters moved
    assert any(not req for _, req in kept)  # the early stages did not


def test_a_used_run_folder_needs_resume(baseline):
    from napari_sigmma.errors import SigmmaError

    cfg, _ = baseline
    with pytest.raises(SigmmaError, match="resume"):
        train(cfg)
    with pytest.raises(SigmmaError, match="differs"):
        train(cfg.replace(batch_size=8), resume=True)


def test_cli_train_and_embed(synthetic_small, feature_cache, tmp_path):
    from napari_sigmma.cli import main
    from napari_sigmma.io.store import read_sdata

    yaml_cfg = tiny_cfg(synthetic_small, tmp_path / "unused", feature_cache, epochs=3)
    yaml_cfg.save_yaml(tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(synthetic_small),
            "--config",
            str(tmp_path / "tiny.yaml"),
            "--out",
            str(run),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert TrainConfig.from_yaml(run / "config.yaml").epochs == 1
    assert (run / "checkpoints" / "best.pt").is_file()

    out = tmp_path / "emb.zarr"
    code = main(
        [
            "embed",
            "--data",
            str(synthetic_small),
            "--checkpoint",
            str(run),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    sd = read_sdata(out)
    assert {"tiles", "cells"} <= set(sd.shapes)
    tab = sd.tables["tile_embeddings"]
    n = len(sd.shapes["tiles"])
    assert tab.n_obs == n
    for s in ("micro", "meso", "macro"):
        assert tab.obsm[f"he_{s}"].shape == (n, 32)
        st = tab.obsm[f"st_{s}"]
        assert st.shape == (n, 32)
        assert np.isfinite(st[tab.obs["valid"].to_numpy()]).all()
    cells = sd.tables["cell_embeddings"]
    assert cells.obsm["st_macro"].shape == (cells.n_obs, 32) and cells.n_obs > 100
    assert tab.uns["spatialdata_attrs"]["region"] == "tiles"

    # a folder of slides: one dask.distributed task per slide on a local cluster
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / name).symlink_to(synthetic_small, target_is_directory=True)
    many = tmp_path / "many.zarr"
    code = main(
        ["embed", "--data", str(folder), "--checkpoint", str(run), "--out", str(many),
         "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    both = read_sdata(many)
    assert {"tiles_0", "tiles_1"} <= set(both.shapes)
    for k in (0, 1):
        t = both.tables[f"tile_embeddings_{k}"]
        # the same slide twice: each worker's embeddings equal the single-slide run's
        np.testing.assert_allclose(t.obsm["he_macro"], tab.obsm["he_macro"], atol=1e-5)
    assert not (tmp_path / "many.zarr.parts").exists()
    # a scheduler address that does not answer: one clear error naming it
    code = main(
        ["embed", "--data", str(folder), "--checkpoint", str(run), "--out",
         str(tmp_path / "none.zarr"), "--scheduler", "tcp://127.0.0.1:9"]
    )  # fmt: skip
    assert code == 2


def test_epoch_batches_shard_like_distributed_sampler():
    perm = np.arange(11)
    b0 = epoch_batches(perm, 3, rank=0, world=2)
    b1 = epoch_batches(perm, 3, rank=1, world=2)
    assert [len(b) for b in b0] == [len(b) for b in b1] == [3, 3]
    flat = [i for b in (*b0, *b1) for i in b]
    assert sorted(flat) == sorted([*range(11), 0])
    # a lone last tile is merged into the batch before it (no 1-tile contrastive batch)
    assert epoch_batches(np.arange(9), 4) == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert epoch_batches(np.arange(1), 4) == []  # a lone tile alone: nothing to contrast
    f = warmup_cosine(10, 3)
    assert [round(f(s), 3) for s in (0, 2, 3)] == [0.333, 1.0, 1.0] and f(9) < 0.1


@pytest.mark.slow
def test_kill_and_resume_from_a_periodic_checkpoint(
    baseline, synthetic_small, feature_cache, tmp_path
):
    """A crash after step 3 (checkpoint every step): the resumed run drops the logged step 3,
    redoes it, and ends like the uninterrupted run."""
    _, res_a = baseline
    cfg = tiny_cfg(synthetic_small, tmp_path / "k", feature_cache, ckpt_every_steps=1)

    class Crash:
        def on_step(self, step, epoch, loss, parts):
            if step == 3:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, callbacks=Crash())
    assert load_checkpoint(tmp_path / "k" / "checkpoints" / "last.pt")["global_step"] == 2
    rest = train(cfg, resume=True)
    np.testing.assert_allclose(_step_losses(tmp_path / "k"), res_a.step_losses, atol=1e-5)
    a = load_checkpoint(res_a.last_checkpoint)["model"]
    b = load_checkpoint(rest.last_checkpoint)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
