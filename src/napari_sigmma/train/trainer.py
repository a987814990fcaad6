"""The training loop: data preparation, optimisation, validation, checkpoints, resume, DDP.

:func:`train` runs one configuration (:class:`~napari_sigmma.train.config.TrainConfig`) in
its run folder::

    <run>/config.yaml      the configuration (plain YAML)
    <run>/split.json       which tile is train / val / test (spatial blocks)
    <run>/features.npz     the node-feature transform (also inside every checkpoint)
    <run>/metrics.jsonl    one JSON line per optimiser step, per validation, and the test
    <run>/checkpoints/last.pt, best.pt
    <run>/cache/           frozen-backbone crop features (and tile images when not frozen)

Exactness of resume. The data order of an epoch is a permutation drawn from a dedicated
``torch.Generator``; a checkpoint holds that generator's state at the start of the epoch
and the position (micro-batch) inside it, plus the torch / CUDA / numpy / python RNG states
at that position. Checkpoints are only taken at optimiser-step boundaries (a cancel in the
middle of a gradient-accumulation window drops the partial window and records the state
of its start), so a resumed run replays exactly the same steps as an uninterrupted one.

Frozen backbones: the 21 crop features of every tile are computed once, stored as ``.npy``
under ``<cache>/<slide hash>-<grid key>/<backbone key>.npy`` (+ ``.json`` listing the tile
ids), and epochs only run the image heads and the graph encoder.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised from
``env://`` (NCCL on CUDA, gloo on CPU), the model is wrapped in DistributedDataParallel,
every rank draws the same permutation and takes its ``rank::world`` share (padded to equal
length, as ``DistributedSampler`` does), and the loss gathers embeddings across ranks for
the InfoNCE negatives. Rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.errors import CancelLike, SigmmaError, is_cancelled

if TYPE_CHECKING:
    from napari_sigmma.tiles.dataset import PairedTileDataset, SlideTiles
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.split import TileSplit
    from napari_sigmma.train.config import TrainConfig

CKPT_FORMAT = "napari-sigmma-checkpoint"
CKPT_VERSION = 1
# Settings that must not change when resuming (they change the data or the model).
_RESUME_LOCKED = (
    "data",
    "tile_px",
    "target_mpp",
    "min_tissue",
    "min_cells",
    "graph_method",
    "graph_k",
    "graph_radius_um",
    "graph_max_dist_um",
    "node_obsm",
    "n_pca",
    "split_block",
    "split_fractions",
    "split_seed",
    "split_by_slide",
    "batch_size",
    "grad_accum",
    "seed",
    "model",
)


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

    def on_step(self, step: int, epoch: int, loss: float, parts: dict[str, float]) -> None:
        """After every optimiser step (``step`` counts from 1)."""

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """After every epoch (``epoch`` counts from 0), with its validation metrics."""

    def on_checkpoint(self, path: Path) -> None:
        """After a checkpoint file is written."""


def _callback_list(callbacks: Any) -> list[Any]:
    if callbacks is None:
        return []
    if isinstance(callbacks, Mapping):

        class _FromMapping(TrainCallback):
            pass

        cb = _FromMapping()
        for k, v in callbacks.items():
            if k not in ("on_step", "on_epoch", "on_checkpoint"):
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


# ----------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # Disk full, read-only or vanished folder: the previous file (if any) is untouched.
        with contextlib.suppress(OSError):
            tmp.unlink()
        why = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise SigmmaError(f"cannot write checkpoint: {why}", path=path) from err
    _fsync_dir(path.parent)
    return path


def check_writable_dir(path: str | os.PathLike[str]) -> None:
    """Raise :class:`SigmmaError` unless ``path`` is (or can be created as) a writable folder.

    Nothing is created: the nearest existing ancestor must be a folder that accepts a file
    (a probe temp file, removed at once; ``os.access`` is not enough when running as root).
    """
    import tempfile

    p = Path(path).absolute()
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise SigmmaError(f"cannot write here: {anc} is a file, not a folder", path=p)
    try:
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as err:
        raise SigmmaError(f"cannot write here: {err.strerror or err}", path=p) from err


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no arbitrary pickles)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise SigmmaError("checkpoint not found", path=path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / foreign files
        # torch's weights_only refusal is many lines long: keep one (CLI messages are one line)
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise SigmmaError(
            f"cannot load checkpoint ({type(err).__name__}: {first}); the file is corrupt, "
            "truncated or holds more than plain tensors (refused without running it)",
            path=path,
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise SigmmaError("not a napari-sigmma checkpoint", path=path)
    return ckpt


def model_from_checkpoint(
    ckpt: dict[str, Any] | str | os.PathLike[str], *, path: str | os.PathLike[str] | None = None
) -> tuple[Any, Any]:
    """Rebuild ``(SigmmaModel, NodeFeaturizer)`` from a checkpoint (dict or path).

    The backbone is built without downloading weights (its trained/frozen weights are in
    the checkpoint). Weights that do not fit the checkpoint's own model config (another
    backbone's, edited files) raise :class:`SigmmaError` naming ``path``.
    """
    from napari_sigmma.models.sigmma import ModelConfig, SigmmaModel
    from napari_sigmma.tiles.features import NodeFeaturizer

    if not isinstance(ckpt, dict):
        path = ckpt if path is None else path
        ckpt = load_checkpoint(ckpt)
    try:
        mcfg = ModelConfig.from_dict(dict(ckpt["config"]["model"]))
        # The state dict carries every backbone weight: skip the pretrained load.
        build_cfg = ModelConfig.from_dict(
            {**mcfg.to_dict(), "pretrained": False, "checkpoint": None}
        )
        model = SigmmaModel(build_cfg, int(ckpt["n_node_features"]), int(ckpt["n_genes"]))
        model.cfg = mcfg
        model.load_state_dict(ckpt["model"])
        model.apply_finetune_policy()
        feat = NodeFeaturizer.from_arrays(ckpt["features"])
    except SigmmaError as err:
        raise SigmmaError(err.problem, path=err.path or path) from err
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        why = "; ".join(lines[:2])[:300] or type(err).__name__
        raise SigmmaError(
            f"checkpoint does not match its model ({type(err).__name__}: {why})", path=path
        ) from err
    return model, feat


# ----------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global state third-party code uses)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()  # noqa: NPY002
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [int(py[0]), [int(v) for v in py[1]], py[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            n["key"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # we initialised the process group (and tear it down)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def any_flag(self, flag: bool) -> bool:
        """True when ``flag`` is set on any rank (keeps all ranks in step)."""
        if self.world == 1:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t.item()) / self.world


def _setup_dist(device_name: str) -> _Dist:
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    name = str(device_name or "auto").lower()
    use_cuda = torch.cuda.is_available() and (name == "auto" or name.startswith("cuda"))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


# ----------------------------------------------------------------------------- data


@dataclass
class RunData:
    """Prepared slides, split and features of a run."""

    slides: list[SlideTiles]
    split: TileSplit
    featurizer: NodeFeaturizer
    genes: list[str]
    entries: dict[str, list[tuple[int, int]]]

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.entries.items()}


# Prepared slides of recent runs in this process, so repeated runs on the same data (a
# widget retraining, a resumed run, tests) skip re-reading and re-tiling. Keyed by the data
# path and its modification times and by every setting the preparation depends on.
_SLIDE_CACHE: OrderedDict[tuple, SlideTiles] = OrderedDict()
_SLIDE_CACHE_SIZE = 4


def _data_stamp(path: str) -> tuple:
    p = Path(path)
    stamp: list[Any] = [str(p.resolve())]
    with contextlib.suppress(OSError):
        stamp.append(p.stat().st_mtime_ns)
        if p.is_dir():
            stamp.extend(sorted((c.name, c.stat().st_mtime_ns) for c in p.iterdir()))
    return tuple(stamp)


def load_slides(
    cfg: TrainConfig, *, cancel: CancelLike = None, reuse: bool = True
) -> list[SlideTiles]:
    """Read every slide of ``cfg.data`` and build its grid and per-tile cell graphs.

    With ``reuse``, slides prepared by an earlier call in this process with the same data
    (unchanged on disk) and the same tiling / graph settings are reused.
    """
    from napari_sigmma.io import load_any, slide_names
    from napari_sigmma.tiles.dataset import SlideTiles, prepare_slide
    from napari_sigmma.tiles.paired import PairedSlide

    if not cfg.data:
        raise SigmmaError("no training data given (config 'data' is empty)")
    settings = graph_settings(cfg)
    out = []
    for path, name in zip(cfg.data, slide_names(cfg.data), strict=True):
        if is_cancelled(cancel):
            break
        key = (
            _data_stamp(path),
            name,
            cfg.node_obsm,
            int(cfg.tile_px),
            float(cfg.target_mpp),
            float(cfg.min_tissue),
            repr(settings),
        )
        hit = _SLIDE_CACHE.get(key) if reuse else None
        if hit is not None:
            _SLIDE_CACHE.move_to_end(key)
            # A fresh holder: features and images are per run.
            out.append(
                SlideTiles(paired=hit.paired, grid=hit.grid, cells=hit.cells, settings=hit.settings)
            )
            continue
        sdata = load_any(path)
        paired = PairedSlide.from_sdata(sdata, name=name, node_obsm=cfg.node_obsm)
        if paired.n_cells == 0:
            raise SigmmaError("the slide has no cell table to train on", path=path)
        st = prepare_slide(
            paired,
            tile_px=cfg.tile_px,
            target_mpp=cfg.target_mpp,
            min_tissue=cfg.min_tissue,
            settings=settings,
        )
        if len(st.grid) == 0:
            h, w = paired.image.shape[:2]
            raise SigmmaError(
                f"no tiles: the slide ({w}x{h} px at {paired.he_mpp:g} µm/px) holds no whole "
                f"{cfg.tile_px}-px tile at {cfg.target_mpp:g} µm/px with ≥ "
                f"{cfg.min_tissue:g} tissue",
                path=path,
            )
        out.append(st)
        if reuse:
            _SLIDE_CACHE[key] = st
            while len(_SLIDE_CACHE) > _SLIDE_CACHE_SIZE:
                _SLIDE_CACHE.popitem(last=False)
    return out


def graph_settings(cfg: TrainConfig) -> Any:
    """The :class:`~napari_sigmma.tiles.dataset.GraphSettings` of a config."""
    from napari_sigmma.tiles.dataset import GraphSettings

    return GraphSettings(
        method=cfg.graph_method,
        k=int(cfg.graph_k),
        radius_um=float(cfg.graph_radius_um),
        max_dist_um=cfg.graph_max_dist_um,
        min_cells=int(cfg.min_cells),
    )


def make_split(cfg: TrainConfig, slides: list[SlideTiles]) -> TileSplit:
    """Blocked split of the valid tiles of every slide."""
    from napari_sigmma.tiles.split import block_split

    parts = []
    for s in slides:
        v = np.flatnonzero(s.valid)
        parts.append((s.name, s.grid.rows[v], s.grid.cols[v], [s.grid.tile_ids[i] for i in v]))
    return block_split(
        parts,
        block=cfg.split_block,
        fractions=cfg.split_fractions,
        seed=cfg.seed if cfg.split_seed is None else cfg.split_seed,
        by_slide=cfg.split_by_slide,
        hashes=[s.paired.content_hash() for s in slides],
    )


def split_entries(split: TileSplit, slides: list[SlideTiles]) -> dict[str, list[tuple[int, int]]]:
    """``(slide index, tile index)`` of every tile per split (checks the split matches)."""
    entries: dict[str, list[tuple[int, int]]] = {"train": [], "val": [], "test": []}
    for si, s in enumerate(slides):
        try:
            ss = split.slide(s.name)
        except KeyError:
            raise SigmmaError(f"split.json has no slide named {s.name!r}") from None
        pos = {t: i for i, t in enumerate(s.grid.tile_ids)}
        for tid, which in zip(ss.tile_ids, ss.split, strict=True):
            ti = pos.get(tid, -1)
            if ti < 0 or not s.cells[ti].valid:
                raise SigmmaError(
                    f"split.json lists tile {tid} of {s.name!r}, which the data no longer has"
                )
            entries[which].append((si, ti))
    return entries


def fit_featurizer(
    cfg: TrainConfig, slides: list[SlideTiles], train: list[tuple[int, int]]
) -> tuple[NodeFeaturizer, list[str]]:
    """Node features fitted on the cells of the TRAINING tiles only."""
    import scipy.sparse as sp

    from napari_sigmma.tiles.features import NodeFeaturizer, align_counts

    genes = list(slides[0].paired.genes)
    for s in slides[1:]:
        have = set(s.paired.genes)
        genes = [g for g in genes if g in have]
    if not genes:
        raise SigmmaError("the slides share no gene")
    blocks = []
    for si, s in enumerate(slides):
        tiles = [ti for sj, ti in train if sj == si]
        if not tiles:
            continue
        cells = np.concatenate([s.cells[t].cells for t in tiles])
        blocks.append(align_counts(s.paired.counts[cells], s.paired.genes, genes))
    if not blocks:
        raise SigmmaError(
            "no training tiles: every tile has fewer than min_cells cells or the split gave "
            "none to training"
        )
    X = sp.vstack(blocks).tocsr()
    if cfg.node_obsm:
        totals = np.asarray(X.sum(axis=1)).ravel()
        ts = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
        width = slides[0].paired.node_features.shape[1]  # type: ignore[union-attr]
        return NodeFeaturizer.from_obsm(cfg.node_obsm, width, genes, target_sum=ts), genes
    return NodeFeaturizer.fit_pca(X, genes, n_components=cfg.n_pca), genes


def _load_features(path: Path) -> NodeFeaturizer:
    from napari_sigmma.tiles.features import NodeFeaturizer

    return NodeFeaturizer.load(path)


def prepare_run_data(
    cfg: TrainConfig,
    *,
    split_path: Path | None = None,
    cancel: CancelLike = None,
    featurizer: NodeFeaturizer | None = None,
    slides: list[SlideTiles] | None = None,
) -> RunData | None:
    """Slides (loaded unless given), split (read from ``split_path`` when it exists), node
    features (fitted on the training tiles, unless ``featurizer`` — e.g. a resumed
    checkpoint's — is given)."""
    from napari_sigmma.tiles.split import TileSplit

    if slides is None:
        slides = load_slides(cfg, cancel=cancel)
    if is_cancelled(cancel):
        return None
    if split_path is not None and split_path.is_file():
        split = TileSplit.load(split_path)
    else:
        split = make_split(cfg, slides)
    entries = split_entries(split, slides)
    if featurizer is None:
        featurizer, genes = fit_featurizer(cfg, slides, entries["train"])
    else:
        genes = list(featurizer.genes)
    for s in slides:
        s.set_features(featurizer)
    return RunData(slides, split, featurizer, genes, entries)


# ----------------------------------------------------------------------------- features cache


def backbone_key(model: Any) -> str:
    """Cache key of a model's crop features: backbone name + a hash of the backbone's
    weights, input size and multi-crop mode.

    Hashing the weights (not their source) keeps the key right for randomly initialised
    backbones and for checkpoints replaced in place; it costs about a second per GB.
    """
    import hashlib

    import torch

    h = hashlib.sha1()
    bb = model.backbone
    h.update(f"{bb.name}|{bb.input_size}|{model.cfg.fast_multicrop}".encode())
    for name, t in model.image.backbone.state_dict().items():
        h.update(name.encode())
        arr = t.detach().cpu().contiguous()
        h.update(str(tuple(arr.shape)).encode())
        h.update(arr.reshape(-1).view(torch.uint8).numpy().tobytes())
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model.cfg.backbone)
    return f"{safe}-{h.hexdigest()[:12]}"


