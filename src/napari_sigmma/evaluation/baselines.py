"""Baselines and ablations, trained and evaluated on exactly the split of a reference run.

- **frozen backbone** (the paper's "UNI" row): the backbone's 21 crop features mean-pooled
  per scale, no heads, no training (:func:`~.floors.frozen_backbone_model`,
  :func:`~.floors.pooled_crop_features`). Evaluated inside every :func:`~.evaluate.evaluate`.
- **BLEEP-style** (``bleep``): image encoder + MLP over the tile's expression, one
  (macro) scale, CLIP loss — ``use_graph=False, scales=("macro",)``. BLEEP feeds
  expression principal components; here the MLP's input is the tile's log1p-normalised
  mean expression of every gene (the model's gene-vector encoder), whose first linear layer
  can learn any projection a PCA would apply.
- **ablations of Table 4**: ``no_graph`` (gene vector instead of the cell graph, multi-scale
  loss kept), ``single_scale`` (macro loss only), ``no_sparsify`` (all candidate edges
  added instead of the stochastic edge addition).
- ``multicrop``: the other multi-crop mode (fast ↔ paper-exact) with everything else equal.

Each variant is the reference run's configuration with only the model switch changed
(same data, tiling, node features, optimiser, epochs unless ``epochs`` is given, seed) and
is trained with the reference's ``split.json`` passed to the trainer, then checked to have
the same split. Frozen-backbone crop features are shared through the reference's feature
cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_sigmma.errors import SigmmaError

VARIANTS: dict[str, dict[str, Any]] = {
    "no_graph": {"use_graph": False},
    "single_scale": {"scales": ["macro"]},
    "no_sparsify": {"sparsify": False},
    "bleep": {"use_graph": False, "scales": ["macro"]},
    "multicrop": {},  # filled in from the reference: the other multi-crop mode
}
DEFAULT_VARIANTS = ("bleep", "no_graph", "single_scale", "no_sparsify")


def variant_changes(name: str, ref_model: dict[str, Any]) -> dict[str, Any]:
    """Model-config changes of variant ``name`` relative to the reference model."""
    if name not in VARIANTS:
        raise SigmmaError(f"unknown baseline {name!r}; choose from {', '.join(VARIANTS)}")
    if name == "multicrop":
        return {"fast_multicrop": not bool(ref_model.get("fast_multicrop"))}
    return dict(VARIANTS[name])


def variant_config(
    ref_cfg: Any,
    name: str,
    run_dir: str | os.PathLike[str],
    *,
    ref_run: Path,
    data: Sequence[str] | None = None,
    epochs: int | None = None,
    device: str | None = None,
) -> Any:
    """The TrainConfig of variant ``name``: the reference's with one model switch changed."""
    changes: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": variant_changes(name, ref_cfg.model.to_dict()),
        "feature_cache_dir": ref_cfg.feature_cache_dir or str(ref_run / "cache"),
        "tile_cache_dir": ref_cfg.tile_cache_dir or str(ref_run / "cache"),
    }
    if data is not None:
        changes["data"] = list(data)
    if epochs:
        changes["epochs"] = int(epochs)
    if device:
        changes["device"] = str(device)
    return ref_cfg.replace(**changes)


def _same_split(a: Path, b: Path) -> bool:
    from napari_sigmma.tiles.split import TileSplit

    sa, sb = TileSplit.load(a), TileSplit.load(b)
    key = lambda s: sorted((x.name, tuple(x.tile_ids), tuple(x.split)) for x in s.slides)  # noqa: E731
    return key(sa) == key(sb)


def train_variant(
    cfg: Any,
    split_path: Path,
    *,
    log: Callable[[str], None] | None = None,
    callbacks: Any = None,
) -> Path:
    """Train ``cfg`` on the split ``split_path`` (or reuse a finished run of exactly this
    config in ``cfg.run_dir``); return its best checkpoint."""
    from napari_sigmma.train.checkpoint import resolve_checkpoint
    from napari_sigmma.train.config import TrainConfig
    from napari_sigmma.train.logs import ProgressBars
    from napari_sigmma.train.loop import callback_list, train

    run = Path(cfg.run_dir)
    best = run.is_dir() and resolve_checkpoint(run, names=("best.pt",), missing_ok=True)
    if best and (run / "config.yaml").is_file():
        if TrainConfig.from_yaml(run / "config.yaml") == cfg and _same_split(
            run / "split.json", split_path
        ):
            if log:
                log(f"  reusing the finished run {run}")
            return best
        raise SigmmaError(
            "the folder holds a different run; delete it or choose another report folder",
            path=run,
        )
    if (run / "checkpoints" / "last.pt").is_file():
        raise SigmmaError("the folder holds an unfinished run; delete it first", path=run)
    # a bar per trained variant on the command line (off in the library and the viewer)
    bars = ProgressBars(f"training {run.name}")
    try:
        res = train(cfg, split=split_path, callbacks=[*callback_list(callbacks), bars])
    finally:
        bars.close()
    if res.status == "cancelled":
        raise SigmmaError("baseline training was cancelled", path=run)
    if not _same_split(run / "split.json", split_path):
        raise SigmmaError(
            f"the baseline run did not reuse the reference split {split_path}", path=run
        )
    if res.best_checkpoint is None:
        raise SigmmaError("baseline training wrote no checkpoint", path=run)
    return res.best_checkpoint


