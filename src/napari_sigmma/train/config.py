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
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from napari_sigmma.errors import SigmmaError
from napari_sigmma.tiles.graphs import GRAPH_METHODS
from napari_sigmma.tiles.grid import ALLOWED_TILE_PX


def _model_config_cls() -> type:
    from napari_sigmma.models.config import ModelConfig

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
    graph_method, graph_k, graph_radius_um, graph_max_dist_um, graph_micro_blocks
        Cell-graph construction (``delaunay``, ``knn``, ``radius``); G_micro built inside
        each micro block (``graph_micro_blocks``, the paper's; configs saved before it
        existed read as ``False``, the tile-wide graph those runs were trained on).
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
    graph_micro_blocks: bool = True
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
        """Check every value's type and range (:func:`config_problems`); raises
        :class:`SigmmaError` naming ``path`` and listing every problem."""
        problems = config_problems(self.to_dict())
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
        problems = config_problems(d)
        if problems:
            raise SigmmaError("bad training config: " + "; ".join(problems), path=path)
        d = dict(d)
        if "graph_micro_blocks" not in d and set(d) >= _V1_KEYS:
            # a complete dump saved before G_micro was built per micro block (a checkpoint,
            # a run's config.yaml): keep the tile-wide graph it was trained on
            d["graph_micro_blocks"] = False
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
            d = yaml.safe_load(text)
        except yaml.YAMLError as err:
            # the parser's own text is several lines with a caret drawing: keep where and what
            mark = getattr(err, "problem_mark", None)
            what = getattr(err, "problem", None) or " ".join(str(err).split())
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise SigmmaError(f"not valid YAML ({where}{what})", path=path) from err
        if d is None:
            raise SigmmaError(
                "the config file is empty: write the settings to change (e.g. 'epochs: 5'), "
                "or leave out --config for the defaults",
                path=path,
            )
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


# ----------------------------------------------------------------------------- the one check
# Every setting's type and range, in one table: (kind, test, what the test asks). Kinds:
# "int" (not bool, not 2.5), "float" (int or float, finite), "bool", "str", and "?" in front
# for "or null". The model's settings are checked here too (the ModelConfig dataclass only
# converts). Checked on the raw values, before any conversion (int(2.5) would hide it).
_Rule = tuple[str, Any, str]


def _pos(v: Any) -> bool:
    return v > 0


def _nonneg(v: Any) -> bool:
    return v >= 0


def _at_least(m: int) -> Any:
    return lambda v: v >= m


_TRAIN_RULES: dict[str, _Rule] = {
    "run_dir": ("str", bool, "a non-empty path"),
    "tile_px": ("int", lambda v: v in ALLOWED_TILE_PX, f"one of {ALLOWED_TILE_PX}"),
    "target_mpp": ("float", lambda v: 0 < v <= 100, "in (0, 100] µm/px"),
    "min_tissue": ("float", lambda v: 0 <= v <= 1, "in [0, 1]"),
    "min_cells": ("int", _at_least(1), "≥ 1"),
    "graph_method": ("str", lambda v: v in GRAPH_METHODS, f"one of {GRAPH_METHODS}"),
    "graph_k": ("int", _at_least(1), "≥ 1"),
    "graph_radius_um": ("float", _pos, "> 0"),
    "graph_max_dist_um": ("?float", _pos, "> 0 (or null)"),
    "graph_micro_blocks": ("bool", None, ""),
    "node_obsm": ("?str", bool, "an obsm key (or null)"),
    "n_pca": ("int", _at_least(1), "≥ 1"),
    "split_block": ("int", _at_least(1), "≥ 1"),
    "split_seed": ("?int", _nonneg, "≥ 0 (or null)"),
    "split_by_slide": ("bool", None, ""),
    "epochs": ("int", _at_least(1), "≥ 1"),
    "batch_size": ("int", _at_least(2), "≥ 2 (contrastive negatives)"),
    "lr": ("float", _pos, "> 0"),
    "backbone_lr": ("float", _nonneg, "≥ 0"),
    "weight_decay": ("float", _nonneg, "≥ 0"),
    "warmup_steps": ("int", _nonneg, "≥ 0"),
    "grad_clip": ("float", None, ""),
    "grad_accum": ("int", _at_least(1), "≥ 1"),
    "seed": ("int", _nonneg, "≥ 0"),
    "device": ("str", bool, "a device name (auto, cpu, cuda, cuda:1, mps)"),
    "patience": ("int", _nonneg, "≥ 0"),
    "val_every": ("int", _at_least(1), "≥ 1"),
    "ckpt_every_steps": ("int", _nonneg, "≥ 0"),
    "max_steps_per_epoch": ("?int", _at_least(1), "≥ 1 (or null)"),
    "num_workers": ("int", _nonneg, "≥ 0"),
    "cache_features": ("bool", None, ""),
    "feature_cache_dir": ("?str", bool, "a path (or null)"),
    "tile_cache_dir": ("?str", bool, "a path (or null)"),
}

