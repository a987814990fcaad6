"""The training loop: :func:`train` runs one configuration in its run folder.

::

    <run>/config.yaml      the configuration (plain YAML)
    <run>/split.json       which tile is train / val / test (spatial blocks)
    <run>/features.npz     the node-feature transform (also inside every checkpoint)
    <run>/metrics.jsonl    one JSON line per optimiser step, per epoch, and the test
    <run>/events.out.tfevents.*   the same numbers for TensorBoard
    <run>/checkpoints/last.pt, best.pt
    <run>/cache/           frozen-backbone crop features (and tile images when not frozen)
    <run>/.lock            while a process trains here

The pieces live beside this module: :mod:`~napari_sigmma.train.data` (slides, split,
features, crop-feature cache, the batches of an epoch), :mod:`~napari_sigmma.train.checkpoint`
(checkpoint files, resume, run-folder lock), :mod:`~napari_sigmma.train.validation`
(recalls, best-checkpoint choice), :mod:`~napari_sigmma.train.logs` (metrics.jsonl,
TensorBoard), :mod:`~napari_sigmma.train.distributed` (DDP). Here: the optimisation itself
(:class:`_Session`) and :func:`train`, which wires them together.

Extra per-epoch numbers: :func:`epoch_diagnostics` is the one hook; whatever it returns
is logged under ``diagnostics/<name>`` in the epoch's ``metrics.jsonl`` record, in
TensorBoard and in the ``on_epoch`` callback's metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.device import to_device
from napari_sigmma.errors import CancelLike, SigmmaError, is_cancelled
from napari_sigmma.train.checkpoint import (
    CKPT_FORMAT,
    CKPT_VERSION,
    RunLock,
    atomic_copy,
    atomic_torch_save,
    check_resume_config,
    check_run_dir_outside_data,
    check_writable_dir,
    disk_errors,
    load_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
)
from napari_sigmma.train.data import (
    RunData,
    cached_crop_features,
    epoch_batches,
    load_features,
    load_slides,
    no_training_tiles,
    prepare_run_data,
)
from napari_sigmma.train.distributed import Dist, rank_device, setup_distributed, wrap_ddp
from napari_sigmma.train.logs import RunLog, trim_metrics
from napari_sigmma.train.validation import BestSelector, evaluate_retrieval

if TYPE_CHECKING:
    from napari_sigmma.tiles.dataset import SlideTiles
    from napari_sigmma.train.config import TrainConfig


# ----------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """How a call to :func:`train` ended.

    Attributes
    ----------
    status
        ``"completed"``, ``"early_stopped"`` or ``"cancelled"``.
    run_dir
        The run folder.
    epoch
        Epochs completed.
    global_step
        Optimiser steps taken in total (over all calls, when resumed).
    best_epoch, best_score
        Epoch (0-based) and score (mean validation Recall@5% over scales and directions)
        of ``best.pt``; ``None`` without validation.
    last_checkpoint, best_checkpoint
        Paths of the checkpoints (``None`` if not written).
    val_metrics
        Metrics of the last validation.
    test_metrics
        Recall@5/10/15% on the test tiles with the best weights (empty when cancelled or
        without test tiles).
    step_losses
        Loss of every optimiser step taken in this call.
    n_tiles
        Tiles per split.
    seconds
        Wall time of this call.
    """

    status: str
    run_dir: Path
    epoch: int
    global_step: int
    best_epoch: int | None = None
    best_score: float | None = None
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    val_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    step_losses: list[float] = field(default_factory=list)
    n_tiles: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class TrainCallback:
    """Base class of training callbacks (every method optional, called on rank 0 only)."""

    def on_train_start(self, total_steps: int, done_steps: int) -> None:
        """Before the first step: optimiser steps of the whole run, and those already done
        (non-zero when resuming)."""

    def on_features(self, done: int, total: int) -> None:
        """While frozen-backbone crop features are pre-computed (tiles done / to do)."""

    def on_step(self, step: int, epoch: int, loss: float, parts: dict[str, float]) -> None:
        """After every optimiser step (``step`` counts from 1)."""

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """After every epoch (``epoch`` counts from 0), with its validation metrics."""

    def on_checkpoint(self, path: Path) -> None:
        """After a checkpoint file is written."""


_CALLBACK_NAMES = ("on_train_start", "on_features", "on_step", "on_epoch", "on_checkpoint")


def callback_list(callbacks: Any) -> list[Any]:
    """``train``'s ``callbacks`` (None, one object, a sequence, or a mapping of method
    names to functions) as a list of callback objects."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Mapping):
        cb = TrainCallback()
        for k, v in callbacks.items():
            if k not in _CALLBACK_NAMES:
                raise SigmmaError(f"unknown callback {k!r}")
            setattr(cb, k, v)
        return [cb]
    if isinstance(callbacks, Sequence) and not isinstance(callbacks, str):
        return list(callbacks)
    return [callbacks]


