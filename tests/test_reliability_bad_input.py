"""Bad input across training, inference, the CLI and the widgets (issue 8).

Readers' bad input is covered in ``test_io_xenium.py``, ``test_io_wsi.py``,
``test_io_hest.py``, ``test_io_store.py`` and ``test_viewer_readers.py``; this file adds the
cases past the readers. Every case must end in a :class:`SigmmaError` naming the file or
folder (one stderr line and exit code 2 from the CLI, a status text and a notification in a
widget), and nothing already saved may be lost.

Cases here: target_mpp of 0 (dict and YAML); an empty data list; a slide smaller than one
tile; tiles without cells; an output folder below a regular file; a disk that fills up while
a checkpoint is written (a real 64-KiB-headroom tmpfs); a used run folder (fresh start and
a resume with another config) with its checkpoints byte-identical afterwards; a gene panel
that partly differs at inference (aligned as documented) and one that is disjoint (refused);
NaN/inf node features; inf embeddings in the retrieval index; the CLI with a YAML of unknown
keys, a missing data path, an output below a file, a foreign backbone file, a truncated
checkpoint and a checkpoint whose weights belong to another backbone; the training widget
with a bad data folder (and working afterwards); a corrupt Xenium bundle in the napari
reader (viewer keeps working).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_data import tiny_cfg
from napari_sigmma.errors import SigmmaError
from napari_sigmma.train.checkpoint import load_checkpoint
from napari_sigmma.train.config import TrainConfig
from napari_sigmma.train.loop import train

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rel-features")


@pytest.fixture(scope="module")
def trained_run(tiny_trained_run: TrainConfig) -> TrainConfig:
    """A finished 1-epoch tiny run on the synthetic sample (the session's, in conftest)."""
    return tiny_trained_run


@pytest.fixture(scope="module")
def synthetic_sdata(synthetic_small: Path):  # type: ignore[no-untyped-def]
    from napari_sigmma.io import load_any

    return load_any(synthetic_small)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    from napari_sigmma.cli import main

    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def _assert_one_line_error(code: int, err: list[str], name: str) -> None:
    assert code == 2, err
    assert len(err) == 1, err
    assert "error:" in err[0] and name in err[0], err


# ----------------------------------------------------------------------------- training


def test_target_mpp_of_zero_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SigmmaError, match="target_mpp"):
        TrainConfig.from_dict({"target_mpp": 0})
    bad = tmp_path / "zero_mpp.yaml"
    bad.write_text("target_mpp: 0.0\n")
    with pytest.raises(SigmmaError, match="target_mpp") as err:
        TrainConfig.from_yaml(bad)
    assert str(bad) in str(err.value)


