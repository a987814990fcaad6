"""Foundation: the package installs as a napari plugin, the CLI answers, devices resolve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from napari_sigmma.cli import build_parser, main
from napari_sigmma.device import autocast, resolve_device
from napari_sigmma.errors import SigmmaError

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("sample", "train", "embed", "evaluate", "bench", "demo")


def test_cli_help_lists_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "napari_sigmma.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in SUBCOMMANDS:
        assert name in out


def test_cli_reports_sigmma_errors_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-run" / "best.pt"
    code = main(["embed", "--data", str(tmp_path), "--checkpoint", str(missing), "--out", "o"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert str(missing) in err


def test_parser_has_every_subcommand() -> None:
    parser = build_parser()
    actions = [a for a in parser._subparsers._group_actions if a.dest == "command"]
    assert set(SUBCOMMANDS) <= set(actions[0].choices)


def test_import_is_light() -> None:
    """Importing the package (what napari does for the manifest) must not pull torch/napari."""
    code = (
        "import sys, napari_sigmma, napari_sigmma.cli, napari_sigmma.device;"
        "heavy=[m for m in ('torch','timm','spatialdata','napari','torch_geometric') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_device_auto_and_forced() -> None:
    import torch

    auto = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert auto.type == expected
    assert resolve_device("cpu").type == "cpu"
    with autocast(torch.device("cpu")):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32  # no autocast off CUDA
    with pytest.raises(SigmmaError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SigmmaError, match="CUDA is not available"):
            resolve_device("cuda")


def test_error_names_the_file() -> None:
    err = SigmmaError("not a TIFF", path="/data/slide.svs")
    assert str(err) == "/data/slide.svs: not a TIFF"
    assert err.path == "/data/slide.svs"


def test_manifest_is_valid_and_found() -> None:
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-sigmma")
    assert manifest.display_name == "SIGMMA"
    npe2 = Path(sys.executable).with_name("npe2")
    out = subprocess.run(
        [str(npe2), "validate", "napari-sigmma"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    listed = subprocess.run(
        [str(npe2), "list"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "napari-sigmma" in listed


def test_manifest_ships_in_the_wheel(tmp_path: Path) -> None:
    """The root napari.yaml reaches the built wheel (through the package symlink)."""
    import zipfile

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("napari_sigmma-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_sigmma/napari.yaml" in names
        text = zf.read("napari_sigmma/napari.yaml").decode()
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        eps = zf.read(entry).decode()
    assert text == (ROOT / "napari.yaml").read_text()
    assert "napari-sigmma = napari_sigmma:napari.yaml" in eps


def test_dock_widget_through_the_viewer(make_napari_viewer) -> None:
    from napari_sigmma.viewer.dock import NO_MODEL_TEXT, SigmmaDock

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA")
    assert isinstance(widget, SigmmaDock)
    import numpy as np

    # the injected viewer is the real one (napari may hand a proxy): a layer added
    # through the widget's viewer appears in ours
    widget.viewer.add_points(np.zeros((1, 2)), name="probe")
    assert "probe" in viewer.layers
    assert widget.status.text() == NO_MODEL_TEXT
    widget.set_checkpoint("/runs/demo/checkpoints/best.pt")
    assert "best.pt" in widget.status.text()


def test_torch_geometric_import_after_gl_context_does_not_crash(tmp_path: Path) -> None:
    """Mesa's LLVM (software GL) and triton's LLVM clash: the viewer package blocks triton."""
    script = tmp_path / "gl_then_torch.py"
    script.write_text(
        "import numpy as np, napari\n"
        "v = napari.Viewer(show=False)\n"
        "v.add_image(np.zeros((8, 8)))\n"
        "import napari_sigmma.viewer\n"
        "import torch_geometric, torch._dynamo\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
