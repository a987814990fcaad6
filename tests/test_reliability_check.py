"""``napari-sigmma check PATH`` (issue 18): every problem with what to do, exit 2; exit 0 on
clean data, a clean run folder and a good checkpoint. Real files, the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_sigmma.cli import main
from napari_sigmma.train.config import TrainConfig


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check", str(path)])
    return code, capsys.readouterr().out


def test_clean_bundle_run_and_checkpoint(
    synthetic_small: Path, tiny_trained_run: TrainConfig, capsys
) -> None:
    run = Path(tiny_trained_run.run_dir)
    for p in (synthetic_small, run, run / "checkpoints" / "last.pt", run / "config.yaml"):
        code, out = _check(p, capsys)
        assert code == 0, out
        assert "problem" not in out and out.strip().endswith("OK"), out


def test_config_with_many_problems_lists_each(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "batch_size: 2.5\nsplit_fractions: [0.9, 0.9, 0.9]\nmodel:\n  embed_dim: -3\n"
        f"data: [{tmp_path / 'nowhere'}]\n"
    )
    code, out = _check(cfg, capsys)
    assert code == 2
    assert out.count("problem:") == 4 and out.count("what to do:") == 4, out
    for words in ("batch_size", "sum to 1", "model.embed_dim", "data path not found"):
        assert words in out, out


def test_bad_bundle_slide_and_checkpoint(
    synthetic_small: Path, tiny_trained_run: TrainConfig, tmp_path: Path, capsys
) -> None:
    shifted = shutil.copytree(synthetic_small, tmp_path / "shifted")
    csv = next(shifted.glob("*_imagealignment.csv"))
    a = np.loadtxt(csv, delimiter=",")
    a[:2, 2] += 1e5
    np.savetxt(csv, a, delimiter=",")
    code, out = _check(shifted, capsys)
    assert code == 2 and "none of the" in out and "alignment" in out, out

    ps = shutil.copytree(synthetic_small, tmp_path / "ps")
    exp = ps / "experiment.xenium"
    spec = json.loads(exp.read_text())
    spec["pixel_size"] = 1e6
    exp.write_text(json.dumps(spec))
    code, out = _check(ps, capsys)
    assert code == 2 and f"problem: {exp}" in out and "pixel_size" in out, out

    slide = tmp_path / "tiny.tif"
    tifffile.imwrite(
        slide,
        np.full((10, 10, 3), 200, np.uint8),
        photometric="rgb",
        resolution=(25400 / 0.5, 25400 / 0.5),
        resolutionunit="INCH",
    )
    code, out = _check(slide, capsys)
    assert code == 2 and "no tiles" in out, out

    good = Path(tiny_trained_run.run_dir) / "checkpoints" / "last.pt"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:1000])
    code, out = _check(cut, capsys)
    assert code == 2 and f"problem: {cut}" in out and "what to do" in out, out

    run = shutil.copytree(Path(tiny_trained_run.run_dir), tmp_path / "run")
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    (run / "split.json").write_text("{broken")
    code, out = _check(run, capsys)
    assert code == 2 and "last.pt" in out and "split.json" in out, out

    code, out = _check(tmp_path / "absent", capsys)
    assert code == 2 and "not found" in out


def test_check_dock_says_what_the_cli_says(
    make_napari_viewer, qtbot, synthetic_small: Path, tmp_path: Path, capsys
) -> None:
    """The "SIGMMA check" dock runs the same check in a worker: the same findings as the
    CLI, each problem an error notification naming the file, the viewer still usable."""
    pytest.importorskip("napari")
    from napari.utils.notifications import notification_manager

    ps = shutil.copytree(synthetic_small, tmp_path / "ps")
    exp = ps / "experiment.xenium"
    spec = json.loads(exp.read_text())
    spec["pixel_size"] = 1e6
    exp.write_text(json.dumps(spec))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 2.5\nmodel:\n  embed_dim: -3\n")

    viewer = make_napari_viewer()
    viewer.open(str(synthetic_small), plugin="napari-sigmma")
    _, widget = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA check")
    assert widget.path.text() == str(synthetic_small)  # starts at the open data

    widget.check()  # the open data: clean
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert widget.findings == [] and widget.verdict.text().endswith("OK")

    for bad in (ps, cfg):
        before = len(notification_manager.records)
        widget.check(str(bad))
        qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
        capsys.readouterr()  # napari echoes its notifications to stdout: not the CLI's
        code, out = _check(bad, capsys)
        assert code == 2
        assert widget.report.toPlainText().strip() == out.strip().rsplit("\n", 1)[0].strip()
        problems = [f for f in widget.findings if not f.note]
        assert problems and widget.verdict.text().endswith(f"{len(problems)} problem(s)")
        said = [str(n.message) for n in notification_manager.records[before:]]
        for f in problems:
            line = f"napari-sigmma check: {f.path}: {f.problem}"
            assert line in said and "\n" not in line, said
    # the viewer goes on: the data layers are there and another layer can be added
    n = len(viewer.layers)
    viewer.add_points([[0.0, 0.0]], name="after-check")
    assert len(viewer.layers) == n + 1
