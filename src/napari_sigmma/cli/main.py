"""Command line: a thin layer over the same functions the widgets and tests call.

Every subcommand imports its heavy machinery lazily, so ``napari-sigmma --help`` is instant.
A :class:`~napari_sigmma.errors.SigmmaError` ends the program with a one-line message and
exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from napari_sigmma.errors import SigmmaError


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with all subcommands (one module each)."""
    from napari_sigmma.cli import bench, check, demo, embed, evaluate, sample, train

    p = argparse.ArgumentParser(
        prog="napari-sigmma",
        description="SIGMMA: multi-scale alignment of H&E slides and Xenium spatial "
        "transcriptomics, with a napari viewer.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for module in (sample, train, embed, evaluate, bench, demo, check):
        module.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-sigmma`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    from napari_sigmma import progress

    try:
        return int(func(args) or 0)
    except SigmmaError as err:
        print(f"napari-sigmma {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-sigmma {args.command}: cancelled", file=sys.stderr)
        return 130
    finally:
        progress.set_enabled(False)  # a subcommand's bars end with it (tests call main twice)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
