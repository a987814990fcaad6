"""Training configuration: one dataclass (with the model's :class:`ModelConfig` nested),
saved to and loaded from YAML.

Defaults are chosen so that ``napari-sigmma train --data <sample> --epochs 1`` finishes in a
few minutes on a CPU: the ``efficientnet_lite0`` backbone (the one backbone with offline
ImageNet weights) stays frozen and its crop features are computed once and cached on disk,
so an epoch only trains the image heads and the graph encoder. The paper's setting is
``model.backbone: uni`` with a local checkpoint and ``model.finetune: last_k`` or ``full``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from napari_sigmma.errors import SigmmaError
from napari_sigmma.tiles.graphs import GRAPH_METHODS
from napari_sigmma.tiles.grid import ALLOWED_TILE_PX


def _model_config_cls() -> type:
    from napari_sigmma.models.sigmma import ModelConfig

    return ModelConfig


def _default_model() -> Any:
    return _model_config_cls()()


@dataclass
class TrainConfig:
    """Everything a training run needs (saved as ``config.yaml`` in the run folder).

    Attributes
    ----------
    data
        Slides: Xenium bundles, HEST folders or SpatialData ``.zarr`` stores
        (:func:`napari_sigmma.io.load_any`).
    run_dir
        Run folder (config.yaml, split.json, metrics.jsonl, checkpoints/).
    tile_px, target_mpp, min_tissue
        Tile side (224, 256, 512) at ``target_mpp`` µm/px; minimum tissue fraction.
    min_cells
        Tiles with fewer cells are skipped for training and evaluation.
    graph_method, graph_k, graph_radius_um, graph_max_dist_um
        Cell-graph construction (``delaunay``, ``knn``, ``radius``).
    node_obsm, n_pca
        Node features: ``obsm`` key, or (``None``) normalize_total + log1p + PCA with
        ``n_pca`` components fitted on training tiles (STEMO substitute).
    split_block, split_fractions, split_seed, split_by_slide
        Spatially blocked split (blocks of ``split_block``² tiles); ``split_seed`` None =
        ``seed``.
    epochs, batch_size, lr, backbone_lr, weight_decay, warmup_steps, grad_clip, grad_accum
        Optimisation: AdamW, linear warm-up (optimiser steps) then cosine decay to 0;
        ``backbone_lr`` for unfrozen backbone parameters; ``grad_clip`` ≤ 0 disables it.
    seed, device
        Seed of everything (torch, numpy, random, data order); ``auto``/``cpu``/``cuda``/….
    patience, val_every
        Early stopping after ``patience`` validations without improvement; validate every
        ``val_every`` epochs.
    ckpt_every_steps
        Also checkpoint every this many optimiser steps (0 = at epoch ends only).
    max_steps_per_epoch
        Cap on optimiser steps per epoch (None = a full pass).
    num_workers
        DataLoader workers (0 = main process).
    cache_features, feature_cache_dir, tile_cache_dir
        Frozen backbone: cache crop features on disk (default ``<run>/cache``); pre-extracted
        tile images are cached in ``tile_cache_dir`` (default ``<run>/cache``).
    model
        The SIGMMA model (:class:`napari_sigmma.models.sigmma.ModelConfig`).
    """

    data: list[str] = field(default_factory=list)
    run_dir: str = "runs/sigmma"
    tile_px: int = 256
    target_mpp: float = 0.5
    min_tissue: float = 0.25
    min_cells: int = 3
    graph_method: str = "delaunay"
    graph_k: int = 6
    graph_radius_um: float = 30.0
    graph_max_dist_um: float | None = None
    node_obsm: str | None = None
    n_pca: int = 32
    split_block: int = 4
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int | None = None
    split_by_slide: bool = False
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr: float = 1e-5
    weight_decay: float = 1e-2
    warmup_steps: int = 20
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    patience: int = 5
    val_every: int = 1
    ckpt_every_steps: int = 0
    max_steps_per_epoch: int | None = None
    num_workers: int = 0
    cache_features: bool = True
    feature_cache_dir: str | None = None
    tile_cache_dir: str | None = None
    model: Any = field(default_factory=_default_model)

    def __post_init__(self) -> None:
        if isinstance(self.data, str | os.PathLike):
            self.data = [self.data]
        self.data = [str(p) for p in self.data]
        self.run_dir = str(self.run_dir)
        self.split_fractions = tuple(float(f) for f in self.split_fractions)  # type: ignore[assignment]
        if isinstance(self.model, dict):
            self.model = _model_config_cls().from_dict(self.model)
        self.validate()

    def validate(self, path: str | os.PathLike[str] | None = None) -> None:
        """Check value ranges; raises :class:`SigmmaError` naming ``path``."""
        problems = []
        if int(self.tile_px) not in ALLOWED_TILE_PX:
            problems.append(f"tile_px must be one of {ALLOWED_TILE_PX}")
        if not self.target_mpp > 0:
            problems.append("target_mpp must be > 0")
        if self.graph_method not in GRAPH_METHODS:
            problems.append(f"graph_method must be one of {GRAPH_METHODS}")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0:
            problems.append("split_fractions must be three non-negative numbers")
        if int(self.epochs) < 1:
            problems.append("epochs must be ≥ 1")
        if int(self.batch_size) < 2:
            problems.append("batch_size must be ≥ 2 (contrastive negatives)")
        if int(self.grad_accum) < 1:
            problems.append("grad_accum must be ≥ 1")
        if not self.lr > 0:
            problems.append("lr must be > 0")
        if int(self.val_every) < 1:
            problems.append("val_every must be ≥ 1")
        if int(self.min_cells) < 1:
            problems.append("min_cells must be ≥ 1")
        if problems:
            raise SigmmaError("bad training config: " + "; ".join(problems), path=path)

    # -- plain dicts and YAML -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, not tuples), ready for YAML / JSON / checkpoints."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "model":
                v = _plain(dataclasses.asdict(v))
            out[f.name] = _plain(v)
        return out

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], *, path: str | os.PathLike[str] | None = None
    ) -> TrainConfig:
        """Build from a plain dict; unknown keys (also under ``model``) raise a SigmmaError."""
        if not isinstance(d, dict):
            raise SigmmaError("a training config must be a mapping of settings", path=path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SigmmaError(f"unknown config keys: {', '.join(unknown)}", path=path)
        d = dict(d)
        try:
            if "model" in d and d["model"] is not None:
                m = d["model"]
                if not isinstance(m, dict):
                    raise SigmmaError("'model' must be a mapping")
                mcls = _model_config_cls()
                mknown = {f.name for f in fields(mcls)}
                bad = sorted(set(m) - mknown)
                if bad:
                    raise SigmmaError(f"unknown model config keys: {', '.join(bad)}")
                d["model"] = mcls.from_dict(m)
            elif "model" in d:
                d.pop("model")
            cfg = cls(**d)
        except SigmmaError as err:
            raise SigmmaError(err.problem, path=path) from err
        except (TypeError, ValueError) as err:
            raise SigmmaError(f"bad training config: {err}", path=path) from err
        cfg.validate(path)
        return cfg

    def save_yaml(self, path: str | os.PathLike[str]) -> None:
        """Write the config as YAML (atomically)."""
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> TrainConfig:
        """Read a YAML config; a missing file, bad YAML or unknown keys raise SigmmaError."""
        import yaml

        try:
            text = Path(path).read_text()
        except OSError as err:
            raise SigmmaError(f"cannot read config: {err}", path=path) from err
        try:
            d = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise SigmmaError(f"not valid YAML: {err}", path=path) from err
        return cls.from_dict(d, path=path)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some settings changed (``model`` may be a dict of model changes)."""
        d = self.to_dict()
        m = changes.pop("model", None)
        d.update(changes)
        if isinstance(m, dict):
            d["model"] = {**d["model"], **m}
        elif m is not None:
            d["model"] = dataclasses.asdict(m)
        return TrainConfig.from_dict(d)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, os.PathLike):
        return str(v)
    return v
