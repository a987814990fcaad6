"""``napari-sigmma train``.

Builds a :class:`~napari_sigmma.train.config.TrainConfig` from ``--config`` (or, with
``--resume``, the run folder's ``config.yaml``; else the defaults), applies the flags, and
runs :func:`~napari_sigmma.train.loop.train`. The first Ctrl-C asks the trainer to stop:
it writes a checkpoint and the run can be continued with the printed command
(``--out RUN --resume``: the data and every setting come from the run's ``config.yaml``).
Progress bars (feature pre-computation, training steps) go to stderr unless ``--quiet``.
Under ``torchrun`` every process runs this command; only rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import threading
from pathlib import Path
from typing import Any

from napari_sigmma.errors import SigmmaError
from napari_sigmma.train.data import expand_data
from napari_sigmma.train.logs import ProgressBars


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _say(*parts: Any) -> None:
    if _rank() == 0:
        print(*parts, flush=True)


def build_train_config(args: argparse.Namespace) -> Any:
    """The TrainConfig for the ``train`` subcommand's arguments."""
    from napari_sigmma.train.config import TrainConfig

    out = Path(args.out) if getattr(args, "out", None) else None
    if getattr(args, "config", None):
        cfg = TrainConfig.from_yaml(args.config)
    elif getattr(args, "resume", False) and out is not None and (out / "config.yaml").is_file():
        cfg = TrainConfig.from_yaml(out / "config.yaml")
    else:
        cfg = TrainConfig()
    changes: dict[str, Any] = {}
    model: dict[str, Any] = {}
    if getattr(args, "data", None):
        changes["data"] = [str(p) for p in expand_data(args.data)]
    if out is not None:
        changes["run_dir"] = str(out)
    if getattr(args, "epochs", None) is not None:
        if int(args.epochs) < 1:
            raise SigmmaError(f"--epochs {args.epochs}: nothing to train (give 1 or more)")
        changes["epochs"] = int(args.epochs)
    if getattr(args, "device", None):
        changes["device"] = str(args.device)
    if getattr(args, "backbone", None):
        model["backbone"] = str(args.backbone)
    if getattr(args, "checkpoint", None):
        model["checkpoint"] = str(Path(args.checkpoint).resolve())
    if getattr(args, "finetune", None):
        model["finetune"] = str(args.finetune)
    if model:
        changes["model"] = model
    return cfg.replace(**changes) if changes else cfg


class _Printer(ProgressBars):
    """Console progress for the CLI (rank 0): tqdm bars on stderr for the crop-feature
    pre-computation and the optimiser steps (:class:`~napari_sigmma.train.logs.ProgressBars`),
    one line per epoch (losses, recalls) on stdout. Bars are off under ``--quiet`` (see
    :mod:`napari_sigmma.progress`)."""

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        msg = f"epoch {epoch}: train loss {metrics.get('train_loss', float('nan')):.4f}"
        if "val/score" in metrics:
            msg += f", val mean Recall@5% {metrics['val/score']:.3f}"
            for s in ("micro", "meso", "macro"):
                k1, k2 = f"val/{s}/he2st@5", f"val/{s}/st2he@5"
                if k1 in metrics:
                    msg += f" | {s} HE→ST {metrics[k1]:.3f} ST→HE {metrics[k2]:.3f}"
        _say(msg)


def run(args: argparse.Namespace) -> int:
    """Entry of ``napari-sigmma train``; returns the exit code (130 when cancelled)."""
    from napari_sigmma import progress
    from napari_sigmma.train.loop import train

    resume = bool(getattr(args, "resume", False))
    if resume and getattr(args, "out", None) is None and getattr(args, "config", None) is None:
        raise SigmmaError("--resume needs --out: the run folder to continue")
    cfg = build_train_config(args)
    if not cfg.data:
        cfg_file = getattr(args, "config", None)
        raise SigmmaError(
            "no data: pass --data, or list the data folders under 'data:' in the config",
            path=cfg_file,
        )
    progress.set_enabled(not getattr(args, "quiet", False))
    _say(
        f"training {cfg.model.backbone} ({cfg.model.finetune}) on {len(cfg.data)} slide(s) "
        f"→ {cfg.run_dir}" + (" (resuming)" if resume else "")
    )
    cancel = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_sigint(signum: int, frame: Any) -> None:
            if cancel.is_set():
                raise KeyboardInterrupt
            _say("stopping after this step (checkpointing); Ctrl-C again to abort")
            cancel.set()

        previous = signal.signal(signal.SIGINT, on_sigint)
    printer = _Printer()
    try:
        result = train(cfg, callbacks=printer, cancel=cancel, resume=resume)
    finally:
        printer.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    _say(
        f"{result.status}: {result.epoch} epoch(s), {result.global_step} steps, "
        f"{result.seconds:.0f} s; tiles {result.n_tiles}"
    )
    if result.best_checkpoint:
        _say(f"best checkpoint: {result.best_checkpoint} (epoch {result.best_epoch})")
    if result.test_metrics:
        tm = result.test_metrics
        for s in ("micro", "meso", "macro"):
            if f"{s}/he2st@5" in tm:
                _say(
                    f"  test {s}: HE→ST R@5% {tm[f'{s}/he2st@5']:.3f}, "
                    f"ST→HE R@5% {tm[f'{s}/st2he@5']:.3f}  (n={tm.get('n_tiles')})"
                )
    if result.status == "cancelled":
        _say(f"resume with: {resume_command(cfg.run_dir)}")
        return 130
    return 0


def resume_command(run_dir: str | os.PathLike[str]) -> str:
    """The command that continues a stopped run, quoted for a POSIX shell. It works as
    printed: ``--resume`` reads the data and every setting from the run's config.yaml."""
    return f"napari-sigmma train --out {shlex.quote(str(run_dir))} --resume"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand to ``sub``."""
    t = sub.add_parser("train", help="train or fine-tune the SIGMMA encoders")
    t.add_argument(
        "--data",
        type=Path,
        help="Xenium / HEST folder or .zarr (with --resume: read from the run's config.yaml)",
    )
    t.add_argument("--config", type=Path, help="YAML config (CLI flags override it)")
    t.add_argument("--out", type=Path, help="run folder")
    t.add_argument("--epochs", type=int)
    t.add_argument("--backbone", help="uni, uni2-h, vit_small, vit_tiny, efficientnet_lite0, …")
    t.add_argument("--checkpoint", type=Path, help="backbone weights (e.g. UNI pytorch_model.bin)")
    t.add_argument("--finetune", choices=["frozen", "last_k", "full"])
    t.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=run)
