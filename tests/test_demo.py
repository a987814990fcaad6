"""The README's demo command, headless: it writes non-blank screenshots with the dock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def test_demo_writes_screenshots(tmp_path: Path, embedded_bundle: Path) -> None:
    cache = embedded_bundle.parent  # the sample is cached there; the demo reuses it
    shots = tmp_path / "shots"
    env = dict(os.environ, QT_QPA_PLATFORM="xcb")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_sigmma.cli",
            "demo",
            "--out",
            str(cache),
            "--screenshots",
            str(shots),
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(shots.glob("*.png"))
    names = {p.name for p in pngs}
    # the data view, one per overlay kind, and the training widget mid-run
    assert {
        "01_sample_and_dock.png",
        "02_clusters.png",
        "03_learned_edges.png",
        "04_attention_heads.png",
        "05_gene_maps.png",
        "06_training_widget_mid_run.png",
        "07_retrieval_result.png",
    } <= names, proc.stdout
    from skimage.io import imread

    shots_px = {p.name: imread(p)[..., :3].astype(float) for p in pngs}
    img = shots_px["01_sample_and_dock.png"]
    h, w = img.shape[:2]
    assert w > 800 and h > 500
    assert img.std() > 20  # not a black or blank window
    # the right-hand dock area holds the SIGMMA widget: it is not the canvas's black
    right = img[:, int(0.8 * w) :]
    assert right.mean() > 20
    # each overlay kind changes what the canvas shows
    for name in ("02_clusters.png", "03_learned_edges.png", "04_attention_heads.png"):
        other = shots_px[name]
        assert other.shape == img.shape
        assert other.std() > 20
        assert np.abs(other - shots_px["05_gene_maps.png"]).mean() > 1.0
