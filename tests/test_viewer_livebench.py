"""``napari-sigmma bench`` end to end on a small view (a smoke test of the measurement, not
a timed test: no figure is compared with its target here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("napari")


def test_live_bench_runs_and_reports_every_figure(sigmma_cache: Path, tmp_path: Path) -> None:
    from napari_sigmma.bench.live import format_report, run_bench

    r = run_bench(tmp_path, cache_dir=sigmma_cache, device="cpu", view_tiles=2.0)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(r))
    assert r["tiles"] > 0 and r["pipeline_tiles_per_s"] > 0 and r["bare_encoder_tiles_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["pipeline_tiles_per_s"] / r["bare_encoder_tiles_per_s"])
    assert r["engine_alone_tiles_per_s"] > 0 and r["engine_alone_ratio"] > 0
    assert r["prepare_serial_s"] > 0 and r["bare_encoder_seconds"] > 0
    assert r["stall_max_ms"] >= r["stall_p99_ms"] > 0 and r["revisit_ms"] > 0
    for key in ("browse_stall_napari_alone", "browse_stall_cached_overlays"):
        b = r[key]
        assert b["moves"] > 0 and b["max_ms"] >= b["p99_ms"] > 0
    assert r["paints"] > 0 and r["peak_rss_mb"] > 100
    text = format_report(r)
    for needle in ("(1) throughput", "(2) event-loop stall", "(3) revisit", "(4) peak RSS",
                   "no viewer", "napari alone"):  # fmt: skip
        assert needle in text
