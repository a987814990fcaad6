"""Scale figures for ``napari-sigmma bench --scale`` (issue 8).

Two measurements:

- **Retrieval at scale**: top-10 cosine queries against ``n_embeddings`` (default
  1,000,000) stored 128-d embeddings in :class:`~napari_sigmma.retrieval.index.
  EmbeddingIndex` (faiss IVF-Flat; added as 10 slides; its IVF trained explicitly and
  timed) and, side by side on the same data and queries, in the hand-written numpy IVF it
  replaced (:mod:`napari_sigmma.bench.ivf_numpy`), twice: on
  tile-like clustered embeddings (:func:`clustered_embeddings`) and on isotropic Gaussian
  noise (the worst case for an approximate index). 200 fresh queries are timed as default
  (IVF) queries, then again with ``exact=True``, so both latencies and the IVF's recall@10
  against exact search come from the same queries in the same run.
- **Memory of a big slide**: a ``slide_px`` × ``slide_px`` (default 40,000²: 1.6 gigapixel,
  4.8 GB as raw RGB) pyramidal OME-TIFF is written lazily from a tile source
  (:func:`napari_sigmma.samples.tiffwrite.write_pyramidal_ome_tiff`, JPEG), then a fresh process
  opens it with :func:`napari_sigmma.io.wsi.open_slide` and reads ``n_regions`` (1,000)
  random 512×512 regions the way a viewer does — a random zoom picks the pyramid level
  (uniform over levels), then a random window of that level — and reports its peak RSS
  (``VmHWM``) next to its RSS right after opening. Run in a child process so the
  figure is the reader's alone.

- **Viewing a big slide**: a fresh process opens the slide through the plugin's own slide
  reader into a shown napari viewer (1600×1000 window) and replays :func:`camera_walk`,
  ``n_events`` (1,000) seeded pans, zooms, far level-0 jumps and overviews, waiting after
  each until the multiscale layer has sliced the new view and a frame is drawn with it;
  it reports peak RSS (``VmHWM``), RSS after opening and at the end, median / p95 time
  per event until drawn and the pyramid levels shown
  (:mod:`napari_sigmma.bench.scale_qt`; run by :func:`view_memory`).

- **Embedding a big slide**: a fresh process stream-embeds N and then 4N tiles of a paired
  data set with the demo model into a ``.zarr``
  (:func:`~napari_sigmma.embed.stream.embed_slide_streaming`), sampling its RSS
  while it embeds; the RSS growth of the two runs, their ratio, and what the embeddings
  alone would hold in memory (:func:`embed_memory`).

``run_scale_bench(out)`` prints the figures, writes ``<out>/scale_bench.json`` and returns
the dict; ``napari-sigmma bench --scale [--slide PATH] [--events N]`` runs it
(``analysis.bench`` owns the command).
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

from napari_sigmma.bench.host import peak_rss_mb, rss_mb, run_module_json


def clustered_embeddings(
    n: int,
    dim: int = 128,
    *,
    n_clusters: int = 2000,
    n_types: int = 32,
    spread: float = 0.3,
    noise: float = 0.45,
    seed: int = 0,
    draw: int = 0,
) -> np.ndarray:
    """``n`` tile-embedding-like vectors: a mixture of ``n_clusters`` Gaussian clusters on
    the unit sphere.

    ``n_types`` random unit "tissue type" directions; each cluster centre is a type plus
    isotropic noise of norm ≈ ``spread`` (so the clusters of one type overlap), normalised;
    cluster sizes are log-normal (a few big, many small); a point is its centre plus
    isotropic noise of norm ≈ ``noise``. With the defaults at 1,000,000 × 128 the median
    cosine of a query's 10th nearest neighbour is ≈ 0.87 (1st: ≈ 0.88). The mixture
    depends on ``seed`` only and ``draw`` picks the sample, so ``draw=1`` gives fresh
    queries from the mixture of ``draw=0``.
    """
    return _Mixture(dim, n_clusters, n_types, spread, noise, seed).draw(n, draw)


_MIXTURE = (2000, 32, 0.3, 0.45)  # n_clusters, n_types, spread, noise


class _Mixture:
    def __init__(
        self, dim: int, n_clusters: int, n_types: int, spread: float, noise: float, seed: int
    ) -> None:
        rng = np.random.default_rng([seed, 1])
        types = rng.standard_normal((n_types, dim), dtype=np.float32)
        types /= np.linalg.norm(types, axis=1, keepdims=True)
        cent = types[rng.integers(n_types, size=n_clusters)]
        cent = cent + spread / np.sqrt(dim) * rng.standard_normal((n_clusters, dim), np.float32)
        self.centres = cent / np.linalg.norm(cent, axis=1, keepdims=True)
        w = rng.lognormal(0.0, 1.0, n_clusters)
        self.weights = w / w.sum()
        self.noise = float(noise)

    def draw(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 2])
        lab = rng.choice(self.centres.shape[0], n, p=self.weights)
        dim = self.centres.shape[1]
        out = rng.standard_normal((n, dim), dtype=np.float32)
        out *= self.noise / np.sqrt(dim)
        out += self.centres[lab]
        return out


def retrieval_scale(
    n_embeddings: int = 1_000_000,
    dim: int = 128,
    *,
    data: str = "clustered",
    n_queries: int = 200,
    k: int = 10,
    n_slides: int = 10,
    seed: int = 0,
    ivf_min_size: int | None = None,
    compare_numpy: bool = True,
) -> dict[str, Any]:
    """Top-``k`` query latency and recall over ``n_embeddings`` stored embeddings, for the
    retrieval index (faiss IVF-Flat) and, side by side on the same data and queries, the
    hand-written numpy IVF it replaced (:mod:`napari_sigmma.bench.ivf_numpy`).

    Parameters
    ----------
    data
        ``"clustered"``: :func:`clustered_embeddings` (tile-like; queries are fresh draws of
        the same mixture); ``"gaussian"``: isotropic Gaussian noise for both (no structure:
        the worst case for any approximate index).
    ivf_min_size
        Passed to :class:`~napari_sigmma.retrieval.index.EmbeddingIndex` (``None``: its
        default).
    compare_numpy
        Also measure the numpy IVF (``"numpy_ivf"`` in the result).

    Returns
    -------
    dict
        For the faiss index: ``median_ms``/``p99_ms``: default queries (the IVF when the
        index is big enough); ``exact_median_ms``/``exact_p99_ms``: ``exact=True`` on the
        same queries (numpy; a second pass); ``recall_at_k``: mean overlap of the two
        top-``k`` sets; ``build_seconds`` (IVF training and adding), ``add_seconds``,
        ``n_lists``, ``nprobe``, and the median cosine of the exact 1st and ``k``-th match
        (how tight the data is). ``"numpy_ivf"``: the same figures of the numpy IVF (its
        recall against the same exact top-``k``).
    """
    from napari_sigmma.bench.ivf_numpy import NumpyIVFIndex
    from napari_sigmma.retrieval.index import IVF_MIN_SIZE, EmbeddingIndex

    if data not in ("clustered", "gaussian"):
        raise ValueError(f"data must be 'clustered' or 'gaussian', not {data!r}")
    mix = _Mixture(dim, *_MIXTURE, seed) if data == "clustered" else None

    def draw(n: int, part: int) -> np.ndarray:
        if mix is not None:
            return mix.draw(n, part)
        return np.random.default_rng([seed, part]).standard_normal((n, dim), dtype=np.float32)

    min_size = IVF_MIN_SIZE if ivf_min_size is None else ivf_min_size
    queries = draw(n_queries + 1, 999)
    per = n_embeddings // n_slides

    def measure(make: Any, truths: list | None) -> tuple[dict[str, Any], list]:
        index = make(dim, use_faiss=False, ivf_min_size=min_size, seed=seed)
        t_add = 0.0
        for s in range(n_slides):
            n = per if s < n_slides - 1 else n_embeddings - per * (n_slides - 1)
            emb = draw(n, s)
            t0 = time.perf_counter()
            index.add(f"slide{s:02d}", np.arange(n), emb)
            t_add += time.perf_counter() - t0
            del emb
        build = index.build_ivf() if len(index) >= min_size else 0.0
        index.query(queries[0], k=k)  # warm-up (concatenates the appended chunks when exact)
        index.query(queries[0], k=k, exact=True)
        # two passes over the same queries (a pass per mode, as a user's stream of queries
        # would be: interleaving them would let each exact scan evict the IVF's lists)
        t_ivf, t_exact, found = [], [], []
        for q in queries[1:]:
            t0 = time.perf_counter()
            found.append(index.query(q, k=k))
            t_ivf.append(time.perf_counter() - t0)
        if truths is None:
            truths = []
            for q in queries[1:]:
                t0 = time.perf_counter()
                truths.append(index.query(q, k=k, exact=True))
                t_exact.append(time.perf_counter() - t0)
        assert all(len(h) == k for h in found) and all(len(t) == k for t in truths)
        recall = [
            len({h[:2] for h in hits} & {h[:2] for h in truth}) / k
            for hits, truth in zip(found, truths, strict=True)
        ]
        ms = np.asarray(t_ivf) * 1e3
        out = {
            "backend": "ivf" if index.is_ivf else "exact",
            "n_embeddings": len(index),
            "n_lists": index.ivf_lists,
            "nprobe": index.effective_nprobe if index.is_ivf else 0,
            "add_seconds": round(t_add, 3),
            "build_seconds": round(build, 2),
            "median_ms": round(float(np.median(ms)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "recall_at_k": round(float(np.mean(recall)), 4),
            "recall_min": round(float(np.min(recall)), 2),
        }
        if t_exact:
            exact_ms = np.asarray(t_exact) * 1e3
            out["exact_median_ms"] = round(float(np.median(exact_ms)), 2)
            out["exact_p99_ms"] = round(float(np.percentile(exact_ms, 99)), 2)
        del index
        return out, truths

    result, truths = measure(EmbeddingIndex, None)
    top1 = [truth[0][2] for truth in truths]
    topk = [truth[-1][2] for truth in truths]
    result = {"data": data, "dim": dim, "k": k, "n_queries": n_queries, **result}
    result["top1_cos_median"] = round(float(np.median(top1)), 3)
    result["topk_cos_median"] = round(float(np.median(topk)), 3)
    if compare_numpy:
        result["numpy_ivf"], _ = measure(NumpyIVFIndex, truths)
    result["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return result


def _retrieval_line(r: dict[str, Any]) -> str:
    head = f"retrieval [{r['data']}] top-{r['k']} over {r['n_embeddings']:,} x {r['dim']}-d"
    if r["backend"] != "ivf":
        return f"{head} (exact): median {r['median_ms']} ms, p99 {r['p99_ms']} ms"
    line = (
        f"{head}: faiss IVF ({r['n_lists']} lists, nprobe {r['nprobe']}, built in "
        f"{r['build_seconds']} s) median {r['median_ms']} ms, p99 {r['p99_ms']} ms, "
        f"recall@{r['k']} {r['recall_at_k']:.3f} (min {r['recall_min']})"
    )
    o = r.get("numpy_ivf")
    if o is not None and o["backend"] == "ivf":
        line += (
            f"; numpy IVF ({o['n_lists']} lists, nprobe {o['nprobe']}, built in "
            f"{o['build_seconds']} s) median {o['median_ms']} ms, p99 {o['p99_ms']} ms, "
            f"recall@{r['k']} {o['recall_at_k']:.3f} (min {o['recall_min']})"
        )
    return line + (
        f"; exact (numpy) median {r['exact_median_ms']} ms, p99 {r['exact_p99_ms']} ms; "
        f"recall vs exact over {r['n_queries']} queries; exact top-1/top-{r['k']} cosine "
        f"{r['top1_cos_median']}/{r['topk_cos_median']}; load {r['load_avg_1min']}"
    )


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
    from napari_sigmma.samples.tiffwrite import write_pyramidal_ome_tiff

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


#: Probabilities of the camera moves of :func:`camera_walk`.
_MOVES = (("pan", 0.5), ("zoom", 0.25), ("jump", 0.15), ("overview", 0.10))


def camera_walk(
    shape_px: tuple[int, int],
    mpp: float,
    canvas_px: tuple[int, int],
    n_events: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """A seeded random walk of camera moves over a slide, in napari camera terms.

    Each event is ``{"kind", "center": (y_um, x_um), "zoom"}`` where ``zoom`` is screen
    pixels per µm (napari's ``camera.zoom`` when the layer is scaled to µm). The moves:

    - ``pan`` (50 %): shift by 0.3–1.5 view widths in a random direction;
    - ``zoom`` (25 %): change the zoom by 2^U(-2, 2) about the current centre;
    - ``jump`` (15 %): a random place anywhere on the slide at level-0 zoom (one level-0
      pixel per 1–2/3 screen pixels), so level-0 views far apart are visited;
    - ``overview`` (10 %): the whole slide fitted to the canvas.

    Zooms stay between the overview and 2 screen pixels per level-0 pixel; centres stay
    on the slide. The walk starts from the overview.

    Parameters
    ----------
    shape_px
        ``(H, W)`` of level 0.
    mpp
        µm per level-0 pixel.
    canvas_px
        ``(width, height)`` of the canvas in screen pixels.
    n_events
        Number of moves.
    seed
        Random seed.
    """
    rng = np.random.default_rng(seed)
    h_um, w_um = shape_px[0] * mpp, shape_px[1] * mpp
    cw, ch = canvas_px
    fit = 0.95 * min(cw / w_um, ch / h_um)
    level0 = 1.0 / mpp  # one screen pixel per level-0 pixel
    lo, hi = np.log2(fit), np.log2(2.0 * level0)
    kinds = [k for k, _ in _MOVES]
    probs = np.array([p for _, p in _MOVES])
    cy, cx, lz = h_um / 2, w_um / 2, lo
    events: list[dict[str, Any]] = []
    for _ in range(n_events):
        kind = str(rng.choice(kinds, p=probs / probs.sum()))
        if kind == "pan":
            view_w = cw / 2.0**lz
            angle = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.3, 1.5) * view_w
            cy, cx = cy + dist * np.sin(angle), cx + dist * np.cos(angle)
        elif kind == "zoom":
            lz = float(np.clip(lz + rng.uniform(-2.0, 2.0), lo, hi))
        elif kind == "jump":
            cy, cx = rng.uniform(0, h_um), rng.uniform(0, w_um)
            lz = float(np.log2(level0 * rng.uniform(1.0, 1.5)))
        else:
            cy, cx, lz = h_um / 2, w_um / 2, lo
        cy, cx = float(np.clip(cy, 0, h_um)), float(np.clip(cx, 0, w_um))
        events.append({"kind": kind, "center": (cy, cx), "zoom": float(2.0**lz)})
    return events


def read_regions(path: str, n_regions: int = 1000, size: int = 512, seed: int = 0) -> dict:
    """Open ``path`` and read ``n_regions`` random regions at viewer-like levels (this
    process's RSS figures; meant to run in a fresh process)."""
    from napari_sigmma.io.wsi import open_slide

    slide = open_slide(path)
    rss_open = rss_mb()
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
    peak = peak_rss_mb()
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
    workdir: str | os.PathLike[str],
    slide_px: int = 40_000,
    n_regions: int = 1000,
    *,
    path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write the big slide (once; reused when present) and measure reading in a child.

    With ``path``, that existing slide is read instead (nothing is written).
    """
    info: dict[str, Any] = {}
    if path is None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = big_slide_path(workdir, slide_px)
        info["slide_px"] = slide_px
        if not path.is_file():
            info.update(write_big_slide(path, slide_px))
    path = Path(path)
    info["slide"] = str(path)
    info["file_mb"] = round(path.stat().st_size / 2**20, 1)
    info.update(
        run_module_json(
            "napari_sigmma.bench.scale", "read_regions", path, int(n_regions), what="read child"
        )
    )
    if "slide_px" not in info:
        from napari_sigmma.io.wsi import open_slide

        with open_slide(path) as slide:
            info["slide_px"] = max(slide.shape)
    return info


def _sample_rss(stop: Any, out: list[float], every: float = 0.05) -> None:
    """Record this process's RSS (MB) every ``every`` s until ``stop`` is set."""
    while not stop.wait(every):
        out.append(rss_mb())


def stream_embed_figures(data: str, checkpoint: str, n_tiles: int, out: str) -> dict[str, Any]:
    """Stream-embed the ``n_tiles`` tiles nearest the cells' centre of ``data`` into ``out``
    and report this process's memory (meant to run in a fresh process).

    RSS is sampled every 50 ms while embedding, so the figure is the embed's own and not
    the load's (``VmHWM`` would also hold the peak of reading the bundle). Two phases: the
    set-up (layout, the store's skeleton — ids and geometry of the tiles and cells — and
    the slide's node features, up to the first batch written) and the batch loop, whose
    growth is what streaming bounds.
    """
    import threading

    from napari_sigmma.embed.stream import embed_slide_streaming
    from napari_sigmma.io import load_any
    from napari_sigmma.tiles.grid import make_tile_grid
    from napari_sigmma.tiles.paired import PairedSlide
    from napari_sigmma.train.checkpoint import (
        graph_settings,
        load_checkpoint,
        model_from_checkpoint,
    )
    from napari_sigmma.train.config import TrainConfig

    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(dict(ckpt["config"]), path=Path(checkpoint))
    model, featurizer = model_from_checkpoint(ckpt, path=Path(checkpoint))
    model.to("cpu").eval()
    paired = PairedSlide.from_sdata(load_any(data), name=Path(data).name)
    grid = make_tile_grid(
        paired, tile_px=cfg.tile_px, target_mpp=cfg.target_mpp, min_tissue=cfg.min_tissue
    )
    b = grid.bounds
    centre = np.median(paired.cells_px, axis=0) if paired.n_cells else b[:, :2].mean(axis=0)
    dist = np.hypot((b[:, 0] + b[:, 2]) / 2 - centre[0], (b[:, 1] + b[:, 3]) / 2 - centre[1])
    idx = np.sort(np.argsort(dist, kind="stable")[: min(int(n_tiles), len(grid))])
    load_s = time.perf_counter() - t0
    rss_before = rss_mb()
    samples: list[float] = []
    first_batch: list[int] = []  # len(samples) when the first batch was written

    trace: list[tuple[int, float]] = []  # (tiles done, RSS MB) after every batch

    def progress(done: int, total: int) -> None:
        rss = rss_mb()
        trace.append((done, rss))
        if not first_batch:
            first_batch.append(len(samples))
            samples.append(rss)

    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(stop, samples), daemon=True)
    sampler.start()
    t1 = time.perf_counter()
    try:
        res = embed_slide_streaming(
            model, paired, grid, out, featurizer=featurizer if paired.n_cells else None,
            settings=graph_settings(cfg), indices=idx, batch_size=8, device="cpu",
            overwrite=True, progress=progress,
        )  # fmt: skip
    finally:
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - t1
    samples.append(rss_mb())
    k = first_batch[0] if first_batch else 0
    setup_peak = max(samples[: k + 1])
    loop_peak = max(samples[k:])
    store_mb = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 2**20
    return {
        "n_tiles": res.n_tiles,
        "grid_tiles": len(grid),
        "slide_cells": paired.n_cells,
        "cells_embedded": res.n_cells,
        "tiles_with_st": res.n_valid,
        "embed_dim": int(getattr(model.cfg, "embed_dim", 0)),
        "load_seconds": round(load_s, 1),
        "embed_seconds": round(seconds, 1),
        "tiles_per_s": round(res.n_tiles / max(seconds, 1e-9), 2),
        "rss_before_embed_mb": round(rss_before, 1),
        "peak_rss_embed_mb": round(max(samples), 1),
        "embed_growth_mb": round(max(samples) - rss_before, 1),
        "setup_growth_mb": round(setup_peak - rss_before, 1),
        "rss_first_batch_mb": round(samples[k], 1),
        "loop_growth_mb": round(loop_peak - samples[k], 1),
        "loop_slope_mb_per_1000_tiles": round(_late_slope(trace) * 1000, 2),
        "store_mb": round(store_mb, 1),
    }


def _late_slope(trace: list[tuple[int, float]]) -> float:
    """Least-squares MB per tile of RSS over the second half of the batch loop (after the
    allocator has warmed up): about 0 when nothing is held per tile."""
    if len(trace) < 4:
        return 0.0
    late = np.asarray(trace[len(trace) // 2 :], dtype=np.float64)
    if np.ptp(late[:, 0]) == 0:
        return 0.0
    return float(np.polyfit(late[:, 0], late[:, 1], 1)[0])


def embed_memory(
    data: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    workdir: str | os.PathLike[str],
    n_tiles: tuple[int, ...] = (1000, 4000),
) -> dict[str, Any]:
    """:func:`stream_embed_figures` for each of ``n_tiles``, each in a fresh process.

    If streaming holds nothing per tile, the batch loop's RSS growth is the same for N and
    4N tiles; the in-memory path would add ``n_tiles × 6 × D`` float32 for the tiles plus
    ``3 × D`` per cell (reported beside it). The set-up's growth (ids and geometry of the
    tables, written once before the first batch) is reported apart.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in n_tiles:
        args = ("stream_embed_figures", data, checkpoint, int(n), workdir / f"embed_{int(n)}.zarr")
        runs.append(run_module_json("napari_sigmma.bench.scale", *args, what="embed benchmark"))
    first, last = runs[0], runs[-1]
    dim = first["embed_dim"]
    held = {
        r["n_tiles"]: round((r["n_tiles"] * 6 + r["cells_embedded"] * 3) * dim * 4 / 2**20, 1)
        for r in runs
    }
    return {
        "data": str(data),
        "runs": runs,
        "tiles_ratio": round(last["n_tiles"] / max(first["n_tiles"], 1), 2),
        "loop_growth_mb": [r["loop_growth_mb"] for r in runs],
        "setup_growth_mb": [r["setup_growth_mb"] for r in runs],
        "in_memory_would_hold_mb": held,
    }


def format_embed(e: dict[str, Any]) -> str:
    """The figures of :func:`embed_memory` as text."""
    lines = [f"streaming embed of {e['data']}:"]
    for r in e["runs"]:
        lines.append(
            f"  {r['n_tiles']:,} of {r['grid_tiles']:,} tiles ({r['cells_embedded']:,} cells, "
            f"{r['tiles_per_s']} tiles/s): RSS {r['rss_before_embed_mb']} MB before; set-up "
            f"(layout, ids and geometry, node features) +{r['setup_growth_mb']} MB; batch loop "
            f"+{r['loop_growth_mb']} MB, RSS slope over its second half "
            f"{r['loop_slope_mb_per_1000_tiles']} MB per 1,000 tiles; store {r['store_mb']} MB; "
            f"held in memory the embeddings would be "
            f"{e['in_memory_would_hold_mb'][r['n_tiles']]} MB"
        )
    per_1000 = {n: round(mb / n * 1000, 1) for n, mb in e["in_memory_would_hold_mb"].items()}
    lines.append(
        f"  batch-loop growth for {e['tiles_ratio']}x the tiles: "
        + " → ".join(f"{g} MB" for g in e["loop_growth_mb"])
        + "; held in memory the embeddings would grow by "
        + " / ".join(f"{v} MB" for v in per_1000.values())
        + " per 1,000 tiles"
    )
    return "\n".join(lines)


def big_slide_path(workdir: str | os.PathLike[str], slide_px: int) -> Path:
    """Where :func:`slide_memory` writes (and reuses) the big slide in ``workdir``."""
    return Path(workdir) / f"big_{slide_px}.ome.tif"


def view_memory(
    path: str | os.PathLike[str],
    n_events: int = 1000,
    *,
    seed: int = 0,
    window: tuple[int, int] = (1600, 1000),
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """View ``path`` in a shown napari viewer in a fresh process and walk the camera.

    Runs ``python -m napari_sigmma.bench.scale_qt`` (see
    :func:`napari_sigmma.bench.scale_qt.view_slide_bench` for the figures returned).
    Without a display (headless Linux) an Xvfb server is started for the child.
    """
    from napari_sigmma.bench.host import ensure_display

    xvfb = ensure_display(screen=f"{window[0]}x{window[1] + 200}x24")
    try:
        env = dict(os.environ)
        if sys.platform == "linux":
            env.setdefault("QT_QPA_PLATFORM", "xcb")
        cmd = [
            sys.executable,
            "-m",
            "napari_sigmma.bench.scale_qt",
            str(path),
            "--events",
            str(int(n_events)),
            "--seed",
            str(int(seed)),
            "--window",
            str(int(window[0])),
            str(int(window[1])),
        ]
        res = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False
        )
    finally:
        if xvfb is not None:
            xvfb.terminate()
    if res.returncode != 0:
        raise RuntimeError(
            f"the viewer benchmark failed (exit {res.returncode}):\n{res.stderr[-3000:]}"
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_scale_bench(
    out: str | os.PathLike[str],
    *,
    n_embeddings: int = 1_000_000,
    slide_px: int = 40_000,
    n_regions: int = 1000,
    slide: str | os.PathLike[str] | None = None,
    n_events: int = 1000,
    seed: int = 0,
    embed_data: str | os.PathLike[str] | None = None,
    embed_tiles: tuple[int, ...] | None = None,
    retrieval_only: bool = False,
) -> dict[str, Any]:
    """The scale figures; prints them and writes ``<out>/scale_bench.json``.

    Parameters
    ----------
    out
        Output folder (the big slide is written to ``<out>/scale_slide/`` unless ``slide``).
    n_embeddings
        Stored embeddings of the retrieval figure.
    slide_px
        Side of the synthetic big slide written when no ``slide`` is given.
    n_regions
        Random regions read by the reader-memory figure.
    slide
        An existing slide to measure instead of writing one.
    n_events
        Camera events of the viewer figure (0: skip it).
    seed
        Seed of the camera walk.
    embed_data
        A paired data set (Xenium bundle, …) to stream-embed with the demo model
        (default: a synthetic 8,704 px bundle written to ``<out>/scale_embed/``).
    embed_tiles
        Tile counts of the embed figure (default ``(200, 800)`` on the default bundle,
        ``(1000, 4000)`` on a given one; empty: skip it).
    retrieval_only
        Measure the retrieval figures only.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    for key, data in (("retrieval", "clustered"), ("retrieval_gaussian", "gaussian")):
        result[key] = retrieval_scale(n_embeddings, data=data)
        print(_retrieval_line(result[key]), flush=True)
    if retrieval_only:
        (out / "scale_bench.json").write_text(json.dumps(result, indent=2))
        return result
    result["slide_memory"] = slide_memory(out / "scale_slide", slide_px, n_regions, path=slide)
    m = result["slide_memory"]
    print(
        f"big slide {m['slide_px']:,}² px ({m['file_mb']} MB, {m['levels']} levels): "
        f"{m['n_regions']} random {m['region_px']}-px regions, peak RSS {m['peak_rss_mb']} MB "
        f"(after open {m['rss_after_open_mb']} MB), {m['ms_per_region']} ms/region"
    )
    if n_events > 0:
        v = view_memory(m["slide"], n_events, seed=seed)
        result["slide_view"] = v
        print(format_view(v))
    if embed_tiles is None:
        embed_tiles = (200, 800) if embed_data is None else (1000, 4000)
    if embed_tiles:
        from napari_sigmma.demo.model import demo_model

        if embed_data is None:
            from napari_sigmma.samples.synthetic import write_synthetic_sample

            embed_data = out / "scale_embed" / "synthetic_8704"
            if not (Path(embed_data) / "experiment.xenium").is_file():
                write_synthetic_sample(embed_data, size=8704, seed=0)
        e = embed_memory(embed_data, demo_model(), out / "scale_embed", tuple(embed_tiles))
        result["embed_memory"] = e
        print(format_embed(e))
    (out / "scale_bench.json").write_text(json.dumps(result, indent=2))
    return result


def format_view(v: dict[str, Any]) -> str:
    """The viewer figures of :func:`view_memory` as text."""
    h, w = v["slide_px"]
    levels = ", ".join(f"L{k}: {n}" for k, n in v["events_per_level"].items())
    moves = ", ".join(f"{n} {k}" for k, n in v["moves"].items())
    return (
        f"napari viewer on {w:,} x {h:,} px ({v['levels']} levels, lazy {v['lazy']}), canvas "
        f"{v['canvas_px'][0]}x{v['canvas_px'][1]}: {v['n_events']} camera events ({moves}); "
        f"peak RSS {v['peak_rss_mb']} MB (after open {v['rss_after_open_mb']} MB, at end "
        f"{v['rss_end_mb']} MB; dask cache bound {v['dask_cache_mb']} MB); per event until "
        f"drawn: median {v['median_ms']} ms, p95 {v['p95_ms']} ms; levels shown: {levels}"
        + (f"; {v['timeouts']} TIMEOUTS" if v["timeouts"] else "")
    )


if __name__ == "__main__":  # the fresh-process figures (see run_module_json)
    _figure, *_args = sys.argv[1:]
    if _figure == "read_regions":
        print(json.dumps(read_regions(_args[0], int(_args[1]))))
    elif _figure == "stream_embed_figures":
        print(json.dumps(stream_embed_figures(_args[0], _args[1], int(_args[2]), _args[3])))
    else:
        raise SystemExit(f"unknown figure {_figure!r}")
