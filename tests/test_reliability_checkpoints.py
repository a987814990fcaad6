"""Malicious pickles never run (issue 8).

A crafted checkpoint whose unpickling would create a marker file is handed to every place
that reads weights: ``train.checkpoint.load_checkpoint``, ``napari-sigmma embed --checkpoint``,
``models.backbones.create_backbone(checkpoint=)``, the live viewer's loader
(``analysis.liverun.load_live_run``, what the main dock's worker calls) and a resumed
training run. Each must refuse it with a SigmmaError naming the file, and the marker must
not exist. A control load with ``weights_only=False`` proves the payload is live.

The on-disk caches (crop features, tile images, node features, gene heads, tile results,
split) hold no pickle: every ``.npy`` / ``.npz`` a real run writes loads with
``allow_pickle=False``, and a poisoned cache file is refused or rebuilt, never executed.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_data import tiny_cfg
from napari_sigmma.errors import SigmmaError
from napari_sigmma.train.checkpoint import load_checkpoint
from napari_sigmma.train.config import TrainConfig
from napari_sigmma.train.loop import train


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a visible side effect."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def _craft(path: Path, marker: Path, *, zip_format: bool = True) -> Path:
    """A checkpoint-looking dict with the payload inside (torch zip or a bare pickle)."""
    obj = {
        "format": "napari-sigmma-checkpoint",
        "model": {"w": torch.zeros(2)},
        "config": _Payload(marker),
    }
    if zip_format:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    assert not marker.exists()
    return path


@pytest.fixture(params=["torch-zip", "bare-pickle"])
def evil(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = _craft(tmp_path / "evil.pt", marker, zip_format=request.param == "torch-zip")
    return path, marker


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: an unsafe load of the same kind of file does run the payload (so the
    checks below can fail). Run in a subprocess so this process stays clean."""
    for fmt in (True, False):
        marker = tmp_path / f"control-{fmt}"
        path = _craft(tmp_path / f"control-{fmt}.pt", marker, zip_format=fmt)
        load = "torch.load(p, weights_only=False)" if fmt else "pickle.loads(p.read_bytes())"
        code = f"import pickle, sys, torch; from pathlib import Path; p = Path(sys.argv[1]); {load}"
        res = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert marker.exists()


def test_load_checkpoint_refuses(evil: tuple[Path, Path]) -> None:
    path, marker = evil
    with pytest.raises(SigmmaError, match="cannot load checkpoint") as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    # torch's own refusal, cut to one line, reads as advice to load unsafely, and carries
    # terminal colour codes: the message says what it means instead
    assert "Python objects" in msg and "Re-running" not in msg and "\x1b" not in msg, msg
    assert not marker.exists()


