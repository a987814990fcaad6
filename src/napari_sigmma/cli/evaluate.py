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
        help="also train and evaluate on the same split: none given = Table 4's four "
        "cumulative rows, the leave-one-out variants, the floors and the topology controls, "
        "each row --seeds times (evaluation/table4.py); or named baselines: bleep, no_graph, "
        "single_scale, no_sparsify, multicrop, all (one seed, the older comparison)",
    )
    v.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="with --baselines (Table 4): trainings per row, seeds ref+0..N-1 (default 3)",
    )
    v.add_argument(
        "--rows",
        nargs="+",
        metavar="ROW",
        help="with --baselines (Table 4): train only these rows (row1..row4, no_graph, "
        "single_scale; row4 always) — a partial table, marked as such",
    )
    v.add_argument(
        "--no-controls",
        action="store_true",
        help="with --baselines (Table 4): skip the topology controls",
    )
    v.add_argument("--epochs", type=int, help="epochs of the baselines (default: as trained)")
    v.add_argument("--split", type=Path, help="split.json (default: the run folder's)")
    v.add_argument("--no-recalibrate", action="store_true", help="skip the per-gene recalibration")
    v.add_argument(
        "--throughput-tiles", type=int, default=8, help="tiles timed per multi-crop mode (0: skip)"
    )
    v.add_argument(
        "--edge-mode",
        default=None,
        help="how the edge sampler builds the evaluated graphs: expected (default: each "
        "candidate weighted by its score), threshold (score > 0.5), sampled (mean of 8 "
        "stochastic passes), or the controls none / all / random "
        "(napari_sigmma.models.edges.EDGE_MODES)",
    )
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry of ``napari-sigmma evaluate`` (see :mod:`napari_sigmma.cli`)."""
    from napari_sigmma import progress
    from napari_sigmma.evaluation.baselines import run_baselines
    from napari_sigmma.evaluation.run import _fmt_summary, compare_runs, evaluate

    progress.set_enabled(not getattr(args, "quiet", False))

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
            edge_mode=getattr(args, "edge_mode", None),
            log=log,
            **common,
        )
        print(_fmt_summary(main_metrics))
        print(f"report: {out / 'report.md'}")
    items: list[Any] = []
    if baselines is not None and not baselines and args.checkpoint is not None:
        from napari_sigmma.evaluation.table4 import run_table4

        seeds = getattr(args, "seeds", None)
        t4 = run_table4(
            args.checkpoint,
            out,
            n_seeds=3 if seeds is None else int(seeds),
            data=args.data,
            epochs=getattr(args, "epochs", None),
            device=device,
            controls=not getattr(args, "no_controls", False),
            only=getattr(args, "rows", None),
            log=log,
        )
        print(t4["markdown"])
        print(f"Table 4: {out / 'compare.md'}, {out / 'table4.json'}")
    elif baselines is not None and args.checkpoint is not None:
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