def test_empty_data_list(tmp_path: Path, feature_cache: Path) -> None:
    cfg = tiny_cfg(tmp_path, tmp_path / "run", feature_cache).replace(data=[])
    with pytest.raises(SigmmaError, match="no training data"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_slide_smaller_than_one_tile(tmp_path: Path, feature_cache: Path) -> None:
    from napari_sigmma.samples.synthetic import write_synthetic_sample

    small = write_synthetic_sample(tmp_path / "small", size=200, seed=1)  # 100 µm < 128 µm
    with pytest.raises(SigmmaError, match="no tiles") as err:
        train(tiny_cfg(small, tmp_path / "run", feature_cache))
    assert str(small) in str(err.value) and "256-px tile" in str(err.value)


def test_tiles_without_enough_cells(synthetic_small: Path, tmp_path: Path, feature_cache) -> None:
    cfg = tiny_cfg(synthetic_small, tmp_path / "run", feature_cache, min_cells=10**6)
    with pytest.raises(SigmmaError, match=r"no training tiles.*min_cells"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_output_folder_below_a_file_fails_before_data_preparation(
    synthetic_small: Path, tmp_path: Path, feature_cache: Path
) -> None:
    """As root, chmod does not stop writes; a run folder whose parent is a regular file is
    a real unwritable location."""
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file, not a folder")
    t0 = time.perf_counter()
    with pytest.raises(SigmmaError, match="is a file, not a folder") as err:
        train(tiny_cfg(synthetic_small, blocker / "run", feature_cache))
    assert str(blocker / "run") in str(err.value)
    assert time.perf_counter() - t0 < 5.0  # refused before reading and tiling the slide
    assert blocker.read_text() == "a file, not a folder"


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(
    trained_run: TrainConfig, small_tmpfs
) -> None:
    """A copy of a finished run on a tmpfs with ~64 KiB to spare: resuming for one more
    epoch fails when the checkpoint is written, with a clear error, and the existing
    checkpoints are byte-identical (no temp file left behind)."""
    src = Path(trained_run.run_dir)
    used_kib = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) // 1024
    ckpt_kib = (src / "checkpoints" / "last.pt").stat().st_size // 1024
    assert ckpt_kib > 256  # the headroom below is far smaller than one checkpoint
    disk = small_tmpfs(used_kib + 64 + 4 * 16)  # + headroom + per-file page rounding
    run = disk / "run"
    shutil.copytree(src, run)
    before = _hashes(run / "checkpoints")
    cfg = trained_run.replace(run_dir=str(run), epochs=2)
    with pytest.raises(SigmmaError, match="cannot write checkpoint") as err:
        train(cfg, resume=True)
    assert str(run / "checkpoints" / "last.pt") in str(err.value)
    assert _hashes(run / "checkpoints") == before
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1


def test_failed_runs_leave_saved_checkpoints_intact(trained_run: TrainConfig) -> None:
    run = Path(trained_run.run_dir)
    before = _hashes(run / "checkpoints")
    split_before = (run / "split.json").read_bytes()
    with pytest.raises(SigmmaError, match="resume"):
        train(trained_run)  # a fresh start into a used folder
    with pytest.raises(SigmmaError, match=r"differs.*n_pca"):
        train(trained_run.replace(n_pca=8), resume=True)
    with pytest.raises(SigmmaError, match=r"differs.*model"):
        train(trained_run.replace(model={"embed_dim": 16}), resume=True)
    assert _hashes(run / "checkpoints") == before
    assert (run / "split.json").read_bytes() == split_before


# ----------------------------------------------------------------------------- inference


def _with_panel(paired, genes: list[str], counts):  # type: ignore[no-untyped-def]
    import dataclasses

    import scipy.sparse as sp

    return dataclasses.replace(paired, genes=list(genes), counts=sp.csr_matrix(counts), _hash=None)


def test_gene_panel_differing_from_training(trained_run: TrainConfig, synthetic_sdata) -> None:
    """A partly different panel is aligned by name (missing genes count 0, extra genes
    ignored, any order); a disjoint panel is refused naming the slide."""
    from napari_sigmma.embed.memory import embed_tiles
    from napari_sigmma.tiles.grid import make_tile_grid
    from napari_sigmma.tiles.paired import PairedSlide
    from napari_sigmma.train.checkpoint import graph_settings, model_from_checkpoint

    ckpt = load_checkpoint(Path(trained_run.run_dir) / "checkpoints" / "last.pt")
    model, feat = model_from_checkpoint(ckpt)
    paired = PairedSlide.from_sdata(synthetic_sdata, name="syn")
    assert list(feat.genes) == list(paired.genes)
    dense = paired.counts.toarray()
    rng = np.random.default_rng(0)
    keep = rng.permutation(len(paired.genes))[: len(paired.genes) - 5]  # 5 genes missing
    genes = [paired.genes[i] for i in keep] + ["NOT_A_GENE_1", "NOT_A_GENE_2"]
    extra = rng.poisson(3.0, size=(dense.shape[0], 2))
    partial = _with_panel(paired, genes, np.hstack([dense[:, keep], extra]))
    expected_counts = np.zeros_like(dense)
    expected_counts[:, keep] = dense[:, keep]
    np.testing.assert_allclose(
        feat.features(partial),
        feat.transform_counts(expected_counts, list(paired.genes)),
        rtol=1e-5,
        atol=1e-5,
    )

    disjoint = _with_panel(paired, [f"OTHER{i}" for i in range(dense.shape[1])], dense)
    disjoint.source = "/data/other_panel_slide"
    grid = make_tile_grid(disjoint, tile_px=256, target_mpp=0.5)
    with pytest.raises(SigmmaError, match="share none with the model") as err:
        embed_tiles(
            model,
            disjoint,
            grid,
            featurizer=feat,
            settings=graph_settings(trained_run),
            indices=np.arange(2),
        )
    assert "/data/other_panel_slide" in str(err.value)


def test_nan_and_inf_node_features_are_refused(synthetic_sdata) -> None:
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.paired import PairedSlide

    table = synthetic_sdata.tables["table"]
    feats = np.random.default_rng(0).normal(size=(table.n_obs, 8)).astype(np.float32)
    feats[3, 2], feats[7, 0] = np.nan, np.inf
    table.obsm["bad_feats"] = feats
    try:
        paired = PairedSlide.from_sdata(synthetic_sdata, name="syn", node_obsm="bad_feats")
        paired.source = "/data/slide_with_nan"
        fz = NodeFeaturizer.from_obsm("bad_feats", 8, list(paired.genes))
        with pytest.raises(SigmmaError, match=r"NaN or inf node features in 2 cell") as err:
            fz.features(paired)
        assert "/data/slide_with_nan" in str(err.value)
    finally:
        del table.obsm["bad_feats"]


def test_inf_embeddings_are_refused_by_the_index() -> None:
    from napari_sigmma.retrieval.index import EmbeddingIndex

    emb = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    emb[5, 1] = np.inf
    index = EmbeddingIndex(4, use_faiss=False)
    with pytest.raises(SigmmaError, match="NaN or inf"):
        index.add("slide-a", np.arange(20), emb)
    emb[5, 1] = -np.inf
    with pytest.raises(SigmmaError, match="NaN or inf"):
        index.add("slide-a", np.arange(20), emb)
    assert len(index) == 0


# ----------------------------------------------------------------------------- CLI


def test_cli_train_bad_inputs_are_one_line_exit_2(
    synthetic_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_yaml = tmp_path / "typo.yaml"
    bad_yaml.write_text("epochs: 1\nlearning_rate: 0.01\n")
    code, err = _cli(["train", "--data", str(synthetic_small), "--config", str(bad_yaml)], capsys)
    _assert_one_line_error(code, err, str(bad_yaml))
    assert "learning_rate" in err[0]

    missing = tmp_path / "no_such_bundle"
    code, err = _cli(["train", "--data", str(missing), "--out", str(tmp_path / "r")], capsys)
    _assert_one_line_error(code, err, str(missing))

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, err = _cli(
        ["train", "--data", str(synthetic_small), "--out", str(blocker / "run"), "--epochs", "1"],
        capsys,
    )
    _assert_one_line_error(code, err, str(blocker / "run"))


def test_cli_embed_bad_checkpoints_are_one_line_exit_2(
    trained_run: TrainConfig, synthetic_small: Path, tmp_path: Path, capsys
) -> None:
    from napari_sigmma.models.backbones import create_backbone

    base = ["embed", "--data", str(synthetic_small), "--out", str(tmp_path / "e.zarr")]

    foreign = tmp_path / "vit_tiny_weights.pt"  # a plain backbone state dict
    torch.save(create_backbone("vit_tiny", pretrained=False).module.state_dict(), foreign)
    code, err = _cli([*base, "--checkpoint", str(foreign)], capsys)
    _assert_one_line_error(code, err, str(foreign))
    assert "not a napari-sigmma checkpoint" in err[0]

    good = Path(trained_run.run_dir) / "checkpoints" / "last.pt"
    truncated = tmp_path / "truncated.pt"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    code, err = _cli([*base, "--checkpoint", str(truncated)], capsys)
    _assert_one_line_error(code, err, str(truncated))

    other = tmp_path / "other_backbone.pt"  # the format is right, the weights are not
    ckpt = load_checkpoint(good)
    ckpt["config"]["model"]["backbone"] = "vit_tiny"
    torch.save(ckpt, other)
    code, err = _cli([*base, "--checkpoint", str(other)], capsys)
    _assert_one_line_error(code, err, str(other))
    assert "does not match its model" in err[0]
    # counted, with a few names: not torch's list of every key
    assert "weights missing" in err[0] and len(err[0]) - len(str(other)) < 300, err[0]

    code, err = _cli([*base, "--checkpoint", str(tmp_path / "absent.pt")], capsys)
    _assert_one_line_error(code, err, "absent.pt")

    missing = tmp_path / "no_such_slide"
    code, err = _cli(
        ["embed", "--data", str(missing), "--checkpoint", str(good), "--out", str(tmp_path / "o")],
        capsys,
    )
    _assert_one_line_error(code, err, str(missing))
    assert not (tmp_path / "e.zarr").exists() and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- widgets


def test_training_widget_bad_data_folder_then_keeps_working(
    make_napari_viewer, qtbot, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA training")
    widget.device.setCurrentText("cpu")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    widget.data.setText(str(empty))
    widget.out.setText(str(tmp_path / "run1"))
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert isinstance(widget.error, SigmmaError), widget.error
    assert widget.status.text().startswith("Error:") and str(empty) in widget.status.text()
    assert widget.start_button.isEnabled() and not widget.cancel_button.isEnabled()

    # the same widget runs again and reports the next problem
    not_a_slide = tmp_path / "notes.txt"
    not_a_slide.write_text("not a slide")
    widget.data.setText(str(not_a_slide))
    widget.out.setText(str(tmp_path / "run2"))
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert isinstance(widget.error, SigmmaError), widget.error
    assert str(not_a_slide) in widget.status.text()
    assert not (tmp_path / "run1" / "checkpoints").exists()


def test_reader_corrupt_xenium_bundle_is_a_notification(
    make_napari_viewer, tmp_path: Path, hest_as_xenium: dict
) -> None:  # type: ignore[no-untyped-def]
    from napari.utils.notifications import notification_manager

    bundle = Path(shutil.copytree(hest_as_xenium["path"], tmp_path / "bundle"))
    (bundle / "experiment.xenium").write_text("{ not json")
    viewer = make_napari_viewer()
    before = len(notification_manager.records)
    assert viewer.open(str(bundle), plugin="napari-sigmma") == []
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("experiment.xenium" in m for m in messages), messages
    assert len(viewer.layers) == 0
    assert len(viewer.open(str(hest_as_xenium["path"]), plugin="napari-sigmma")) >= 1