def test_cli_refusal_is_one_line_on_a_real_terminal(evil: tuple[Path, Path], tmp_path: Path):
    """As a user runs it (a fresh process, Python's default warnings): stderr holds the
    error line only: no torch_geometric deprecation, no pickle-protocol note before it."""
    import os

    path, marker = evil
    data = tmp_path / "data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    argv = ["embed", "--data", str(data), "--checkpoint", str(path), "--out", str(tmp_path / "o")]
    res = subprocess.run(
        [sys.executable, "-m", "napari_sigmma", *argv, "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(err) == 1, err
    assert str(path) in err[0] and "Python objects" in err[0], err
    assert not marker.exists()


def test_cli_embed_refuses(
    evil: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from napari_sigmma.cli import main

    path, marker = evil
    data = tmp_path / "data"
    data.mkdir()
    code = main(
        ["embed", "--data", str(data), "--checkpoint", str(path), "--out", str(tmp_path / "o")]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and str(path) in err[0], err
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def test_backbone_loader_refuses(evil: tuple[Path, Path]) -> None:
    from napari_sigmma.models.backbones import create_backbone

    path, marker = evil
    with pytest.raises(SigmmaError) as err:
        create_backbone("vit_tiny", checkpoint=path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_live_viewer_loader_refuses(evil: tuple[Path, Path]) -> None:
    """The main dock hands its checkpoint to ``load_live_run`` in a worker."""
    from napari_sigmma.live.run import load_live_run

    path, marker = evil
    with pytest.raises(SigmmaError) as err:
        load_live_run(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_resume_from_a_poisoned_last_checkpoint(
    evil: tuple[Path, Path], tmp_path: Path, synthetic_small: Path
) -> None:
    path, marker = evil
    cfg = tiny_cfg(synthetic_small, tmp_path / "run", tmp_path / "fc")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(path.read_bytes())
    with pytest.raises(SigmmaError) as err:
        train(cfg, resume=True)
    assert str(last) in str(err.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- caches


@pytest.fixture(scope="module")
def finished_run(synthetic_small: Path, tmp_path_factory) -> TrainConfig:
    root = tmp_path_factory.mktemp("ckpt-run")
    cfg = tiny_cfg(synthetic_small, root / "run", root / "features", epochs=1)
    assert train(cfg).status == "completed"
    return cfg


def test_caches_and_run_files_hold_no_pickle(finished_run: TrainConfig) -> None:
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.split import TileSplit

    run, feats = Path(finished_run.run_dir), Path(finished_run.feature_cache_dir)
    arrays = [p for root in (run, feats) for p in root.rglob("*") if p.suffix in (".npy", ".npz")]
    assert any(p.suffix == ".npy" for p in arrays) and any(p.suffix == ".npz" for p in arrays)
    for p in arrays:
        z = np.load(p, allow_pickle=False)
        if p.suffix == ".npz":
            with z:
                for k in z.files:
                    assert z[k].dtype != object, (p, k)
        else:
            assert z.dtype != object, p
    others = {p.suffix for root in (run, feats) for p in root.rglob("*") if p.is_file()}
    assert not others & {".pkl", ".pickle", ".joblib"}, others
    NodeFeaturizer.load(run / "features.npz")
    TileSplit.load(run / "split.json")


def test_poisoned_caches_are_refused_or_rebuilt(finished_run: TrainConfig, tmp_path: Path) -> None:
    """Object arrays (whose loading would unpickle the payload) planted in the feature
    cache, the node-feature file and a gene-head file: nothing runs; the crop-feature
    cache is rebuilt, the others raise a SigmmaError naming the file."""
    import shutil

    from napari_sigmma.analysis.genehead import GeneHead
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.train.checkpoint import model_from_checkpoint
    from napari_sigmma.train.data import cached_crop_features, load_slides

    marker = tmp_path / "PWNED"
    poison = np.empty(1, dtype=object)
    poison[0] = _Payload(marker)

    feats = tmp_path / "features"
    shutil.copytree(finished_run.feature_cache_dir, feats)
    (npy,) = [p for p in feats.rglob("*.npy")]
    good = np.load(npy, allow_pickle=False)
    np.save(npy, poison, allow_pickle=True)
    model, _ = model_from_checkpoint(Path(finished_run.run_dir) / "checkpoints" / "last.pt")
    (slide,) = load_slides(finished_run)
    import json

    ids = json.loads(npy.with_suffix(".json").read_text())["tile_ids"]
    tiles = np.array([slide.grid.tile_ids.index(t) for t in ids[:3]])
    out = cached_crop_features(model, slide, tiles, feats, device=torch.device("cpu"))
    np.testing.assert_allclose(out[tiles], good[:3], rtol=1e-4, atol=1e-4)
    assert np.load(npy, allow_pickle=False).dtype == np.float32  # rebuilt without pickle
    assert not marker.exists()

    bad_npz = tmp_path / "features.npz"
    np.savez(bad_npz, kind="pca", genes=poison, target_sum=1.0)
    with pytest.raises(SigmmaError) as err:
        NodeFeaturizer.load(bad_npz)
    assert str(bad_npz) in str(err.value)
    bad_head = tmp_path / "gene_head.npz"
    np.savez(bad_head, scales=poison, genes=poison)
    with pytest.raises(SigmmaError) as err:
        GeneHead.load(bad_head)
    assert str(bad_head) in str(err.value)
    assert not marker.exists()
