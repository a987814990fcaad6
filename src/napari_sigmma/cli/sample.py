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
    s.add_argument(
        "--layout-benchmark",
        action="store_true",
        help="with --synthetic: the layout benchmark (composition-matched tiles that differ "
        "only in their spatial arrangement; samples/layout.py)",
    )
    s.add_argument(
        "--layout-tiles",
        type=int,
        default=8,
        help="layout benchmark: tiles per slide side (a multiple of 4; 40 = 1,600 tiles)",
    )
    s.add_argument("--verbose", action="store_true", help="print progress")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=run)


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or a folder that already holds something (a
    sample is never written over another one or into a data bundle)."""
    from napari_sigmma.errors import SigmmaError

    if out.exists() and not out.is_dir():
        raise SigmmaError(
            "--out is an existing file, not a folder: remove it or choose another --out", path=out
        )
    if out.is_dir() and any(out.iterdir()):
        raise SigmmaError(
            "--out is a folder that is not empty: remove it or choose another --out", path=out
        )


def run(args: argparse.Namespace) -> int:
    """Entry of ``napari-sigmma sample``: a failed or interrupted write (a full disk, Ctrl-C)
    leaves no half-written bundle behind."""
    import shutil

    from napari_sigmma import progress
    from napari_sigmma.train.checkpoint import write_error

    progress.set_enabled(not getattr(args, "quiet", False))
    out = Path(args.out)
    check_out(out)
    existed = out.is_dir()
    try:
        written = _write(args)
    except BaseException as err:
        if existed:  # an empty folder the user made: empty it again
            for child in list(out.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, OSError):
            raise write_error(err, out, "the sample") from err
        raise
    print(f"wrote Xenium bundle: {written}")
    return 0


def _write(args: argparse.Namespace) -> Path:
    from napari_sigmma.progress import Bar

    if getattr(args, "layout_benchmark", False):
        from napari_sigmma.errors import SigmmaError
        from napari_sigmma.samples.layout import write_layout_benchmark

        if not args.synthetic:
            raise SigmmaError("--layout-benchmark goes with --synthetic", path=args.out)
        return write_layout_benchmark(
            args.out,
            n_side=args.layout_tiles,
            seed=args.seed,
            progress=(lambda msg: print(msg, flush=True)) if args.verbose else None,
        )
    if args.synthetic:
        from napari_sigmma.samples.synthetic import write_synthetic_sample

        with Bar("H&E tiles", unit="tile") as bar:
            return write_synthetic_sample(
                args.out,
                size=args.size,
                seed=args.seed,
                cell_window=args.cell_window,
                render=args.render,
                workers=args.workers,
                progress=(lambda msg: print(msg, flush=True)) if args.verbose else None,
                tile_progress=bar,
            )
    from napari_sigmma.samples.embedded import write_embedded_sample

    return write_embedded_sample(args.out)
