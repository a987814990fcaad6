"""Bad input and faults on the training side (issue 18), one test per case.

Two training runs into one run folder (a real second run while the first trains, and a
lock left by a dead process); the resume command printed after Ctrl-C, run exactly as
printed; ``--epochs 0``; checkpoints with NaN weights, an int64 weight or a tensor where a
number belongs; a full disk while a checkpoint and while the crop-feature cache is written
(real small tmpfs mounts); a run folder equal to or inside the data bundle; a bundle whose
cells all fall outside the H&E image. Every case ends in a one-line SigmmaError naming the
file (exit code 2 from the CLI) and leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    return tmp_path_factory.mktemp("bad-train-features")


@pytest.fixture(scope="module")
def trained_run(synthetic_small: Path, feature_cache: Path, tmp_path_factory) -> TrainConfig:
    cfg = tiny_cfg(
        synthetic_small, tmp_path_factory.mktemp("bad-train") / "run", feature_cache, epochs=1
    )
    assert train(cfg).status == "completed"
    return cfg


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    from napari_sigmma.cli import main

    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, [ln for ln in cap.err.splitlines() if ln.strip()]


def _one_line_error(code: int, err: list[str], name: str) -> None:
    assert code == 2, err
    assert len(err) == 1, err
    assert "error:" in err[0] and name in err[0], err


def _bundle_copy(src: Path, dst: Path) -> Path:
    """A bundle folder of symlinks to ``src``'s files (cheap; files can be replaced)."""
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).symlink_to(p, target_is_directory=p.is_dir())
    return dst


# ----------------------------------------------------------------------------- one folder, two runs


def test_second_run_into_a_busy_run_folder_is_refused(
    synthetic_small: Path, feature_cache: Path, tmp_path: Path
) -> None:
    """A real first run trains in a thread; a second run into the same folder, started
    while the first is between steps, is refused naming the holder; the first finishes
    unharmed and its lock is gone afterwards."""
    cfg = tiny_cfg(
        synthetic_small, tmp_path / "run", feature_cache, epochs=1, max_steps_per_epoch=2
    )
    in_step, go_on = threading.Event(), threading.Event()
    result: dict = {}

    class Hold:
        def on_step(self, step, epoch, loss, parts):  # type: ignore[no-untyped-def]
            in_step.set()
            go_on.wait(120)

    def first() -> None:
        result["res"] = train(cfg, callbacks=Hold())

    th = threading.Thread(target=first)
    th.start()
    try:
        assert in_step.wait(240)
        lock = json.loads((tmp_path / "run" / ".lock").read_text())
        assert lock == {"pid": os.getpid(), "host": socket.gethostname()}
        before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
        with pytest.raises(SigmmaError, match="another training process") as err:
            train(cfg.replace(n_pca=8))  # other settings: must not touch the first's files
        assert str(tmp_path / "run") in str(err.value) and str(os.getpid()) in str(err.value)
        assert "\n" not in str(err.value)
        assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before
    finally:
        go_on.set()
        th.join(240)
    assert result["res"].status == "completed"
    assert TrainConfig.from_yaml(tmp_path / "run" / "config.yaml").n_pca == cfg.n_pca
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_stale_lock_from_a_dead_process_is_taken_over(
    synthetic_small: Path, feature_cache: Path, tmp_path: Path
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    cfg = tiny_cfg(synthetic_small, run, feature_cache, epochs=1, max_steps_per_epoch=1)
    assert train(cfg).status == "completed"
    assert not (run / ".lock").exists()
    # A lock whose process is alive is not stale.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run2 = tmp_path / "run2"
        run2.mkdir()
        (run2 / ".lock").write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname()}))
        with pytest.raises(SigmmaError, match=f"pid {alive.pid}"):
            train(cfg.replace(run_dir=str(run2)))
        assert sorted(p.name for p in run2.iterdir()) == [".lock"]
    finally:
        alive.kill()
        alive.wait()


# ----------------------------------------------------------------------------- CLI


def test_resume_hint_after_ctrl_c_works_exactly_as_printed(
    synthetic_small: Path, feature_cache: Path, tmp_path: Path, capsys
) -> None:
    """Ctrl-C (a real SIGINT) during ``napari-sigmma train``: exit 130 and a printed resume
    command; that command, split as a shell would and run as is, finishes the run. The
    first run also showed a tqdm progress bar on stderr."""
    cfg = tiny_cfg(synthetic_small, tmp_path / "unused", feature_cache, epochs=4,
                   max_steps_per_epoch=2)  # fmt: skip
    cfg.save_yaml(tmp_path / "tiny.yaml")
    run = tmp_path / "run dir"  # a space: the printed command must quote it
    metrics = run / "metrics.jsonl"

    def interrupt() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if metrics.is_file() and '"kind": "step"' in metrics.read_text():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)

    th = threading.Thread(target=interrupt, daemon=True)
    th.start()
    code, out, err = _cli(
        ["train", "--data", str(synthetic_small), "--config", str(tmp_path / "tiny.yaml"),
         "--out", str(run), "--device", "cpu"],
        capsys,
    )  # fmt: skip
    th.join()
    assert code == 130, (out, err)
    assert any(re.search(r"training:\s*\d+%.*\d+/\d+", ln) for ln in err), err  # tqdm bar
    (hint,) = [ln for ln in out.splitlines() if ln.startswith("resume with: ")]
    argv = shlex.split(hint.removeprefix("resume with: "))
    assert argv[0] == "napari-sigmma" and "--data" not in argv
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")["global_step"]
    code, out, err = _cli(argv[1:], capsys)
    assert code == 0, err
    assert "completed" in out
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 4 and last["global_step"] > stopped


