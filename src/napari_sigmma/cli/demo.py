"""``napari-sigmma demo``: napari on the embedded sample with the plugin."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand to ``sub``."""
    d = sub.add_parser("demo", help="open napari on the embedded sample with the plugin")
    d.add_argument("--out", type=Path, default=None, help="cache folder (default ~/.cache)")
    d.add_argument("--screenshots", type=Path, default=None, help="write screenshots here and exit")
    d.add_argument("--epochs", type=int, default=None, help="demo model training epochs")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_sigmma.demo.app import run_demo

    return run_demo(out=args.out, screenshots=args.screenshots, train_epochs=args.epochs)
