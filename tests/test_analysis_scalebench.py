"""``analysis.scalebench`` on small sizes: real index, real pyramidal TIFF, real reader."""

from __future__ import annotations

import json
from pathlib import Path

from napari_sigmma.analysis.scalebench import retrieval_scale, run_scale_bench


def test_retrieval_scale_small() -> None:
    r = retrieval_scale(20_000, 32, n_queries=10)
    assert r["n_embeddings"] == 20_000 and r["n_queries"] == 10
    assert 0 < r["median_ms"] <= r["p99_ms"]


def test_run_scale_bench_small(tmp_path: Path) -> None:
    res = run_scale_bench(tmp_path, n_embeddings=5_000, slide_px=3000, n_regions=40)
    saved = json.loads((tmp_path / "scale_bench.json").read_text())
    assert saved == res
    m = res["slide_memory"]
    assert m["levels"] >= 3 and sum(m["regions_per_level"]) == 40
    assert m["peak_rss_mb"] >= m["rss_after_open_mb"] > 0
