"""Command line: a thin layer over the same functions the widgets and tests call.

Every subcommand imports its heavy machinery lazily, so ``napari-sigmma --help`` is instant.
A :class:`~napari_sigmma.errors.SigmmaError` ends the program with a one-line message and
exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_sigmma.errors import SigmmaError


def _cmd_sample(args: argparse.Namespace) -> int:
    if args.synthetic:
        from napari_sigmma.io.synthetic import write_synthetic_sample

        out = write_synthetic_sample(
            args.out,
            size=args.size,
            seed=args.seed,
            cell_window=args.cell_window,
            render=args.render,
            workers=args.workers,
            progress=(lambda msg: print(msg, flush=True)) if args.verbose else None,
        )
    else:
        from napari_sigmma.io.sample import write_embedded_sample

        out = write_embedded_sample(args.out)
    print(f"wrote Xenium bundle: {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from napari_sigmma.train.cli import run_train

    return run_train(args)


def _cmd_embed(args: argparse.Namespace) -> int:
    from napari_sigmma.train.cli import run_embed

    return run_embed(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_sigmma.analysis.evaluate import run_evaluate_cli

    return run_evaluate_cli(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from napari_sigmma.analysis.bench import run_bench_cli

    return run_bench_cli(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from napari_sigmma.viewer.demo import run_demo

    return run_demo(out=args.out, screenshots=args.screenshots, train_epochs=args.epochs)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with all subcommands."""
    p = argparse.ArgumentParser(
        prog="napari-sigmma",
        description="SIGMMA: multi-scale alignment of H&E slides and Xenium spatial "
        "transcriptomics, with a napari viewer.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("sample", help="write the embedded (or a synthetic) paired sample")
    s.add_argument("--out", type=Path, required=True, help="output folder (Xenium bundle)")
    s.add_argument("--synthetic", action="store_true", help="procedural tissue instead")
    s.add_argument("--size", type=int, default=4096, help="synthetic slide side, pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--cell-window",
        type=int,
        default=16384,
        help="synthetic: side (px) of the centred window that gets cells on larger slides",
    )
    s.add_argument(
        "--render",
        choices=["auto", "exact", "fast"],
        default="auto",
        help="synthetic H&E: exact everywhere, or composed from a tile bank outside the "
        "cell window (fast; auto = fast when there is a window)",
    )
    s.add_argument(
        "--workers", type=int, default=1, help="synthetic: processes rendering H&E tiles"
    )
    s.add_argument("--verbose", action="store_true", help="print progress")
    s.set_defaults(func=_cmd_sample)

    t = sub.add_parser("train", help="train or fine-tune the SIGMMA encoders")
    t.add_argument("--data", type=Path, required=True, help="Xenium / HEST folder or .zarr")
    t.add_argument("--config", type=Path, help="YAML config (CLI flags override it)")
    t.add_argument("--out", type=Path, help="run folder")
    t.add_argument("--epochs", type=int)
    t.add_argument("--backbone", help="uni, uni2-h, vit_small, vit_tiny, efficientnet_lite0, …")
    t.add_argument("--checkpoint", type=Path, help="backbone weights (e.g. UNI pytorch_model.bin)")
    t.add_argument("--finetune", choices=["frozen", "last_k", "full"])
    t.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("embed", help="embed every tile of a slide (or a folder of slides)")
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True, help="output SpatialData .zarr")
    e.add_argument("--device", default=None)
    e.add_argument("--scheduler", help="dask.distributed scheduler address for many slides")
    e.set_defaults(func=_cmd_embed)

    v = sub.add_parser("evaluate", help="paper Task 1 (genes) and Task 2 (retrieval)")
    v.add_argument("--data", type=Path)
    v.add_argument("--checkpoint", type=Path)
    v.add_argument("--out", type=Path, required=True, help="report folder")
    v.add_argument("--compare", type=Path, nargs="+", help="run folders to tabulate")
    v.add_argument("--dump-embeddings", action="store_true")
    v.add_argument("--device", default=None)
    v.add_argument(
        "--baselines",
        nargs="*",
        metavar="NAME",
        help="also train and evaluate baselines on the same split: bleep, no_graph, "
        "single_scale, no_sparsify, multicrop, all (none given: the first four)",
    )
    v.add_argument("--epochs", type=int, help="epochs of the baselines (default: as trained)")
    v.add_argument("--split", type=Path, help="split.json (default: the run folder's)")
    v.add_argument("--no-recalibrate", action="store_true", help="skip the per-gene recalibration")
    v.add_argument(
        "--throughput-tiles", type=int, default=8, help="tiles timed per multi-crop mode (0: skip)"
    )
    v.set_defaults(func=_cmd_evaluate)

    b = sub.add_parser("bench", help="throughput, event-loop stall, cache and memory figures")
    b.add_argument("--scale", action="store_true", help="big-slide memory and retrieval scale")
    b.add_argument(
        "--cancel",
        action="store_true",
        help="cancel latency of load, embed, train, cluster and retrieve (API and widgets)",
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
    b.set_defaults(func=_cmd_bench)

    d = sub.add_parser("demo", help="open napari on the embedded sample with the plugin")
    d.add_argument("--out", type=Path, default=None, help="cache folder (default ~/.cache)")
    d.add_argument("--screenshots", type=Path, default=None, help="write screenshots here and exit")
    d.add_argument("--epochs", type=int, default=None, help="demo model training epochs")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-sigmma`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return int(func(args) or 0)
    except SigmmaError as err:
        print(f"napari-sigmma {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-sigmma {args.command}: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
