"""``napari-sigmma bench``: the live, cancel, scale and GPU benchmarks."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand to ``sub``."""
    b = sub.add_parser("bench", help="throughput, event-loop stall, cache and memory figures")
    b.add_argument("--scale", action="store_true", help="big-slide memory and retrieval scale")
    b.add_argument(
        "--cancel",
        action="store_true",
        help="cancel latency of load, embed, train, cluster and retrieve (API and widgets)",
    )
    b.add_argument(
        "--gpu",
        action="store_true",
        help="device bench: CPU/device parity, UNI / UNI2-h training throughput, live engine "
        "vs bare forward, DDP, 1M-row retrieval (JSON + summary; exit 1 on any failure)",
    )
    b.add_argument(
        "--device", default="auto", help="with --gpu: auto, cuda, cuda:N or cpu (default auto)"
    )
    b.add_argument(
        "--tiny",
        action="store_true",
        help="with --gpu: ViT-Tiny-sized models, a small slide, 20k retrieval rows (CPU test)",
    )
    b.add_argument(
        "--uni",
        type=Path,
        default=None,
        metavar="PATH",
        help="with --gpu: UNI v1 weights (pytorch_model.bin or its folder) instead of random init",
    )
    b.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="with --gpu: the device's dense bf16 peak when the built-in table lacks it",
    )
    b.add_argument(
        "--sections",
        nargs="+",
        default=None,
        choices=("parity", "training", "live", "ddp", "retrieval", "gui"),
        help="with --gpu: run only these sections",
    )
    b.add_argument("--out", type=Path, default=Path("bench_out"))
    b.add_argument(
        "--slide",
        type=Path,
        default=None,
        help="with --scale: measure this slide (default: write a 40k px synthetic one)",
    )
    b.add_argument(
        "--events",
        type=int,
        default=None,
        help="with --scale: camera events of the viewer walk (default 1000; 0 skips it)",
    )
    b.add_argument(
        "--embed-data",
        type=Path,
        default=None,
        help="with --scale: paired data to stream-embed (default: a synthetic 8,704 px bundle)",
    )
    b.add_argument(
        "--embed-tiles",
        type=int,
        nargs="*",
        default=None,
        help="with --scale: tile counts of the embed figure (default 200 800, or 1000 4000 "
        "with --embed-data; none: skip)",
    )
    b.add_argument(
        "--embeddings",
        type=int,
        default=1_000_000,
        help="with --scale: stored embeddings of the retrieval figure (default 1,000,000)",
    )
    b.add_argument(
        "--retrieval-only",
        action="store_true",
        help="with --scale: only the retrieval figures (faiss IVF, numpy IVF, exact)",
    )
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry of ``napari-sigmma bench``."""
    out = Path(getattr(args, "out", None) or "bench_out")
    if getattr(args, "gpu", False):
        from napari_sigmma.bench.gpu import format_gpu_report, run_gpu_bench

        uni = getattr(args, "uni", None)
        r = run_gpu_bench(
            out,
            device=getattr(args, "device", "auto"),
            tiny=bool(getattr(args, "tiny", False)),
            uni=str(uni) if uni else None,
            peak_tflops=getattr(args, "peak_tflops", None),
            sections=tuple(args.sections) if getattr(args, "sections", None) else None,
        )
        print(format_gpu_report(r))
        print(f"wrote {out / 'gpu_bench.json'}")
        return 0 if r["ok"] else 1
    if getattr(args, "scale", False):
        from napari_sigmma.bench.scale import run_scale_bench

        slide = getattr(args, "slide", None)
        events = getattr(args, "events", None)
        tiles = getattr(args, "embed_tiles", None)
        run_scale_bench(
            out,
            slide=slide,
            n_events=1000 if events is None else int(events),
            embed_data=getattr(args, "embed_data", None),
            embed_tiles=None if tiles is None else tuple(tiles),
            n_embeddings=int(getattr(args, "embeddings", 1_000_000)),
            retrieval_only=bool(getattr(args, "retrieval_only", False)),
        )
        print(f"wrote {out / 'scale_bench.json'}")
        return 0
    if getattr(args, "cancel", False):
        from napari_sigmma.bench.cancel import format_cancel_report, run_cancel_bench

        rc = run_cancel_bench(out)
        print(format_cancel_report(rc))
        print(f"wrote {out / 'cancel_bench.json'}")
        return 0
    from napari_sigmma.bench.live import format_report, run_bench

    r = run_bench(out)
    print(format_report(r))
    print(f"wrote {out / 'bench.json'}")
    return 0
