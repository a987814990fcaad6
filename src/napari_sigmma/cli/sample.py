"""``napari-sigmma sample``: write the embedded (or a synthetic) paired sample."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``sample`` subcommand to ``sub``."""
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
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.synthetic:
        from napari_sigmma.samples.synthetic import write_synthetic_sample

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
        from napari_sigmma.samples.embedded import write_embedded_sample

        out = write_embedded_sample(args.out)
    print(f"wrote Xenium bundle: {out}")
    return 0
