"""``napari-sigmma bench --gpu --device cpu --tiny`` in a subprocess that cannot import the
packages a stock GPU image lacks (napari, Qt, SpatialData, scverse, zarr, dask).

The blocker is a ``sitecustomize`` on ``PYTHONPATH`` (so the DDP ranks the bench starts get
it too) installing a meta-path finder that raises ``ModuleNotFoundError`` for those names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
BLOCKED = (
    "napari",
    "qtpy",
    "PyQt5",
    "PyQt6",
    "PySide2",
    "PySide6",
    "spatialdata",
    "spatialdata_io",
    "squidpy",
    "scanpy",
    "anndata",
    "zarr",
    "dask",
)

SITECUSTOMIZE = f'''
import sys

BLOCKED = {BLOCKED!r}


class _Refuse:
    """Meta-path finder: the stock GPU image has none of these packages."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is blocked (stock GPU image test)", name=name)
        return None


sys.meta_path.insert(0, _Refuse())
'''


def _env(hook_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), str(SRC)])
    env.pop("DISPLAY", None)  # no display: the GUI section must say it skipped
    env.pop("WAYLAND_DISPLAY", None)
    return env


@pytest.fixture
def hook_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hook"
    d.mkdir()
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


def test_hook_refuses_the_absent_packages(hook_dir: Path) -> None:
    code = (
        "import importlib\n"
        f"for n in {BLOCKED!r}:\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit('imported ' + n)\n"
        "import numpy, torch  # the rest still imports\n"
        "print('blocked')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=_env(hook_dir), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "blocked" in r.stdout


def test_bench_gpu_tiny_cpu_without_gui_packages(hook_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "napari_sigmma",
        "bench",
        "--gpu",
        "--device",
        "cpu",
        "--tiny",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, env=_env(hook_dir), capture_output=True, text=True, timeout=900)
    js = out / "gpu_bench.json"
    assert js.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(js.read_text())
    assert r.returncode == 0, json.dumps(res, indent=1)[:6000] + r.stderr[-2000:]
    assert "SIGMMA GPU bench" in r.stdout and "PASS" in r.stdout

    assert res["schema"] == "sigmma-bench-gpu/1"
    assert res["ok"] is True and res["failures"] == []
    assert res["device"]["device"] == "cpu"

    # 1. parity: both multi-crop modes, both precisions, every output compared
    par = res["parity"]
    assert par["ok"] and set(par["modes"]) == {"paper", "fast"}
    for per in par["modes"].values():
        assert set(per) == {"float32", "bf16"}
        diff = per["bf16"]["diff"]
        for key in ("image/micro", "image/meso", "image/macro", "graph/macro", "attention"):
            assert key in diff
        assert any(k.startswith("edges/") for k in diff)
        # CPU against CPU in float32 is exact; bf16 autocast is not, but within tolerance
        assert per["float32"]["diff"]["image/macro"]["max_abs"] == 0.0
        assert diff["image/macro"]["max_abs"] > 0.0
        # the graph encoder stays float32 inside bf16 autocast
        assert diff["graph/macro"]["max_abs"] == 0.0

    # 2. training: 2 multi-crop modes × 3 fine-tuning policies, FLOPs counted
    tr = res["training"]
    assert tr["ok"]
    combos = {(c["multicrop"], c["finetune"]) for c in tr["configs"]}
    assert combos == {(m, f) for m in ("paper", "fast") for f in ("frozen", "last_k", "full")}
    for c in tr["configs"]:
        assert c["tiles_per_s"] > 0 and c["tflop_per_step"] > 0 and c["loss_finite"]
    full = {c["multicrop"]: c for c in tr["configs"] if c["finetune"] == "full"}
    frozen = {c["multicrop"]: c for c in tr["configs"] if c["finetune"] == "frozen"}
    assert full["paper"]["trainable_params"] > frozen["paper"]["trainable_params"]
    assert full["paper"]["tflop_per_step"] > frozen["paper"]["tflop_per_step"]
    assert full["paper"]["encoder_inputs_per_step"] == 21 * full["paper"]["batch_tiles"]

    # 3. live engine against the bare forward, with the serial breakdown
    lv = res["live"]
    assert lv["ok"] and lv["ratio"] > 0 and lv["tiles"] >= 3
    assert set(lv["serial_seconds"]) >= {"tile_reads", "graphs", "d2h_and_split", "cache_writes"}

    # 4. DDP (gloo on CPU): cancelled with a checkpoint, resumed to the end
    dd = res["ddp"]
    assert dd["ok"] and dd["backend"] == "gloo" and dd["exit_codes"] == [0]
    assert all(dd["checks"].values())
    assert dd["resume"]["global_step"] == dd["expected_steps"] > dd["first"]["global_step"]

    # 5. retrieval: device top-k equals the CPU index's in float32
    rt = res["retrieval"]
    assert rt["ok"] and rt["n"] == 20_000
    assert rt["device"]["float32"]["recall_at_k_vs_cpu"] >= 0.99

    # 6. no display here: skipped, with the reason
    assert "skipped" in res["gui"]