def _fire(cbs: list[Any], name: str, *args: Any) -> None:
    for cb in cbs:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(*args)


# ----------------------------------------------------------------------------- helpers


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up over ``warmup_steps`` then cosine decay to 0."""
    total = max(int(total_steps), 1)
    warm = max(0, min(int(warmup_steps), total - 1))

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(max(prog, 0.0), 1.0)))

    return f


def param_groups(model: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: backbone / rest × decayed (matrices) / not (biases, norms, scale)."""
    backbone_ids = {id(p) for p in model.image.backbone.parameters()}
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bb = id(p) in backbone_ids
        decay = p.ndim >= 2 and "logit_scale" not in name
        groups.setdefault((is_bb, decay), []).append(p)
    return [
        {
            "params": params,
            "lr": cfg.backbone_lr if is_bb else cfg.lr,
            "weight_decay": cfg.weight_decay if decay else 0.0,
        }
        for (is_bb, decay), params in sorted(groups.items())
    ]


def epoch_diagnostics(model: Any, batch: tuple[Any, Any]) -> dict[str, float]:
    """THE hook for extra per-epoch numbers in ``metrics.jsonl`` (and TensorBoard).

    Called once per epoch on rank 0, after validation, under ``torch.no_grad()`` with the
    RNG states saved and restored around it (a stochastic diagnostic does not change the
    training run), with ``batch = (x, graph_batch)``: the first micro-batch of the
    validation tiles (of the training tiles when there are fewer than 2), on the model's
    device. ``x`` is crop features ``(B, 21, C)`` for a frozen backbone, else images.
    The model is in training mode; switch modes inside if a number needs it.

    Today this asks the model: when it has an ``epoch_diagnostics(batch) -> dict`` method
    (guarded by ``hasattr``), its numbers are returned; otherwise nothing is logged.
    The returned names are logged as ``diagnostics/<name>``.
    """
    if not hasattr(model, "epoch_diagnostics"):
        return {}
    return {str(k): float(v) for k, v in model.epoch_diagnostics(batch).items()}


@dataclass
class _RunFiles:
    run: Path

    @property
    def last(self) -> Path:
        return self.run / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.run / "checkpoints" / "best.pt"

    @property
    def split(self) -> Path:
        return self.run / "split.json"

    @property
    def features(self) -> Path:
        return self.run / "features.npz"


def _open_checkpoint(cfg: TrainConfig, files: _RunFiles, resume: bool) -> dict | None:
    """The checkpoint to resume from (checked against ``cfg``), or ``None`` for a fresh
    start (refused when the folder already holds a checkpoint)."""
    if resume:
        ckpt = load_checkpoint(files.last)
        check_resume_config(cfg, ckpt["config"], files.last)
        if not files.split.is_file():
            raise SigmmaError("cannot resume: split.json is missing", path=files.run)
        return ckpt
    if files.last.exists():
        raise SigmmaError(
            "the run folder already holds a checkpoint; continue it with --resume (Resume in the "
            "training widget) or choose another folder",
            path=files.run,
        )
    return None


