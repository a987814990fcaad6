"""The house rules, checked: the import-layer contract (import-linter, as `./run lint` runs
it), the manifest's entry points, and one cache folder per slide whatever widget opens it."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _copy_package(tmp_path: Path) -> Path:
    """The package and its contract in a fresh folder, found first on the path there."""
    shutil.copytree(
        ROOT / "src" / "napari_sigmma",
        tmp_path / "src" / "napari_sigmma",
        ignore=shutil.ignore_patterns("__pycache__"),
        symlinks=True,
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path / "src"


def test_import_contract_holds() -> None:
    proc = _lint_imports(ROOT, ROOT / "src")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "broken" in proc.stdout and "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # an upward import: a reader reaching up to the viewer
        ("io/wsi.py", "from napari_sigmma.viewer import layers  # noqa", "floors"),
        # napari below viewer/, even inside a function
        ("tiles/grid.py", "def _bad():\n    import napari  # noqa\n", "no napari or Qt"),
        # a sideways import between independent rooms
        ("retrieval/index.py", "from napari_sigmma.evaluation import probe  # noqa", "floors"),
        # a circle inside a room (run imports results, results would import run)
        ("evaluation/results.py", "from napari_sigmma.evaluation import run  # noqa", "circles"),
    ],
)
def test_import_contract_fails_on_a_breaking_import(tmp_path, module, line, contract) -> None:
    src = _copy_package(tmp_path)
    target = src / "napari_sigmma" / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    proc = _lint_imports(tmp_path, src)
    assert proc.returncode != 0, proc.stdout[-3000:]
    broken = [ln for ln in proc.stdout.splitlines() if ln.rstrip().endswith("BROKEN")]
    assert any(contract in ln for ln in broken), proc.stdout[-3000:]


def test_every_manifest_python_name_imports() -> None:
    manifest = yaml.safe_load((ROOT / "napari.yaml").read_text())
    names = [c["python_name"] for c in manifest["contributions"]["commands"]]
    assert names
    for name in names:
        module, attr = name.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_one_zarr_slide_gets_one_cache_folder_in_live_view_and_retrieval(
    embedded_bundle, tmp_path
) -> None:
    """The live view's worker and the retrieval widget's worker name a ``.zarr`` slide by the
    same rule, so they share one disk-cache folder and encode each tile once."""
    from _train_data import tiny_cfg
    from napari_sigmma.io import load_any
    from napari_sigmma.io.store import write_sdata
    from napari_sigmma.train.loop import train
    from napari_sigmma.viewer.dock import _live_steps
    from napari_sigmma.viewer.retrieval import _load_engine

    store = tmp_path / "slide one.zarr"
    write_sdata(load_any(embedded_bundle), store)
    cfg = tiny_cfg(embedded_bundle, tmp_path / "run", tmp_path / "features", epochs=1)
    assert train(cfg).status == "completed"
    ckpt = str(tmp_path / "run")

    import threading

    steps = _live_steps(ckpt, str(store), "cpu", threading.Event())
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        live_engine, _ = stop.value
    _, retrieval_engine = _load_engine(ckpt, str(store), "cpu")

    assert live_engine.disk is not None and retrieval_engine.disk is not None
    assert live_engine.disk.folder == retrieval_engine.disk.folder
    assert live_engine.paired.name == "slide one"


def test_a_run_saved_before_the_method_changes_still_loads(tiny_trained_run, tmp_path) -> None:
    """A checkpoint whose config predates the per-block G_micro and the fast mode's region
    map (its dumps lack those keys) loads as the model it was trained as: the tile-wide
    G_micro and the collapsed fast mode (with its warning)."""
    import torch

    from napari_sigmma.live.run import load_live_run
    from napari_sigmma.train.checkpoint import resolve_checkpoint

    src = resolve_checkpoint(tiny_trained_run.run_dir)
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    cfg = dict(ckpt["config"])
    cfg.pop("graph_micro_blocks")
    model = dict(cfg["model"])
    model.pop("fast_region_map")
    model.pop("candidate_cap")
    cfg["model"] = model
    ckpt["config"] = cfg
    # an old fast-mode model had no region map
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if ".region_map." not in k}
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)

    with pytest.warns(UserWarning, match="SAME image input"):
        run = load_live_run(old)
    assert run.graph_settings.micro_blocks is False
    assert load_live_run(src).graph_settings.micro_blocks is True
