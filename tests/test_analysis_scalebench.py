"""``analysis.scalebench`` on small sizes: real index, real pyramidal TIFF, real reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from napari_sigmma.bench.scale import (
    camera_walk,
    retrieval_scale,
    run_scale_bench,
    slide_memory,
)


def test_retrieval_scale_small() -> None:
    r = retrieval_scale(20_000, 32, n_queries=10)
    assert r["n_embeddings"] == 20_000 and r["n_queries"] == 10
    assert 0 < r["median_ms"] <= r["p99_ms"]


def test_run_scale_bench_small(tmp_path: Path) -> None:
    # the viewer walk runs in a child process with a shown napari viewer (Xvfb here)
    res = run_scale_bench(
        tmp_path, n_embeddings=5_000, slide_px=3000, n_regions=40, n_events=6, embed_tiles=()
    )
    saved = json.loads((tmp_path / "scale_bench.json").read_text())
    assert saved == res
    m = res["slide_memory"]
    assert m["levels"] >= 3 and sum(m["regions_per_level"]) == 40
    assert m["peak_rss_mb"] >= m["rss_after_open_mb"] > 0
    v = res["slide_view"]
    assert v["slide"] == m["slide"] and v["slide_px"] == [3000, 3000]
    assert v["n_events"] == 6 and v["timeouts"] == 0 and v["lazy"] == "dask"
    assert sum(v["events_per_level"].values()) == 6
    assert v["peak_rss_mb"] >= v["rss_max_sampled_mb"] >= v["rss_after_open_mb"]
    assert v["rss_after_open_mb"] > v["rss_start_mb"] > 0
    assert 0 < v["median_ms"] <= v["p95_ms"]
    # an existing slide is measured as given (nothing written)
    again = slide_memory(tmp_path / "unused", n_regions=5, path=m["slide"])
    assert again["slide"] == m["slide"] and again["slide_px"] == 3000
    assert not (tmp_path / "unused").exists()


def test_camera_walk_covers_the_slide() -> None:
    shape, mpp, canvas = (100_000, 80_000), 0.25, (1200, 900)
    walk = camera_walk(shape, mpp, canvas, 1000, seed=0)
    assert walk == camera_walk(shape, mpp, canvas, 1000, seed=0)
    assert walk != camera_walk(shape, mpp, canvas, 1000, seed=1)
    ys = np.array([e["center"][0] for e in walk])
    xs = np.array([e["center"][1] for e in walk])
    zooms = np.array([e["zoom"] for e in walk])
    kinds = [e["kind"] for e in walk]
    assert set(kinds) == {"pan", "zoom", "jump", "overview"}
    assert ys.min() >= 0 and ys.max() <= shape[0] * mpp
    assert xs.min() >= 0 and xs.max() <= shape[1] * mpp
    # from the whole slide on the canvas to 2 screen px per level-0 px
    fit = 0.95 * min(canvas[0] / (shape[1] * mpp), canvas[1] / (shape[0] * mpp))
    assert np.isclose(zooms.min(), fit) and zooms.max() <= 2 / mpp + 1e-9
    # level-0 views (zoom >= 2/3 of 1:1) far apart: jumps land all over the slide
    jump = np.array(kinds) == "jump"
    assert jump.sum() > 100 and np.ptp(ys[jump]) > 0.8 * shape[0] * mpp
    assert np.ptp(xs[jump]) > 0.8 * shape[1] * mpp and np.all(zooms[jump] >= 1 / mpp)