def _prepare_data(
    cfg: TrainConfig,
    files: _RunFiles,
    dd: Dist,
    *,
    ckpt: dict | None,
    split: str | os.PathLike[str] | None,
    cancel: CancelLike,
    given: Sequence[SlideTiles] | None = None,
) -> RunData | None:
    """Every rank reads its slides (or takes fresh holders of ``given``); rank 0 makes (or
    reads) the split and fits the node features and writes them with the config; the other
    ranks read what it wrote."""
    from napari_sigmma.tiles.dataset import SlideTiles
    from napari_sigmma.tiles.features import NodeFeaturizer

    saved_feat = NodeFeaturizer.from_arrays(ckpt["features"]) if ckpt is not None else None
    if given is not None:
        if len(given) != len(cfg.data):
            raise SigmmaError(
                f"{len(given)} prepared slides for {len(cfg.data)} names in the config's data"
            )
        # fresh holders: the trainer fills their image / feature caches
        slides = [
            SlideTiles(paired=s.paired, grid=s.grid, cells=s.cells, settings=s.settings)
            for s in given
        ]
    else:
        slides = load_slides(cfg, cancel=cancel)
    data = None
    if dd.main:
        with disk_errors(files.run / "config.yaml", "the run folder"):
            cfg.save_yaml(files.run / "config.yaml")
        split_path = files.split if ckpt is not None else (Path(split) if split else None)
        data = prepare_run_data(
            cfg, split_path=split_path, cancel=cancel, featurizer=saved_feat, slides=slides
        )
        if data is not None:
            with disk_errors(files.split, "the run folder"):
                data.split.save(files.split)
            with disk_errors(files.features, "the run folder"):
                data.featurizer.save(files.features)
    dd.barrier()
    ready = files.split.is_file() and (saved_feat is not None or files.features.is_file())
    if not dd.main and len(slides) == len(cfg.data) and ready:
        feat = saved_feat if saved_feat is not None else load_features(files.features)
        data = prepare_run_data(cfg, split_path=files.split, featurizer=feat, slides=slides)
    if data is None or dd.any_flag(is_cancelled(cancel)):
        return None
    if not data.entries["train"]:
        raise no_training_tiles(cfg, data.slides)
    return data


def _model_inputs(
    model: Any,
    data: RunData,
    cfg: TrainConfig,
    files: _RunFiles,
    dd: Dist,
    device: Any,
    cbs: list[Any],
    cancel: CancelLike,
) -> tuple[bool, list[np.ndarray] | None]:
    """Cached crop features (frozen backbone) or pre-extracted tile images. Rank 0
    computes and writes the caches first; the other ranks then read them. Returns
    ``(cancelled, crop features or None)``."""
    frozen = model.backbone_frozen and cfg.cache_features
    cache_dir = Path(cfg.feature_cache_dir) if cfg.feature_cache_dir else files.run / "cache"
    tile_dir = Path(cfg.tile_cache_dir) if cfg.tile_cache_dir else files.run / "cache"

    def inputs() -> list[np.ndarray] | bool | None:
        if not frozen:
            for s in data.slides:
                with disk_errors(tile_dir, "the tile cache"):
                    s.load_images(tile_dir)
            return True
        per_slide = [
            np.array(sorted({t for k in data.entries.values() for sj, t in k if sj == si}))
            for si in range(len(data.slides))
        ]
        total, before = sum(len(t) for t in per_slide), [0]

        def progress(done: int, _n: int) -> None:
            if dd.main:
                _fire(cbs, "on_features", before[0] + done, total)

        feats = []
        for s, tiles in zip(data.slides, per_slide, strict=True):
            f = cached_crop_features(
                model,
                s,
                tiles.astype(np.int64),
                cache_dir,
                device=device,
                cancel=cancel,
                write=dd.main,
                progress=progress,
            )
            if f is None:
                return None
            before[0] += len(tiles)
            feats.append(f)
        return feats

    got = inputs() if dd.main else None
    dd.barrier()
    if not dd.main:
        got = inputs()
    if dd.any_flag(got is None):
        return True, None
    return False, got if frozen else None  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the session


