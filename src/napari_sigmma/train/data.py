"""What training reads: data paths, slides, the split, node features, cached crop features
and the batches of an epoch.

Frozen backbones: the 21 crop features of every tile are computed once, stored as ``.npy``
under ``<cache>/<slide hash>-<grid key>/<backbone key>.npy`` (+ ``.json`` listing the tile
ids), and epochs only run the image heads and the graph encoder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.errors import CancelLike, SigmmaError, is_cancelled
from napari_sigmma.train.checkpoint import disk_errors, graph_settings

if TYPE_CHECKING:
    from napari_sigmma.tiles.dataset import SlideTiles
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.split import TileSplit
    from napari_sigmma.train.config import TrainConfig


def expand_data(path: str | os.PathLike[str]) -> list[Path]:
    """A data path, or — for a plain folder — the data sets directly inside it."""
    from napari_sigmma.io import detect_kind

    p = Path(path)
    if not p.exists():
        raise SigmmaError("not found", path=p)
    if detect_kind(p) is not None:
        return [p.resolve()]
    if p.is_dir():
        found = sorted(c.resolve() for c in p.iterdir() if detect_kind(c) is not None)
        if found:
            return found
    # Let the reader explain what is wrong with it.
    return [p.resolve()]


# ----------------------------------------------------------------------------- slides and split


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
        raise no_training_tiles(cfg, slides)
    X = sp.vstack(blocks).tocsr()
    if cfg.node_obsm:
        totals = np.asarray(X.sum(axis=1)).ravel()
        ts = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
        width = slides[0].paired.node_features.shape[1]  # type: ignore[union-attr]
        return NodeFeaturizer.from_obsm(cfg.node_obsm, width, genes, target_sum=ts), genes
    return NodeFeaturizer.fit_pca(X, genes, n_components=cfg.n_pca), genes


def no_training_tiles(cfg: TrainConfig, slides: list[SlideTiles]) -> SigmmaError:
    """The error for a run without training tiles: names the data and, when most cells of
    a slide lie outside its H&E image, points at the alignment."""
    where = cfg.data[0] if len(cfg.data) == 1 else None
    names = "" if where else " in " + ", ".join(str(d) for d in cfg.data)
    hints = []
    for s in slides:
        h, w = s.paired.image.shape[:2]
        xy = np.asarray(s.paired.cells_px, dtype=np.float64).reshape(-1, 2)
        if len(xy) == 0:
            hints.append(f"{s.name} has no cells")
            continue
        inside = np.isfinite(xy).all(axis=1) & (xy[:, 0] >= 0) & (xy[:, 1] >= 0)
        inside &= (xy[:, 0] < w) & (xy[:, 1] < h)
        frac = float(inside.mean())
        if frac < 0.5:
            hints.append(
                f"only {frac:.0%} of the {len(xy)} cells of {s.name} lie inside its H&E image "
                "(check the H&E alignment, e.g. he_imagealignment.csv)"
            )
    why = (
        "; ".join(hints)
        if hints
        else (
            f"every tile has fewer than min_cells={cfg.min_cells} cells or the split gave none "
            "to training"
        )
    )
    return SigmmaError(f"no training tiles{names}: {why}", path=where)


def load_features(path: Path) -> NodeFeaturizer:
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
            _write_feature_cache(npy, index, have, model.cfg.backbone)
    dim = next(iter(have.values())).shape if have else (21, 1)
    out = np.zeros((len(ids_all), *dim), dtype=np.float32)
    for t in tiles:
        out[int(t)] = have[ids_all[int(t)]]
    return out


def _write_feature_cache(
    npy: Path, index: Path, have: dict[str, np.ndarray], backbone: str
) -> None:
    """Write the crop-feature cache (array, then its tile index); a full disk is reported
    as such and leaves no temp file."""
    from napari_sigmma.files import atomic_save_npy

    ids = sorted(have)
    tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
    try:
        with disk_errors(npy, "the crop-feature cache"):
            atomic_save_npy(npy, np.stack([have[t] for t in ids]).astype(np.float32))
        with disk_errors(index, "the crop-feature cache"):
            tmp.write_text(json.dumps({"tile_ids": ids, "backbone": backbone}))
            os.replace(tmp, index)
    finally:
        for left in [tmp, *npy.parent.glob(f".{npy.name}.{os.getpid()}.*.tmp")]:
            with contextlib.suppress(OSError):
                left.unlink()


# ----------------------------------------------------------------------------- batching


def epoch_batches(
    perm: np.ndarray, batch_size: int, *, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This rank's micro-batches of one epoch.

    ``perm`` (the same on every rank) is padded by wrapping to a multiple of ``world``
    and ``rank::world`` taken, like ``DistributedSampler``; the share is cut into batches of
    ``batch_size``, so every rank has the same number and sizes of batches.

    No tiny contrastive batches: a last batch smaller than half the batch size is MERGED
    into the one before it (which grows to at most 1.5 × ``batch_size``; a 1-tile
    remainder is merged too when ``batch_size`` is 2). InfoNCE on a
    2-tile batch is nearly trivial (loss ≈ 0.01 at one negative) and drags the epoch's mean
    loss and gradient; dropping it instead would leave up to half a batch of tiles unseen
    every epoch, which on the small data sets this plugin trains on is a real share of the
    data. A lone batch (the whole share) is kept when it holds ≥ 2 tiles and dropped
    otherwise (a contrastive batch needs a negative).
    """
    perm = np.asarray(perm, dtype=np.int64)
    n = perm.size
    if world > 1:
        total = math.ceil(n / world) * world
        if total > n:
            perm = np.concatenate([perm, perm[: total - n]])
        perm = perm[rank::world]
    out = [perm[i : i + batch_size].tolist() for i in range(0, perm.size, batch_size)]
    if len(out) >= 2 and (2 * len(out[-1]) < batch_size or len(out[-1]) < 2):
        out[-2].extend(out.pop())
    if out and len(out[-1]) < 2:
        out.pop()
    return out