_MODEL_RULES: dict[str, _Rule] = {
    "backbone": ("str", bool, "a backbone name"),
    "checkpoint": ("?str", bool, "a weights file (or null)"),
    "pretrained": ("bool", None, ""),
    "img_size": ("?int", lambda v: 16 <= v <= 4096, "in [16, 4096] px (or null)"),
    "embed_dim": ("int", lambda v: 1 <= v <= 65536, "in [1, 65536]"),
    "hidden": ("int", lambda v: 1 <= v <= 65536, "in [1, 65536]"),
    "head": ("str", lambda v: v in ("mlp", "linear"), "'mlp' or 'linear'"),
    "head_hidden": ("int", lambda v: 1 <= v <= 65536, "in [1, 65536]"),
    "candidate_k": ("?int", _at_least(1), "≥ 1 (or null)"),
    "candidate_cap": ("?int", _at_least(1), "≥ 1 (or null)"),
    "dense_k": ("?int", _at_least(1), "≥ 1 (or null)"),
    "use_graph": ("bool", None, ""),
    "sparsify": ("bool", None, ""),
    "edge_temperature": ("float", _pos, "> 0"),
    "init_temperature": ("float", _pos, "> 0"),
    "learn_temperature": ("bool", None, ""),
    "finetune": ("str", lambda v: v in ("frozen", "last_k", "full"), "frozen, last_k or full"),
    "last_k": ("int", _at_least(1), "≥ 1"),
    "fast_multicrop": ("bool", None, ""),
    "fast_region_map": ("bool", None, ""),
    "crop_chunk": ("?int", _at_least(1), "≥ 1 (or null)"),
}

_KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}


def _type_ok(kind: str, v: Any) -> bool:
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if kind == "bool":
        return isinstance(v, bool)
    return isinstance(v, str | os.PathLike)


def _check_rules(d: dict[str, Any], rules: dict[str, _Rule], prefix: str) -> list[str]:
    out = []
    for key, (kind, test, want) in rules.items():
        if key not in d:
            continue
        v = d[key]
        optional = kind.startswith("?")
        kind = kind.lstrip("?")
        if v is None and optional:
            continue
        if not _type_ok(kind, v):
            word = _KIND_WORDS[kind] + (" or null" if optional else "")
            out.append(f"{prefix}{key} must be {word}, got {v!r}")
        elif test is not None and not test(v if kind != "str" else str(v)):
            out.append(f"{prefix}{key} must be {want}, got {v!r}")
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def config_problems(d: dict[str, Any]) -> list[str]:
    """Every type and range problem of a training config given as a plain dict (the
    ``config.yaml`` / :meth:`TrainConfig.to_dict` shape; keys left out keep their defaults).

    The one place config values are checked: :meth:`TrainConfig.from_dict`,
    :meth:`TrainConfig.validate` and ``napari-sigmma check`` all use it.
    """
    problems = _check_rules(d, _TRAIN_RULES, "")
    if "data" in d:
        data = d["data"]
        items = [data] if isinstance(data, str | os.PathLike) else data
        if not isinstance(items, list | tuple) or not all(
            isinstance(p, str | os.PathLike) and str(p) for p in items
        ):
            problems.append(f"data must be a path or a list of paths, got {data!r}")
    if "split_fractions" in d:
        f = d["split_fractions"]
        if (
            not isinstance(f, list | tuple)
            or len(f) != 3
            or not all(_is_number(x) and x >= 0 for x in f)
        ):
            problems.append(
                f"split_fractions must be three non-negative numbers (train, val, test), got {f!r}"
            )
        elif abs(sum(f) - 1) > 1e-3:
            problems.append(f"split_fractions must sum to 1, got {f!r} (sum {sum(f):g})")
        elif not f[0] > 0:
            problems.append(f"split_fractions must give the training part a share > 0, got {f!r}")
    m = d.get("model")
    if isinstance(m, dict):
        problems += _check_rules(m, _MODEL_RULES, "model.")
        if "gnn_layers" in m:
            g = m["gnn_layers"]
            if (
                not isinstance(g, list | tuple)
                or len(g) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in g)
            ):
                problems.append(
                    f"model.gnn_layers must be three whole numbers ≥ 0 (micro, meso, macro), "
                    f"got {g!r}"
                )
        if "scales" in m:
            sc = m["scales"]
            if not isinstance(sc, list | tuple) or not all(isinstance(x, str) for x in sc):
                problems.append(f"model.scales must be a list of scale names, got {sc!r}")
    elif m is not None and "model" in d and not dataclasses.is_dataclass(m):
        problems.append(f"model must be a mapping of model settings, got {m!r}")
    return problems


#: Keys of every TrainConfig saved before ``graph_micro_blocks`` existed.
_V1_KEYS = frozenset(f.name for f in fields(TrainConfig)) - {"graph_micro_blocks"}