class _Session:
    """The state of one training run once data and model are ready: optimiser, schedule,
    data order, best-checkpoint choice, log; one method per phase of an epoch."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: Any,
        data: RunData,
        datasets: dict[str, Any],
        files: _RunFiles,
        dd: Dist,
        device: Any,
        cbs: list[Any],
    ) -> None:
        import torch

        self.cfg, self.model, self.data, self.datasets = cfg, model, data, datasets
        self.files, self.dd, self.device, self.cbs = files, dd, device, cbs
        self.opt = torch.optim.AdamW(
            param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.n_train = len(datasets["train"])
        n_batches = len(
            epoch_batches(np.arange(self.n_train), cfg.batch_size, rank=dd.rank, world=dd.world)
        )
        self.steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, int(cfg.max_steps_per_epoch))
        if self.steps_per_epoch == 0:
            raise SigmmaError(f"only {self.n_train} training tile(s): need at least 2 per batch")
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, warmup_cosine(cfg.epochs * self.steps_per_epoch, cfg.warmup_steps)
        )
        self.gen = torch.Generator()
        self.gen.manual_seed(int(cfg.seed) + 1)
        self.epoch_gen_state = self.gen.get_state()
        self.global_step, self.epoch = 0, 0
        self.best = BestSelector()
        self.ddp = wrap_ddp(model, device, dd)
        self.step_fn = self.ddp if self.ddp is not None else model
        self.log: RunLog | None = None
        self.step_losses: list[float] = []
        self.val_metrics: dict[str, float] = {}

    # -- checkpoints

    def restore(self, ckpt: dict[str, Any]) -> tuple[int, int]:
        """Load a resume checkpoint; returns ``(epoch, micro-batch)`` to continue at."""
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.global_step = int(ckpt["global_step"])
        self.best = BestSelector.from_dict(ckpt.get("best", {}))
        self.epoch_gen_state = ckpt["data_generator"]
        self.gen.set_state(self.epoch_gen_state)
        set_rng_state(ckpt["rng"])
        return int(ckpt["epoch"]), int(ckpt["batch"])

    def checkpoint_dict(self, epoch: int, batch: int, rng: dict, gstate: Any) -> dict[str, Any]:
        """Everything a resume (and inference) needs, as tensors and plain values."""
        import torch

        data = self.data
        return {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng,
            "data_generator": gstate,
            "epoch": int(epoch),
            "batch": int(batch),
            "global_step": int(self.global_step),
            "steps_per_epoch": int(self.steps_per_epoch),
            "config": self.cfg.to_dict(),
            "features": {
                k: (torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v)
                for k, v in data.featurizer.to_arrays().items()
            },
            "genes": list(data.genes),
            "n_node_features": int(data.featurizer.n_features),
            "n_genes": len(data.genes),
            "best": self.best.to_dict(),
            "world_size": int(self.dd.world),
            "slides": [{"name": s.name, "hash": s.paired.content_hash()} for s in data.slides],
        }

    def save(self, epoch: int, batch: int, rng: dict, gstate: Any, *, best: bool = False) -> None:
        """Write ``last.pt`` (and copy it to ``best.pt``) on rank 0; all ranks wait."""
        if self.dd.main:
            atomic_torch_save(self.checkpoint_dict(epoch, batch, rng, gstate), self.files.last)
            _fire(self.cbs, "on_checkpoint", self.files.last)
            if best:
                atomic_copy(self.files.last, self.files.best)
                _fire(self.cbs, "on_checkpoint", self.files.best)
        self.dd.barrier()

    # -- one epoch

    def _loader(self, batches: list[list[int]]) -> Any:
        import torch

        from napari_sigmma.tiles.dataset import make_loader

        loader_gen = torch.Generator()
        loader_gen.manual_seed(0)  # the loader's base seed must not touch torch's RNG
        return iter(
            make_loader(
                self.datasets["train"],
                batches,
                num_workers=self.cfg.num_workers,
                generator=loader_gen,
                pin_memory=self.device.type == "cuda",
            )
        )

    def _step(self, window: list[int], batches: list[list[int]], loader: Any) -> None:
        """One optimiser step over the micro-batches of ``window`` (gradient accumulation;
        DDP synchronises on the last one)."""
        import torch

        from napari_sigmma.device import autocast

        self.opt.zero_grad(set_to_none=True)
        w_loss, w_parts = 0.0, {}
        for j in range(len(window)):
            x, gb, _ = next(loader)
            x, gb = to_device(x, self.device), to_device(gb, self.device)
            no_sync = self.ddp is not None and j < len(window) - 1
            with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                with autocast(self.device):
                    out = self.step_fn(x, gb)
                (out["loss"] / len(window)).backward()
            w_loss += float(out["loss"].detach()) / len(window)
            for k, v in out["parts"].items():
                w_parts[k] = w_parts.get(k, 0.0) + float(v) / len(window)
        if self.cfg.grad_clip and self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip
            )
        lr_now = max(g["lr"] for g in self.opt.param_groups)  # this step's (head) lr
        self.opt.step()
        self.sched.step()
        self.global_step += 1
        w_loss = self.dd.mean(w_loss)
        self.step_losses.append(w_loss)
        if self.dd.main:
            self.log.write(
                {
                    "kind": "step",
                    "step": self.global_step,
                    "epoch": self.epoch,
                    "loss": w_loss,
                    "parts": w_parts,
                    "lr": float(lr_now),
                    "temperature": float(self.model.temperature),
                    "batches": [len(batches[b]) for b in window],
                }
            )
            _fire(self.cbs, "on_step", self.global_step, self.epoch, w_loss, w_parts)

    def run_epoch(self, epoch: int, first: int, cancel: CancelLike) -> tuple[bool, list[float]]:
        """The optimiser steps of one epoch from micro-batch ``first``; returns
        ``(cancelled, step losses)``. On cancel a checkpoint of the window's start is
        written (a partial accumulation window is dropped)."""
        import torch

        self.epoch = epoch
        perm = torch.randperm(self.n_train, generator=self.gen).numpy()
        batches = epoch_batches(perm, self.cfg.batch_size, rank=self.dd.rank, world=self.dd.world)
        batches = batches[: self.steps_per_epoch * self.cfg.grad_accum]
        ga = self.cfg.grad_accum
        windows = [list(range(w, min(w + ga, len(batches)))) for w in range(0, len(batches), ga)]
        loader = self._loader(batches[first:])
        n_before = len(self.step_losses)
        for window in windows:
            if window[0] < first:
                continue
            snap = rng_state()  # state at this window's start (checkpoint point)
            if self.dd.any_flag(is_cancelled(cancel)):
                self.save(epoch, window[0], snap, self.epoch_gen_state)
                return True, self.step_losses[n_before:]
            self._step(window, batches, loader)
            nxt = window[-1] + 1
            every = int(self.cfg.ckpt_every_steps or 0)
            if every and self.global_step % every == 0 and nxt < len(batches):
                self.save(epoch, nxt, rng_state(), self.epoch_gen_state)
        return False, self.step_losses[n_before:]

    def end_epoch(self, epoch: int, losses: list[float]) -> bool:
        """Validation, diagnostics, log, checkpoints; True when early stopping says stop."""
        cfg = self.cfg
        metrics: dict[str, float] = {
            "train_loss": float(np.mean(losses)) if losses else float("nan")
        }
        improved = False
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            val = evaluate_retrieval(
                self.model, self.datasets["val"], device=self.device, batch_size=cfg.batch_size
            )
            if val:
                self.val_metrics = val
                metrics.update({f"val/{k}": v for k, v in val.items()})
                improved = self.best.update(val["score"], int(val["n_tiles"]), epoch)
                metrics["val/best_margin"] = self.best.margin(int(val["n_tiles"]))
            else:
                improved = True  # nothing to validate on: the latest is the best
                self.best.epoch = epoch
        if self.dd.main:
            metrics.update({f"diagnostics/{k}": v for k, v in self._diagnostics().items()})
        self.model.train()
        if self.dd.main:
            self.log.write(
                {
                    "kind": "epoch",
                    "epoch": epoch,
                    "step": self.global_step,
                    "improved": improved,
                    **metrics,
                }
            )
            _fire(self.cbs, "on_epoch", epoch, metrics)
        self.save(epoch + 1, 0, rng_state(), self.gen.get_state(), best=improved)
        return bool(cfg.patience) and self.best.bad_evals >= int(cfg.patience)

    def _diagnostics(self) -> dict[str, float]:
        """:func:`epoch_diagnostics` on the first validation (else training) micro-batch."""
        import torch

        from napari_sigmma.tiles.dataset import make_loader

        if not hasattr(self.model, "epoch_diagnostics"):
            return {}
        ds = self.datasets["val"] if len(self.datasets["val"]) >= 2 else self.datasets["train"]
        x, gb, _ = next(iter(make_loader(ds, [list(range(min(len(ds), self.cfg.batch_size)))])))
        saved = rng_state()
        try:
            with torch.no_grad():
                return epoch_diagnostics(self.model, (x.to(self.device), gb.to(self.device)))
        finally:
            set_rng_state(saved)

    def fit(self, start_epoch: int, start_batch: int, resumed: bool, cancel: CancelLike) -> str:
        """The epochs from ``start_epoch``; returns the run's status."""
        epoch = self.epoch = start_epoch
        self.model.train()
        for epoch in range(start_epoch, self.cfg.epochs):
            if epoch == start_epoch and resumed:
                self.gen.set_state(self.epoch_gen_state)  # replay the interrupted epoch's order
            else:
                self.epoch_gen_state = self.gen.get_state()
            first = start_batch if epoch == start_epoch else 0
            cancelled, losses = self.run_epoch(epoch, first, cancel)
            if cancelled:
                self.epoch = epoch
                return "cancelled"
            stop = self.end_epoch(epoch, losses)
            self.epoch = epoch + 1
            if stop:
                return "early_stopped"
        return "completed"

    def test(self) -> dict[str, float]:
        """Recalls on the test tiles with the best weights (logged as ``kind: test``)."""
        if len(self.datasets["test"]) < 2:
            return {}
        if self.files.best.is_file():
            self.model.load_state_dict(load_checkpoint(self.files.best)["model"])
        tm = evaluate_retrieval(
            self.model, self.datasets["test"], device=self.device, batch_size=self.cfg.batch_size
        )
        if self.dd.main:
            b = self.best.epoch
            self.log.write(
                {
                    "kind": "test",
                    "epoch": b if b is not None else self.epoch,
                    "step": self.global_step,
                    "best_epoch": b,
                    **{f"test/{k}": v for k, v in tm.items()},
                }
            )
        return tm


