"""Tiny training configurations shared by the train tests."""

from __future__ import annotations

from pathlib import Path

from napari_sigmma.train.config import TrainConfig

TINY_MODEL = {
    "fast_multicrop": True,
    "embed_dim": 32,
    "hidden": 32,
    "head_hidden": 64,
    "gnn_layers": (1, 1, 1),
}


def tiny_cfg(data: Path, run: Path, cache: Path, **changes) -> TrainConfig:
    d = {
        "data": [str(data)],
        "run_dir": str(run),
        "epochs": 2,
        "batch_size": 4,
        "grad_accum": 2,
        "split_block": 2,
        "n_pca": 16,
        "warmup_steps": 2,
        "device": "cpu",
        "feature_cache_dir": str(cache),
        "model": dict(TINY_MODEL),
    }
    d.update(changes)
    return TrainConfig.from_dict(d)