def cached_crop_features(
    model: Any,
    slide: SlideTiles,
    tiles: np.ndarray,
    cache_dir: Path,
    *,
    device: Any,
    batch_size: int = 8,
    cancel: CancelLike = None,
    write: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray | None:
    """``(T, 21, C)`` float32 crop features of ``tiles`` of ``slide`` (other rows zero).

    Read from ``<cache_dir>/<slide hash>-<grid key>/<backbone key>.npy`` where present;
    the missing tiles are encoded (eval, no grad) and the file is rewritten (when
    ``write``). Returns ``None`` when cancelled.
    """
    import torch

    from napari_sigmma.device import autocast
    from napari_sigmma.files import atomic_save_npy
    from napari_sigmma.tiles.grid import read_tile

    folder = cache_dir / f"{slide.paired.content_hash()}-{slide.grid_key()}"
    key = backbone_key(model)
    npy, index = folder / f"{key}.npy", folder / f"{key}.json"
    have: dict[str, np.ndarray] = {}
    if npy.is_file() and index.is_file():
        try:
            ids = json.loads(index.read_text())["tile_ids"]
            arr = np.load(npy, allow_pickle=False)
            if arr.shape[0] == len(ids):
                have = {t: arr[i] for i, t in enumerate(ids)}
        except (OSError, ValueError, KeyError):
            have = {}
    ids_all = slide.grid.tile_ids
    missing = [int(t) for t in tiles if ids_all[int(t)] not in have]
    if missing:
        model.eval()
        # Hold the source level in memory while reading many tiles of this slide.
        level = slide.paired.image.best_level(slide.grid.target_mpp)
        held = level not in slide.paired.image._memory and slide.paired.image.hold_level(level)
        try:
            done = 0
            for start in range(0, len(missing), batch_size):
                if is_cancelled(cancel):
                    return None
                chunk = missing[start : start + batch_size]
                if slide.images is not None:
                    imgs = slide.images[chunk]
                else:
                    imgs = np.stack([read_tile(slide.paired, slide.grid, t) for t in chunk])
                x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().to(device)
                with torch.no_grad(), autocast(device):
                    f = model.backbone_features(x)
                f = f.float().cpu().numpy()
                for t, row in zip(chunk, f, strict=True):
                    have[ids_all[t]] = row
                done += len(chunk)
                if progress is not None:
                    progress(done, len(missing))
        finally:
            if held:
                slide.paired.image.release(level)
        if write:
            ids = sorted(have)
            atomic_save_npy(npy, np.stack([have[t] for t in ids]).astype(np.float32))
            tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"tile_ids": ids, "backbone": model.cfg.backbone}))
            os.replace(tmp, index)
    dim = next(iter(have.values())).shape if have else (21, 1)
    out = np.zeros((len(ids_all), *dim), dtype=np.float32)
    for t in tiles:
        out[int(t)] = have[ids_all[int(t)]]
    return out


