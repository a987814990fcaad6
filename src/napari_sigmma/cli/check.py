"""``napari-sigmma check PATH``: validate data, a slide, a config, a run folder or a
checkpoint before a long job, printing every problem with what to do."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``check`` subcommand to ``sub``."""
    c = sub.add_parser(
        "check",
        help="check a data folder, slide, config, run folder or checkpoint (no training)",
    )
    c.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry of ``napari-sigmma check``: 0 when clean, 2 when any problem was found."""
    from napari_sigmma.train.check import check_path

    n_problems = 0
    for path in args.paths:
        findings = check_path(path)
        problems = [f for f in findings if not f.note]
        n_problems += len(problems)
        for f in findings:
            print(f)
        notes = len(findings) - len(problems)
        verdict = "OK" if not problems else f"{len(problems)} problem(s)"
        print(f"{path}: {verdict}" + (f", {notes} note(s)" if notes else ""))
    return 2 if n_problems else 0
