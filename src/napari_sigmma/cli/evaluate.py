"""``napari-sigmma evaluate``: the paper's Task 1 and Task 2, baselines, comparisons."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_sigmma.errors import SigmmaError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand to ``sub``."""
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
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry of ``napari-sigmma evaluate`` (see :mod:`napari_sigmma.cli`)."""
    from napari_sigmma.evaluation.baselines import run_baselines
    from napari_sigmma.evaluation.run import _fmt_summary, compare_runs, evaluate

    def log(msg: str) -> None:
        print(msg, flush=True)

    out = Path(args.out)
    device = getattr(args, "device", None)
    compare = list(getattr(args, "compare", None) or [])
    baselines = getattr(args, "baselines", None)
    common = dict(
        recalibrate=not getattr(args, "no_recalibrate", False),
        throughput_tiles=int(getattr(args, "throughput_tiles", 8) or 0),
    )
    if args.checkpoint is None and not compare:
        raise SigmmaError("give --checkpoint (and --data), or --compare RUN...")
    main_metrics = None
    if args.checkpoint is not None:
        main_metrics = evaluate(
            args.data,
            args.checkpoint,
            out,
            dump_embeddings=bool(getattr(args, "dump_embeddings", False)),
            device=device,
            split=getattr(args, "split", None),
            log=log,
            **common,
        )
        print(_fmt_summary(main_metrics))
        print(f"report: {out / 'report.md'}")
    items: list[Any] = []
    if baselines is not None and args.checkpoint is not None:
        res = run_baselines(
            args.checkpoint,
            out,
            variants=baselines or None,
            data=args.data,
            epochs=getattr(args, "epochs", None),
            device=device,
            log=log,
            **common,
        )
        items = [out, *[r["report"] for r in res]]
    if compare:
        items = ([out] if main_metrics is not None and not items else items) + compare
    if items:
        table = compare_runs(items, out, data=args.data, device=device, log=log, **common)
        print(table["markdown"])
        print(f"comparison: {out / 'compare.md'}")
    return 0
