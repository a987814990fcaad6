"""Scale figures for ``napari-sigmma bench --scale`` (issue 8).

Two measurements:

- **Retrieval at scale**: top-10 cosine queries against ``n_embeddings`` (default
  1,000,000) stored 128-d embeddings in :class:`~napari_sigmma.analysis.retrieval.
  EmbeddingIndex` (added as 10 slides), median and p99 latency of 50 queries (after one
  warm-up query, which also concatenates the appended chunks; its time is reported too).
- **Memory of a big slide**: a ``slide_px`` × ``slide_px`` (default 40,000²: 1.6 gigapixel,
  4.8 GB as raw RGB) pyramidal OME-TIFF is written lazily from a tile source
  (:func:`napari_sigmma.io.tiffwrite.write_pyramidal_ome_tiff`, JPEG), then a fresh process
  opens it with :func:`napari_sigmma.io.wsi.open_slide` and reads ``n_regions`` (1,000)
  random 512×512 regions the way a viewer does — a random zoom picks the pyramid level
  (uniform over levels), then a random window of that level — and reports its peak RSS
  (``ru_maxrss``) next to its RSS right after opening. Run in a child process so the
  figure is the reader's alone.

``run_scale_bench(out)`` prints the figures, writes ``<out>/scale_bench.json`` and returns
the dict. Not wired into the CLI here (``analysis.bench`` owns ``napari-sigmma bench``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def retrieval_scale(
    n_embeddings: int = 1_000_000,
    dim: int = 128,
    *,
    n_queries: int = 50,
    k: int = 10,
    n_slides: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-``k`` query latency over ``n_embeddings`` stored embeddings (numpy backend)."""
    from napari_sigmma.analysis.retrieval import EmbeddingIndex

    rng = np.random.default_rng(seed)
    index = EmbeddingIndex(dim, use_faiss=False)
    per = n_embeddings // n_slides
    t0 = time.perf_counter()
    for s in range(n_slides):
        n = per if s < n_slides - 1 else n_embeddings - per * (n_slides - 1)
        emb = rng.standard_normal((n, dim), dtype=np.float32)
        index.add(f"slide{s:02d}", np.arange(n), emb)
    t_add = time.perf_counter() - t0
    queries = rng.standard_normal((n_queries + 1, dim), dtype=np.float32)
    t0 = time.perf_counter()
    first = index.query(queries[0], k=k)
    t_first = time.perf_counter() - t0
    assert len(first) == k
    times = []
    for q in queries[1:]:
        t0 = time.perf_counter()
        hits = index.query(q, k=k)
        times.append(time.perf_counter() - t0)
        assert len(hits) == k
    ms = np.asarray(times) * 1e3
    return {
        "n_embeddings": len(index),
        "dim": dim,
        "k": k,
        "n_queries": n_queries,
        "add_seconds": round(t_add, 3),
        "first_query_ms": round(t_first * 1e3, 2),
        "median_ms": round(float(np.median(ms)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "backend": "faiss" if index._faiss is not None else "numpy",
    }


def _texture_source(seed: int = 0):  # type: ignore[no-untyped-def]
    """A cheap deterministic tile source: a random texture, shifted per tile."""
    rng = np.random.default_rng(seed)
    base = rng.integers(120, 250, size=(1024, 1024, 3), dtype=np.uint8)

    def source(y: int, x: int, h: int, w: int) -> np.ndarray:
        oy, ox = (y * 7 + x * 3) % 512, (x * 5 + y) % 512
        return base[oy : oy + h, ox : ox + w] if h <= 512 and w <= 512 else _tiled(base, h, w)

    return source


def _tiled(base: np.ndarray, h: int, w: int) -> np.ndarray:
    reps = (-(-h // base.shape[0]), -(-w // base.shape[1]), 1)
    return np.tile(base, reps)[:h, :w]


def write_big_slide(path: str | os.PathLike[str], slide_px: int = 40_000) -> dict[str, Any]:
    """Write the synthetic big slide (JPEG, 512-px tiles, 0.25 µm/px); time and size."""
    from napari_sigmma.io.tiffwrite import write_pyramidal_ome_tiff

    path = Path(path)
    t0 = time.perf_counter()
    write_pyramidal_ome_tiff(
        path,
        _texture_source(),
        mpp=0.25,
        tile=512,
        compression="jpeg",
        shape=(slide_px, slide_px, 3),
        dtype=np.uint8,
    )
    return {
        "slide_px": slide_px,
        "write_seconds": round(time.perf_counter() - t0, 1),
        "file_mb": round(path.stat().st_size / 2**20, 1),
    }


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def read_regions(path: str, n_regions: int = 1000, size: int = 512, seed: int = 0) -> dict:
    """Open ``path`` and read ``n_regions`` random regions at viewer-like levels (this
    process's RSS figures; meant to run in a fresh process)."""
    import resource

    from napari_sigmma.io.wsi import open_slide

    slide = open_slide(path)
    rss_open = _rss_mb()
    rng = np.random.default_rng(seed)
    n_levels = len(slide.levels)
    t0 = time.perf_counter()
    per_level = [0] * n_levels
    for _ in range(n_regions):
        level = int(rng.integers(n_levels))
        h, w = slide.level_shape(level)
        x = int(rng.integers(0, max(1, w - size)))
        y = int(rng.integers(0, max(1, h - size)))
        region = slide.read_region(x, y, size, size, level=level)
        assert region.shape == (size, size, 3)
        per_level[level] += 1
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "n_regions": n_regions,
        "region_px": size,
        "levels": n_levels,
        "regions_per_level": per_level,
        "rss_after_open_mb": round(rss_open, 1),
        "peak_rss_mb": round(peak, 1),
        "read_seconds": round(seconds, 2),
        "ms_per_region": round(seconds / n_regions * 1e3, 2),
    }


def slide_memory(
    workdir: str | os.PathLike[str], slide_px: int = 40_000, n_regions: int = 1000
) -> dict[str, Any]:
    """Write the big slide (once; reused when present) and measure reading in a child."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"big_{slide_px}.ome.tif"
    info: dict[str, Any] = {"slide_px": slide_px}
    if not path.is_file():
        info.update(write_big_slide(path, slide_px))
    info["file_mb"] = round(path.stat().st_size / 2**20, 1)
    code = (
        "import json, sys; from napari_sigmma.analysis.scalebench import read_regions; "
        "print(json.dumps(read_regions(sys.argv[1], int(sys.argv[2]))))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(path), str(n_regions)],
        capture_output=True,
        text=True,
        check=True,
    )
    info.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return info


def run_scale_bench(
    out: str | os.PathLike[str],
    *,
    n_embeddings: int = 1_000_000,
    slide_px: int = 40_000,
    n_regions: int = 1000,
) -> dict[str, Any]:
    """Both scale figures; prints them and writes ``<out>/scale_bench.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "retrieval": retrieval_scale(n_embeddings),
        "slide_memory": slide_memory(out / "scale_slide", slide_px, n_regions),
    }
    r, m = result["retrieval"], result["slide_memory"]
    print(
        f"retrieval: top-{r['k']} over {r['n_embeddings']:,} x {r['dim']}-d ({r['backend']}): "
        f"median {r['median_ms']} ms, p99 {r['p99_ms']} ms (first {r['first_query_ms']} ms)"
    )
    print(
        f"big slide {m['slide_px']:,}² px ({m['file_mb']} MB JPEG, {m['levels']} levels): "
        f"{m['n_regions']} random {m['region_px']}-px regions, peak RSS {m['peak_rss_mb']} MB "
        f"(after open {m['rss_after_open_mb']} MB), {m['ms_per_region']} ms/region"
    )
    (out / "scale_bench.json").write_text(json.dumps(result, indent=2))
    return result
