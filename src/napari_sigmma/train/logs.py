"""The training log of a run folder: ``metrics.jsonl`` and TensorBoard event files.

``metrics.jsonl`` holds one JSON line per optimiser step (``kind: step``), per epoch
(``kind: epoch``, with the validation recalls) and for the held-out test (``kind: test``).
The same numbers go to TensorBoard event files in the run folder (``tensorboard --logdir
RUN``): ``train/loss``, ``train/loss_<scale>``, ``train/lr``, ``train/temperature`` per
step; ``epoch/train_loss`` and ``val/<scale>/<direction>@<p>``, ``val/score`` (and any
extra per-epoch number) per epoch; ``test/...`` once. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from napari_sigmma.train.checkpoint import disk_errors


def trim_metrics(path: Path, step: int, epoch: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("step", 0) > step:
            continue
        if rec.get("kind") in ("epoch", "test") and rec.get("epoch", -1) >= epoch:
            continue
        keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    with disk_errors(path, "the metrics log"):
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, path)


def _scalars(rec: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) record, with ``/``-joined names."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_scalars(v, name + "/"))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out


class RunLog:
    """Appends records to ``metrics.jsonl`` and mirrors their numbers to TensorBoard.

    Parameters
    ----------
    run
        The run folder (``metrics.jsonl`` and the event files go there).
    enabled
        False on ranks other than 0: nothing is written.
    tensorboard
        Write TensorBoard event files (``torch.utils.tensorboard``, imported lazily).
    purge_step
        When resuming: TensorBoard hides the events of earlier event files from this step
        on (the steps after the checkpoint, which the resumed run redoes).
    """

    def __init__(
        self,
        run: Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        purge_step: int | None = None,
    ) -> None:
        self.path = run / "metrics.jsonl"
        self.enabled = enabled
        self._fh = None
        self._tb = None
        if not enabled:
            return
        with disk_errors(self.path, "the metrics log"):
            self._fh = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with disk_errors(run, "the TensorBoard log"):
                self._tb = SummaryWriter(log_dir=str(run), purge_step=purge_step)

    def write(self, rec: dict[str, Any]) -> None:
        """One record: a JSON line, and its numbers as TensorBoard scalars."""
        if self._fh is None:
            return
        with disk_errors(self.path, "the metrics log"):
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()
        if self._tb is not None:
            self._to_tensorboard(rec)

    def _to_tensorboard(self, rec: dict[str, Any]) -> None:
        kind, step = rec.get("kind"), int(rec.get("step", 0))
        skip = {"step", "epoch", "kind", "best_epoch", "batches"}
        body = {k: v for k, v in rec.items() if k not in skip}
        if kind == "step":
            parts = body.pop("parts", {}) or {}
            names = {"loss": "train/loss", "lr": "train/lr", "temperature": "train/temperature"}
            for k, v in _scalars(body).items():
                self._tb.add_scalar(names.get(k, f"train/{k}"), v, step)
            for k, v in _scalars(parts).items():
                self._tb.add_scalar(f"train/loss_{k}", v, step)
        elif kind == "epoch":
            for k, v in _scalars(body).items():
                tag = k if "/" in k else f"epoch/{k}"
                self._tb.add_scalar(tag, v, step)
        elif kind == "test":
            for k, v in _scalars(body).items():
                self._tb.add_scalar(k if "/" in k else f"test/{k}", v, step)

    def close(self) -> None:
        """Close the files (idempotent)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class ProgressBars:
    """Training callback that shows tqdm bars on stderr (when the command line turned bars
    on, :mod:`napari_sigmma.progress`): the crop-feature pre-computation and the optimiser
    steps, each labelled with ``label``. Rank 0 only; :meth:`close` ends both bars."""

    def __init__(self, label: str = "training") -> None:
        self.label = label
        self._steps: Any = None
        self._features: Any = None

    def on_features(self, done: int, total: int) -> None:
        from napari_sigmma.progress import Bar

        if self._features is None and int(os.environ.get("RANK", "0")) == 0:
            self._features = Bar(f"{self.label}: crop features", total, unit="tile")
        if self._features is not None:
            self._features(done, total)
            if done >= total:
                self._features.close()

    def on_train_start(self, total_steps: int, done_steps: int) -> None:
        from napari_sigmma.progress import Bar

        if self._features is not None:
            self._features.close()
        if int(os.environ.get("RANK", "0")) == 0:
            self._steps = Bar(self.label, total_steps, unit="step")
            self._steps(done_steps, total_steps)

    def on_step(self, step: int, epoch: int, loss: float, parts: dict[str, float]) -> None:
        if self._steps is not None:
            self._steps(step)

    def close(self) -> None:
        for b in (self._steps, self._features):
            if b is not None:
                b.close()