# ----------------------------------------------------------------------------- train()


def train(
    cfg: TrainConfig,
    *,
    callbacks: Any = None,
    cancel: CancelLike = None,
    resume: bool = False,
    split: str | os.PathLike[str] | None = None,
    slides: Sequence[SlideTiles] | None = None,
) -> RunResult:
    """Train (or fine-tune) SIGMMA as configured, in ``cfg.run_dir``.

    Parameters
    ----------
    cfg
        The configuration.
    callbacks
        A :class:`TrainCallback` (or any object with some of its methods), a list of them,
        or a dict of those functions.
    cancel
        ``threading.Event`` or callable; checked before every optimiser step. On cancel a
        checkpoint is written and the result's status is ``"cancelled"``.
    resume
        Continue from ``<run>/checkpoints/last.pt`` exactly where it stopped.
    split
        A ``split.json`` to use instead of making one (baselines and ablations trained on
        exactly the split of another run); it is copied into the run folder.
    slides
        Prepared slides (:class:`~napari_sigmma.tiles.dataset.SlideTiles`, e.g. built in
        memory by ``bench --gpu``) instead of reading ``cfg.data``, which then only names
        them (one name each).

    Returns
    -------
    RunResult
    """
    import torch

    from napari_sigmma.device import resolve_device
    from napari_sigmma.models.sigmma import SigmmaModel
    from napari_sigmma.tiles.dataset import PairedTileDataset

    t_start = time.perf_counter()
    files = _RunFiles(Path(cfg.run_dir))
    cbs = callback_list(callbacks)
    dd = setup_distributed(cfg.device)
    lock = RunLock(files.run)
    session: _Session | None = None
    try:
        device = rank_device(resolve_device(cfg.device), dd)
        check_run_dir_outside_data(files.run, list(cfg.data))
        if dd.main:
            check_writable_dir(files.run)  # fail before minutes of data preparation
            lock.acquire()  # one training process per run folder
        ckpt = _open_checkpoint(cfg, files, resume)
        dd.barrier()

        seed_everything(cfg.seed)
        data = _prepare_data(cfg, files, dd, ckpt=ckpt, split=split, cancel=cancel, given=slides)
        if data is None:
            return RunResult("cancelled", files.run, 0, 0, seconds=time.perf_counter() - t_start)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and rerun
        model = SigmmaModel(cfg.model, data.featurizer.n_features, len(data.genes)).to(device)
        cancelled, crop_feats = _model_inputs(model, data, cfg, files, dd, device, cbs, cancel)
        if cancelled:
            return RunResult("cancelled", files.run, 0, 0, seconds=time.perf_counter() - t_start)
        datasets = {
            k: PairedTileDataset(data.slides, v, crop_features=crop_feats)
            for k, v in data.entries.items()
        }
        session = _Session(cfg, model, data, datasets, files, dd, device, cbs)
        start_epoch, start_batch = session.restore(ckpt) if ckpt is not None else (0, 0)
        if dd.main and ckpt is not None:
            trim_metrics(files.run / "metrics.jsonl", session.global_step, start_epoch)
        session.log = RunLog(files.run, enabled=dd.main, purge_step=session.global_step + 1)
        if dd.main:
            total = cfg.epochs * session.steps_per_epoch
            _fire(cbs, "on_train_start", total, session.global_step)
        status = session.fit(start_epoch, start_batch, ckpt is not None, cancel)
        test_metrics = session.test() if status != "cancelled" else {}
        dd.barrier()
        return RunResult(
            status=status,
            run_dir=files.run,
            epoch=int(session.epoch),
            global_step=int(session.global_step),
            best_epoch=session.best.epoch,
            best_score=session.best.score,
            last_checkpoint=files.last if files.last.is_file() else None,
            best_checkpoint=files.best if files.best.is_file() else None,
            val_metrics=session.val_metrics,
            test_metrics=test_metrics,
            step_losses=session.step_losses,
            n_tiles=data.counts(),
            seconds=time.perf_counter() - t_start,
        )
    finally:
        if session is not None and session.log is not None:
            session.log.close()
        lock.release()
        dd.teardown()