def test_quiet_shows_no_progress_bar(
    synthetic_small: Path, feature_cache: Path, tmp_path: Path, capsys
) -> None:
    cfg = tiny_cfg(synthetic_small, tmp_path / "unused", feature_cache, max_steps_per_epoch=1)
    cfg.save_yaml(tmp_path / "tiny.yaml")
    base = ["train", "--data", str(synthetic_small), "--config", str(tmp_path / "tiny.yaml"),
            "--epochs", "1", "--device", "cpu"]  # fmt: skip
    code, _, err = _cli([*base, "--out", str(tmp_path / "q"), "--quiet"], capsys)
    assert code == 0, err
    assert not any("training:" in ln or "it/s" in ln for ln in err), err


def test_epochs_zero_is_refused(synthetic_small: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _cli(
        ["train", "--data", str(synthetic_small), "--out", str(tmp_path / "r"), "--epochs", "0"],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "--epochs 0" in err[0], err
    assert not (tmp_path / "r").exists()


def test_run_folder_inside_or_equal_to_the_data_bundle_is_refused(
    synthetic_small: Path, tmp_path: Path, capsys
) -> None:
    bundle = _bundle_copy(synthetic_small, tmp_path / "bundle")
    names = sorted(p.name for p in bundle.iterdir())
    for out in (bundle, bundle / "runs" / "a"):
        code, _, err = _cli(
            ["train", "--data", str(bundle), "--out", str(out), "--epochs", "1"], capsys
        )
        _one_line_error(code, err, str(out))
        assert "inside the data set" in err[0]
    assert sorted(p.name for p in bundle.iterdir()) == names  # nothing written into it


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("case", ["nan-weight", "inf-weight", "int64-weight", "tensor-metadata"])
def test_checkpoints_are_validated_before_use(
    case: str, trained_run: TrainConfig, synthetic_small: Path, tmp_path: Path, capsys
) -> None:
    good = Path(trained_run.run_dir) / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(good)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and v.numel() > 1)
    w = ckpt["model"][name]
    if case == "nan-weight":
        w.view(-1)[0] = float("nan")
        why = "NaN"
    elif case == "inf-weight":
        w.view(-1)[-1] = float("inf")
        why = "infinite"
    elif case == "int64-weight":
        ckpt["model"][name] = w.long()
        why = "int64"
    else:
        ckpt["n_genes"] = torch.tensor(ckpt["n_genes"])
        why = "n_genes"
    bad = tmp_path / f"{case}.pt"
    torch.save(ckpt, bad)
    with pytest.raises(SigmmaError, match=why) as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    out = tmp_path / "e.zarr"
    code, _, lines = _cli(
        ["embed", "--data", str(synthetic_small), "--checkpoint", str(bad), "--out", str(out),
         "--device", "cpu"],
        capsys,
    )  # fmt: skip
    _one_line_error(code, lines, str(bad))
    assert not out.exists()


# ----------------------------------------------------------------------------- disk full


def test_disk_full_while_checkpointing_says_disk_full(
    synthetic_small: Path, feature_cache: Path, small_tmpfs
) -> None:
    disk = small_tmpfs(512)  # room for the run's small files, not for one checkpoint
    run = disk / "run"
    cfg = tiny_cfg(synthetic_small, run, feature_cache, epochs=1, max_steps_per_epoch=1)
    with pytest.raises(SigmmaError, match="disk full") as err:
        train(cfg)
    msg = str(err.value)
    assert str(run) in msg and "\n" not in msg and "unexpected pos" not in msg
    left = [p.name for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left
    assert not (run / "checkpoints" / "last.pt").exists()


def test_disk_full_while_caching_crop_features_says_disk_full(
    synthetic_small: Path, tmp_path: Path, small_tmpfs
) -> None:
    disk = small_tmpfs(64)  # far below the cache's ~3 MB
    cfg = tiny_cfg(synthetic_small, tmp_path / "run", disk / "features", epochs=1)
    with pytest.raises(SigmmaError, match="disk full") as err:
        train(cfg)
    msg = str(err.value)
    assert str(disk / "features") in msg and ".npy" in msg and "\n" not in msg
    assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- data


def test_cells_all_outside_the_he_name_the_data_and_the_alignment(
    synthetic_small: Path, feature_cache: Path, tmp_path: Path
) -> None:
    bundle = _bundle_copy(synthetic_small, tmp_path / "shifted")
    (bundle / "he_imagealignment.csv").unlink()
    # H&E pixel (0, 0) lands a million morphology pixels away: no cell is on the H&E.
    (bundle / "he_imagealignment.csv").write_text("2.35,0,1000000\n0,2.35,1000000\n0,0,1\n")
    cfg = tiny_cfg(bundle, tmp_path / "run", feature_cache, epochs=1)
    with pytest.raises(SigmmaError, match="no training tiles") as err:
        train(cfg)
    msg = str(err.value)
    assert str(bundle) in msg and "alignment" in msg and "0%" in msg, msg