def run_baselines(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    variants: Sequence[str] | None = None,
    data: Any = None,
    epochs: int | None = None,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
    **eval_kwargs: Any,
) -> list[dict[str, Any]]:
    """Train and evaluate baselines / ablations on the reference run's split.

    Parameters
    ----------
    checkpoint
        The reference (full SIGMMA) checkpoint or run folder.
    out
        Report folder: runs go to ``<out>/runs/<name>``, their reports to
        ``<out>/baselines/<name>``.
    variants
        Names from :data:`VARIANTS` (default :data:`DEFAULT_VARIANTS`; ``"all"`` = all).
    data
        Data path(s) when they moved since training (default: the checkpoint's config).
    epochs
        Override the reference's epochs (e.g. shorter baselines while exploring).
    device
        Training and evaluation device.
    eval_kwargs
        Passed to :func:`~napari_sigmma.evaluation.run.evaluate`.

    Returns
    -------
    list of dict
        ``{"name", "run_dir", "checkpoint", "report", "metrics"}`` per variant.
    """
    from napari_sigmma.evaluation.run import _load, eval_config, evaluate, run_dir_of

    out = Path(out)
    ckpt_path, ckpt = _load(checkpoint)
    ref_run = run_dir_of(ckpt_path)
    split_path = ref_run / "split.json"
    if not split_path.is_file():
        raise SigmmaError("the reference run has no split.json to train baselines on", path=ref_run)
    ref_cfg = eval_config(ckpt, ckpt_path, data)
    names = list(variants) if variants else list(DEFAULT_VARIANTS)
    if names == ["all"]:
        names = list(VARIANTS)
    results = []
    for name in names:
        cfg = variant_config(
            ref_cfg,
            name,
            out / "runs" / name,
            ref_run=ref_run,
            data=None,
            epochs=epochs,
            device=device,
        )
        if log:
            log(f"baseline {name}: training ({cfg.epochs} epochs) in {cfg.run_dir}")
        best = train_variant(cfg, split_path, log=log)
        report = out / "baselines" / name
        if log:
            log(f"baseline {name}: evaluating into {report}")
        m = evaluate(
            ref_cfg.data, best, report, device=device, split=split_path, log=log, **eval_kwargs
        )
        results.append(
            {
                "name": name,
                "run_dir": cfg.run_dir,
                "checkpoint": best,
                "report": report,
                "metrics": m,
            }
        )
    return results


def train_and_compare(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    config: Any = None,
    variants: Sequence[str] | None = DEFAULT_VARIANTS,
    epochs: int | None = None,
    device: str | None = None,
    dump_embeddings: bool = True,
    log: Callable[[str], None] | None = None,
    callbacks: Any = None,
    **eval_kwargs: Any,
) -> dict[str, Any]:
    """Train the full model, then every baseline on its split, evaluate all, tabulate.

    Parameters
    ----------
    data
        Training slide(s).
    out
        Folder: ``runs/full`` (the reference run), ``runs/<variant>``, ``report`` (the full
        model's report with ``metrics.json``), ``baselines/<variant>``, ``compare.md``.
    config
        A :class:`~napari_sigmma.train.config.TrainConfig` or a dict of settings for the
        full model (``data`` and ``run_dir`` are set here). Runs already finished with the
        same config are reused.
    variants
        Baselines to train (:data:`VARIANTS`).
    epochs, device
        Override the config's.

    Returns
    -------
    dict
        The comparison (``rows``, ``order_check``, ``markdown``), plus ``reports``.
    """
    from napari_sigmma.evaluation.report import write_compare
    from napari_sigmma.evaluation.run import evaluate
    from napari_sigmma.train.checkpoint import resolve_checkpoint
    from napari_sigmma.train.config import TrainConfig
    from napari_sigmma.train.data import expand_data
    from napari_sigmma.train.loop import train

    out = Path(out)
    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    paths = [str(p) for d in items for p in expand_data(d)]
    if config is None:
        cfg = TrainConfig()
    elif isinstance(config, TrainConfig):
        cfg = config
    else:
        cfg = TrainConfig.from_dict({**dict(config)})
    changes: dict[str, Any] = {"data": paths, "run_dir": str(out / "runs" / "full")}
    if epochs:
        changes["epochs"] = int(epochs)
    if device:
        changes["device"] = str(device)
    if cfg.feature_cache_dir is None:
        changes["feature_cache_dir"] = str(out / "cache")
    if cfg.tile_cache_dir is None:
        changes["tile_cache_dir"] = str(out / "cache")
    cfg = cfg.replace(**changes)
    run = Path(cfg.run_dir)
    found = run.is_dir() and resolve_checkpoint(run, names=("best.pt",), missing_ok=True)
    best = found or run / "checkpoints" / "best.pt"
    if found and TrainConfig.from_yaml(run / "config.yaml") == cfg:
        if log:
            log(f"reusing the finished run {run}")
    else:
        if (run / "checkpoints").exists():
            raise SigmmaError("the folder holds a different or unfinished run", path=run)
        if log:
            log(f"training the full model ({cfg.epochs} epochs) in {run}")
        res = train(cfg, callbacks=callbacks)
        if res.best_checkpoint is None:
            raise SigmmaError("training wrote no checkpoint", path=run)
    report = out / "report"
    main = evaluate(
        None,
        best,
        report,
        dump_embeddings=dump_embeddings,
        device=device,
        log=log,
        **eval_kwargs,
    )
    items_m = [main]
    reports = [report]
    if variants:
        res_b = run_baselines(best, out, variants=variants, device=device, log=log, **eval_kwargs)
        items_m += [r["metrics"] for r in res_b]
        reports += [r["report"] for r in res_b]
    table = write_compare(items_m, out)
    table["reports"] = [str(r) for r in reports]
    return table