# ----------------------------------------------------------------------------- batching


def epoch_batches(
    perm: np.ndarray, batch_size: int, *, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This rank's micro-batches of one epoch.

    ``perm`` (the same on every rank) is padded by wrapping to a multiple of ``world``
    and ``rank::world`` taken, like ``DistributedSampler``; the share is cut into batches of
    ``batch_size``; a last batch smaller than 2 is dropped (a contrastive batch needs a
    negative), so every rank has the same number and sizes of batches.
    """
    perm = np.asarray(perm, dtype=np.int64)
    n = perm.size
    if world > 1:
        total = math.ceil(n / world) * world
        if total > n:
            perm = np.concatenate([perm, perm[: total - n]])
        perm = perm[rank::world]
    out = [perm[i : i + batch_size].tolist() for i in range(0, perm.size, batch_size)]
    if out and len(out[-1]) < 2:
        out.pop()
    return out


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


# ----------------------------------------------------------------------------- encoding


def encode_entries(
    model: Any,
    dataset: PairedTileDataset,
    *,
    device: Any,
    batch_size: int = 32,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """HE and ST embeddings ``{scale: (N, D)}`` of every item of ``dataset`` (eval mode)."""
    import torch

    from napari_sigmma.device import autocast
    from napari_sigmma.tiles.dataset import make_loader

    was_training = model.training
    model.eval()
    he: dict[str, list[np.ndarray]] = {}
    st: dict[str, list[np.ndarray]] = {}
    n = len(dataset)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    with torch.no_grad():
        for x, gb, _ in make_loader(dataset, batches):
            x, gb = x.to(device), gb.to(device)
            with autocast(device):
                img = model.image_heads(x) if x.ndim == 3 else model.encode_image(x)
                out = model.encode_graph(gb)
            for k, v in img.items():
                if k in ("micro", "meso", "macro"):
                    he.setdefault(k, []).append(v.float().cpu().numpy())
            for k, v in out.emb.items():
                st.setdefault(k, []).append(v.float().cpu().numpy())
    model.train(was_training)
    return (
        {k: np.concatenate(v) for k, v in he.items()},
        {k: np.concatenate(v) for k, v in st.items()},
    )


def evaluate_retrieval(
    model: Any, dataset: PairedTileDataset, *, device: Any, batch_size: int = 32
) -> dict[str, float]:
    """Recall@5/10/15% both directions per scale, and ``score`` = mean Recall@5%."""
    from napari_sigmma.metrics import retrieval_metrics

    if len(dataset) < 2:
        return {}
    he, st = encode_entries(model, dataset, device=device, batch_size=batch_size)
    m = retrieval_metrics(he, st)
    scales = [s for s in model.cfg.scales if s in he and s in st]
    at5 = [m[f"{s}/{d}@5"] for s in scales for d in ("he2st", "st2he")]
    m["score"] = float(np.mean(at5)) if at5 else float("nan")
    m["n_tiles"] = len(dataset)
    return m


# ----------------------------------------------------------------------------- the loop


def _check_resume_config(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    now = cfg.to_dict()
    diff = [k for k in _RESUME_LOCKED if now.get(k) != saved.get(k)]
    if diff:
        raise SigmmaError(
            "cannot resume: the config differs from the checkpoint's in "
            + ", ".join(diff)
            + " (start a new run folder instead)",
            path=path,
        )


def _trim_metrics(path: Path, step: int, epoch: int) -> None:
    """Drop log lines written after the checkpoint we resume from."""
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
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def _param_groups(model: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    backbone_ids = {id(p) for p in model.image.backbone.parameters()}
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bb = id(p) in backbone_ids
        decay = p.ndim >= 2 and "logit_scale" not in name
        groups.setdefault((is_bb, decay), []).append(p)
    out = []
    for (is_bb, decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": cfg.backbone_lr if is_bb else cfg.lr,
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
        )
    return out


def train(
    cfg: TrainConfig,
    *,
    callbacks: Any = None,
    cancel: CancelLike = None,
    resume: bool = False,
    split: str | os.PathLike[str] | None = None,
) -> RunResult:
    """Train (or fine-tune) SIGMMA as configured, in ``cfg.run_dir``.

    Parameters
    ----------
    cfg
        The configuration.
    callbacks
        A :class:`TrainCallback` (or any object with some of ``on_step(step, epoch, loss,
        parts)``, ``on_epoch(epoch, metrics)``, ``on_checkpoint(path)``), a list of them, or
        a dict of those functions.
    cancel
        ``threading.Event`` or callable; checked before every micro-batch. On cancel a
        checkpoint is written and the result's status is ``"cancelled"``.
    resume
        Continue from ``<run>/checkpoints/last.pt`` exactly where it stopped.
    split
        A ``split.json`` to use instead of making one (baselines and ablations trained on
        exactly the split of another run); it is copied into the run folder.

    Returns
    -------
    RunResult
    """
    import torch

    from napari_sigmma.device import autocast, resolve_device
    from napari_sigmma.models.sigmma import SigmmaModel
    from napari_sigmma.tiles.dataset import PairedTileDataset, make_loader

    t_start = time.perf_counter()
    run = Path(cfg.run_dir)
    ckpt_dir = run / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    metrics_path = run / "metrics.jsonl"
    cbs = _callback_list(callbacks)
    dd = _setup_dist(cfg.device)
    try:
        device = resolve_device(cfg.device)
        if device.type == "cuda" and dd.world > 1:
            device = torch.device("cuda", dd.local_rank)
            torch.cuda.set_device(device)

        ckpt = None
        saved_feat = None
        if resume:
            from napari_sigmma.tiles.features import NodeFeaturizer

            ckpt = load_checkpoint(last_path)
            _check_resume_config(cfg, ckpt["config"], last_path)
            saved_feat = NodeFeaturizer.from_arrays(ckpt["features"])
            if not (run / "split.json").is_file():
                raise SigmmaError("cannot resume: split.json is missing", path=run)
        elif last_path.exists():
            raise SigmmaError(
                "the run folder already holds a checkpoint; use resume or another folder",
                path=run,
            )
        if dd.main:
            check_writable_dir(run)  # fail before minutes of data preparation
        dd.barrier()

        seed_everything(cfg.seed)
        # Every rank reads its slides; rank 0 then makes the split and the node features
        # and writes them, and the other ranks read what it wrote.
        slides = load_slides(cfg, cancel=cancel)
        data = None
        if dd.main:
            run.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(run / "config.yaml")
            data = prepare_run_data(
                cfg,
                split_path=run / "split.json"
                if resume
                else (Path(split) if split is not None else None),
                cancel=cancel,
                featurizer=saved_feat,
                slides=slides,
            )
            if data is not None:
                data.split.save(run / "split.json")
                data.featurizer.save(run / "features.npz")
        dd.barrier()
        rank0_ready = (run / "split.json").is_file() and (
            saved_feat is not None or (run / "features.npz").is_file()
        )
        if not dd.main and len(slides) == len(cfg.data) and rank0_ready:
            data = prepare_run_data(
                cfg,
                split_path=run / "split.json",
                featurizer=saved_feat
                if saved_feat is not None
                else _load_features(run / "features.npz"),
                slides=slides,
            )
        if data is None or dd.any_flag(is_cancelled(cancel)):
            return RunResult("cancelled", run, 0, 0, seconds=time.perf_counter() - t_start)
        if not data.entries["train"]:
            raise SigmmaError("no training tiles (check min_cells, min_tissue and the split)")

        # Model (seeded: identical initial weights on every rank and every rerun).
        torch.manual_seed(cfg.seed)
        model = SigmmaModel(cfg.model, data.featurizer.n_features, len(data.genes))
        model.to(device)
        frozen = model.backbone_frozen and cfg.cache_features

        # Inputs: cached crop features (frozen backbone) or pre-extracted images. Rank 0
        # computes and writes the caches first; the other ranks then read them.
        crop_feats: list[np.ndarray] | None = None
        cache_dir = Path(cfg.feature_cache_dir) if cfg.feature_cache_dir else run / "cache"
        tile_dir = Path(cfg.tile_cache_dir) if cfg.tile_cache_dir else run / "cache"

        def inputs() -> list[np.ndarray] | bool | None:
            if not frozen:
                for s in data.slides:
                    s.load_images(tile_dir)
                return True
            feats = []
            for si, s in enumerate(data.slides):
                tiles = np.array(
                    sorted({t for k in data.entries.values() for sj, t in k if sj == si}),
                    dtype=np.int64,
                )
                f = cached_crop_features(
                    model, s, tiles, cache_dir, device=device, cancel=cancel, write=dd.main
                )
                if f is None:
                    return None
                feats.append(f)
            return feats

        got = inputs() if dd.main else None
        dd.barrier()
        if not dd.main:
            got = inputs()
        if dd.any_flag(got is None):
            return RunResult("cancelled", run, 0, 0, seconds=time.perf_counter() - t_start)
        if frozen:
            crop_feats = got  # type: ignore[assignment]
        datasets = {
            k: PairedTileDataset(data.slides, v, crop_features=crop_feats)
            for k, v in data.entries.items()
        }

        # Optimiser and schedule (in optimiser steps).
        params = _param_groups(model, cfg)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        n_train = len(datasets["train"])
        n_batches = len(
            epoch_batches(np.arange(n_train), cfg.batch_size, rank=dd.rank, world=dd.world)
        )
        steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
        if cfg.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, int(cfg.max_steps_per_epoch))
        if steps_per_epoch == 0:
            raise SigmmaError(f"only {n_train} training tile(s): need at least 2 per batch")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(cfg.epochs * steps_per_epoch, cfg.warmup_steps)
        )
        gen = torch.Generator()
        gen.manual_seed(int(cfg.seed) + 1)

        start_epoch, start_batch, global_step = 0, 0, 0
        best_score: float | None = None
        best_epoch: int | None = None
        bad_evals = 0
        epoch_gen_state = gen.get_state()
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            start_epoch = int(ckpt["epoch"])
            start_batch = int(ckpt["batch"])
            global_step = int(ckpt["global_step"])
            b = ckpt.get("best", {})
            best_score = b.get("score")
            best_epoch = b.get("epoch")
            bad_evals = int(b.get("bad_evals", 0))
            epoch_gen_state = ckpt["data_generator"]
            gen.set_state(epoch_gen_state)
            _set_rng_state(ckpt["rng"])
            if dd.main:
                _trim_metrics(metrics_path, global_step, start_epoch)

        ddp = None
        if dd.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        step_fn = ddp if ddp is not None else model

        def make_ckpt(epoch: int, batch: int, rng: dict[str, Any], gstate: Any) -> dict:
            return {
                "format": CKPT_FORMAT,
                "version": CKPT_VERSION,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": rng,
                "data_generator": gstate,
                "epoch": int(epoch),
                "batch": int(batch),
                "global_step": int(global_step),
                "steps_per_epoch": int(steps_per_epoch),
                "config": cfg.to_dict(),
                "features": {
                    k: (torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v)
                    for k, v in data.featurizer.to_arrays().items()
                },
                "genes": list(data.genes),
                "n_node_features": int(data.featurizer.n_features),
                "n_genes": len(data.genes),
                "best": {"score": best_score, "epoch": best_epoch, "bad_evals": bad_evals},
                "world_size": int(dd.world),
                "slides": [{"name": s.name, "hash": s.paired.content_hash()} for s in data.slides],
            }

        def write_ckpt(
            epoch: int, batch: int, rng: dict[str, Any], gstate: Any, *, best: bool = False
        ) -> None:
            if dd.main:  # only rank 0 builds and writes the checkpoint
                atomic_torch_save(make_ckpt(epoch, batch, rng, gstate), last_path)
                _fire(cbs, "on_checkpoint", last_path)
                if best:
                    _atomic_copy(last_path, best_path)
                    _fire(cbs, "on_checkpoint", best_path)
            dd.barrier()

        log_fh = open(metrics_path, "a") if dd.main else None

        def log(rec: dict[str, Any]) -> None:
            if log_fh is not None:
                log_fh.write(json.dumps(rec) + "\n")
                log_fh.flush()

        step_losses: list[float] = []
        val_metrics: dict[str, float] = {}
        status = "completed"
        epoch = start_epoch
        model.train()
        try:
            for epoch in range(start_epoch, cfg.epochs):
                if epoch == start_epoch and ckpt is not None:
                    gen.set_state(epoch_gen_state)  # replay the interrupted epoch's order
                else:
                    epoch_gen_state = gen.get_state()
                perm = torch.randperm(n_train, generator=gen).numpy()
                batches = epoch_batches(perm, cfg.batch_size, rank=dd.rank, world=dd.world)
                batches = batches[: steps_per_epoch * cfg.grad_accum]
                first = start_batch if epoch == start_epoch else 0
                windows = [
                    list(range(w, min(w + cfg.grad_accum, len(batches))))
                    for w in range(0, len(batches), cfg.grad_accum)
                ]
                loader_gen = torch.Generator()
                loader_gen.manual_seed(0)  # the loader's base seed must not touch torch's RNG
                loader = iter(
                    make_loader(
                        datasets["train"],
                        batches[first:],
                        num_workers=cfg.num_workers,
                        generator=loader_gen,
                    )
                )
                epoch_losses: list[float] = []
                cancelled = False
                for window in windows:
                    if window[0] < first:
                        continue
                    snap = _rng_state()  # state at this window's start (checkpoint point)
                    if dd.any_flag(is_cancelled(cancel)):
                        cancelled = True
                        write_ckpt(epoch, window[0], snap, epoch_gen_state)
                        break
                    opt.zero_grad(set_to_none=True)
                    w_loss, w_parts = 0.0, {}
                    for j, _bi in enumerate(window):
                        x, gb, _ = next(loader)
                        x, gb = x.to(device, non_blocking=True), gb.to(device)
                        last_in_window = j == len(window) - 1
                        sync = (
                            ddp.no_sync()
                            if ddp is not None and not last_in_window
                            else contextlib.nullcontext()
                        )
                        with sync:
                            with autocast(device):
                                out = step_fn(x, gb)
                            loss = out["loss"] / len(window)
                            loss.backward()
                        w_loss += float(out["loss"].detach()) / len(window)
                        for k, v in out["parts"].items():
                            w_parts[k] = w_parts.get(k, 0.0) + float(v) / len(window)
                    if cfg.grad_clip and cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(
                            [p for p in model.parameters() if p.requires_grad], cfg.grad_clip
                        )
                    lr_now = max(g["lr"] for g in opt.param_groups)  # this step's (head) lr
                    opt.step()
                    sched.step()
                    global_step += 1
                    w_loss = dd.mean(w_loss)
                    step_losses.append(w_loss)
                    epoch_losses.append(w_loss)
                    if dd.main:
                        log(
                            {
                                "kind": "step",
                                "step": global_step,
                                "epoch": epoch,
                                "loss": w_loss,
                                "parts": w_parts,
                                "lr": float(lr_now),
                                "temperature": float(model.temperature),
                            }
                        )
                        _fire(cbs, "on_step", global_step, epoch, w_loss, w_parts)
                    nxt = window[-1] + 1
                    if (
                        cfg.ckpt_every_steps
                        and global_step % int(cfg.ckpt_every_steps) == 0
                        and nxt < len(batches)
                    ):
                        write_ckpt(epoch, nxt, _rng_state(), epoch_gen_state)
                if cancelled:
                    status = "cancelled"
                    break

                # End of epoch: validation, early stopping, checkpoints.
                metrics: dict[str, float] = {
                    "train_loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan")
                }
                improved = False
                if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                    val = evaluate_retrieval(
                        model, datasets["val"], device=device, batch_size=cfg.batch_size
                    )
                    if val:
                        val_metrics = val
                        metrics.update({f"val/{k}": v for k, v in val.items()})
                        score = val["score"]
                        if best_score is None or score > best_score:
                            best_score, best_epoch, bad_evals, improved = score, epoch, 0, True
                        else:
                            bad_evals += 1
                    else:
                        improved = True  # nothing to validate on: the latest is the best
                        best_epoch = epoch
                model.train()
                if dd.main:
                    log({"kind": "epoch", "epoch": epoch, "step": global_step, **metrics})
                    _fire(cbs, "on_epoch", epoch, metrics)
                stop = bool(cfg.patience) and bad_evals >= int(cfg.patience)
                write_ckpt(epoch + 1, 0, _rng_state(), gen.get_state(), best=improved)
                epoch += 1
                if stop:
                    status = "early_stopped"
                    break
        finally:
            if log_fh is not None:
                log_fh.close()

        # Held-out test with the best weights.
        test_metrics: dict[str, float] = {}
        if status != "cancelled" and len(datasets["test"]) >= 2:
            if best_path.is_file():
                model.load_state_dict(load_checkpoint(best_path)["model"])
            test_metrics = evaluate_retrieval(
                model, datasets["test"], device=device, batch_size=cfg.batch_size
            )
            if dd.main:
                with open(metrics_path, "a") as fh:
                    fh.write(
                        json.dumps(
                            {
                                "kind": "test",
                                "epoch": best_epoch if best_epoch is not None else epoch,
                                "step": global_step,
                                "best_epoch": best_epoch,
                                **{f"test/{k}": v for k, v in test_metrics.items()},
                            }
                        )
                        + "\n"
                    )
        dd.barrier()
        return RunResult(
            status=status,
            run_dir=run,
            epoch=int(epoch),
            global_step=int(global_step),
            best_epoch=best_epoch,
            best_score=best_score,
            last_checkpoint=last_path if last_path.is_file() else None,
            best_checkpoint=best_path if best_path.is_file() else None,
            val_metrics=val_metrics,
            test_metrics=test_metrics,
            step_losses=step_losses,
            n_tiles=data.counts(),
            seconds=time.perf_counter() - t_start,
        )
    finally:
        if dd.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
