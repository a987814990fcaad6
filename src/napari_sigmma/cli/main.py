"""Command line: a thin layer over the same functions the widgets and tests call.

Every subcommand imports its heavy machinery lazily, so ``napari-sigmma --help`` is instant.
A :class:`~napari_sigmma.errors.SigmmaError` ends the program with a one-line message and
exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

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


#: Third-party warnings that say nothing to a user of this command (each names a library
#: detail, not the user's data) and would push the one-line error off the screen: zarr's
#: format notices, torch_geometric's import-time ``torch.jit`` deprecation, torch's pickle
#: protocol note before a refused checkpoint. ``(message prefix, category)``.
QUIET_WARNINGS: tuple[tuple[str, str], ...] = (
    ("zarr v3 autosharding", "UserWarning"),
    ("Object at ", "Warning"),  # zarr: "... is not recognized as a component of a Zarr hierarchy"
    ("`torch.jit.script` is deprecated", "FutureWarning"),
    ("Detected pickle protocol", "UserWarning"),
)


def quiet_third_party_warnings() -> None:
    """Ignore :data:`QUIET_WARNINGS` here and in child processes (dask workers inherit
    ``PYTHONWARNINGS``); our own warnings and notes still print."""
    import builtins
    import os
    import warnings

    specs = []
    for prefix, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=prefix, category=getattr(builtins, category))
        if ":" not in prefix and "," not in prefix:
            specs.append(f"ignore:{prefix}:{category}")
    have = [x for x in os.environ.get("PYTHONWARNINGS", "").split(",") if x]
    os.environ["PYTHONWARNINGS"] = ",".join(have + [x for x in specs if x not in have])


def _one_line_warnings(prefix: str) -> None:
    """Print the warnings that do reach the user (the project's notes: an RGBA H&E, a few
    cells on the H&E, …) as one line each, like the errors, not Python's file:line form."""
    import warnings

    def show(message: Any, category: Any, filename: str, lineno: int, *a: Any, **k: Any) -> str:
        text = " ".join(str(message).split())
        return f"{prefix}: warning: {text}\n"

    warnings.formatwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-sigmma`` command."""
    quiet_third_party_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    import warnings

    from napari_sigmma import progress

    saved_format = warnings.formatwarning
    _one_line_warnings(f"napari-sigmma {args.command}")
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
        warnings.formatwarning = saved_format


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
