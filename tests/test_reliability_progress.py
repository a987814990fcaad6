"""Progress bars on long CLI steps (issue 17): tqdm on stderr, nothing under ``--quiet``,
through the real commands (synthetic sample generation and embedding)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from napari_sigmma.cli import main
from napari_sigmma.train.config import TrainConfig


def _bar_lines(err: str, label: str) -> list[str]:
    # tqdm redraws with carriage returns: every state of the bar is a line here
    return [s for s in re.split(r"[\r\n]", err) if s.startswith(label)]


def test_sample_shows_a_tile_bar_and_quiet_hides_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sample", "--synthetic", "--size", "1024", "--cell-window", "1024"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    states = _bar_lines(err, "H&E tiles")
    assert states, err
    # counts up to the level-0 tile count with tqdm's own "n/total" display
    done = [re.search(r"(\d+)/(\d+) \[", s) for s in states]
    final = [m for m in done if m][-1]
    assert final.group(1) == final.group(2) and int(final.group(2)) >= 1, states[-1]
    assert main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    # the bundles are the same either way
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        p.name for p in (tmp_path / "b").iterdir()
    )


def test_embed_shows_a_tile_bar_and_quiet_hides_it(
    tiny_trained_run: TrainConfig,
    synthetic_small: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = Path(tiny_trained_run.run_dir) / "checkpoints" / "last.pt"
    argv = ["embed", "--data", str(synthetic_small), "--checkpoint", str(ckpt)]
    assert main([*argv, "--out", str(tmp_path / "a.zarr")]) == 0
    err = capsys.readouterr().err
    states = _bar_lines(err, "embed ")
    assert states, err
    m = [re.search(r"(\d+)/(\d+) \[", s) for s in states]
    final = [x for x in m if x][-1]
    assert final.group(1) == final.group(2) and int(final.group(2)) > 1, states[-1]
    assert main([*argv, "--out", str(tmp_path / "b.zarr"), "--quiet"]) == 0
    assert not _bar_lines(capsys.readouterr().err, "embed ")
