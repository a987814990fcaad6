"""Whole-model diagnostics of the two things that make SIGMMA multi-scale: the edge sampler's
graphs (:func:`~napari_sigmma.models.edges.sampler_diagnostics`) and the distinctness of
the per-scale image inputs (:func:`~napari_sigmma.models.multicrop.scale_input_rel_diff`).

:func:`model_diagnostics` is what ``napari-sigmma evaluate`` writes into ``metrics.json`` as
``diagnostics`` and what the training loop logs per epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from napari_sigmma.models.edges import sampler_diagnostics
from napari_sigmma.models.multicrop import scale_input_rel_diff


def model_diagnostics(
    model: Any,
    batches: Iterable[Any],
    *,
    device: Any = None,
    n_draws: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Edge-sampler and image-scale diagnostics of ``model`` on some tiles.

    Parameters
    ----------
    model
        A :class:`~napari_sigmma.models.sigmma.SigmmaModel` (its mode is restored after).
    batches
        ``(x, graph_batch, ...)`` tuples as :func:`napari_sigmma.tiles.dataset.make_loader`
        yields them: ``x`` uint8 tiles ``(B, 3, S, S)`` or cached crop features
        ``(B, 21, C)``, ``graph_batch`` the PyG Batch of the same tiles.
    device
        Where to run (default: the model's device).
    n_draws, seed
        Training-mode draws for ``accept_train`` and their seed.

    Returns
    -------
    dict
        ``{"edges": {"meso": {...}, "macro": {...}} | {"skipped": why},
        "scales": {"input_rel_diff": {"micro_vs_macro", "meso_vs_macro"}}, "n_tiles"}``
        (keys of the stages: :func:`~napari_sigmma.models.edges.sampler_diagnostics`;
        relative differences: mean over the tiles).
    """
    if device is None:
        device = next(model.parameters()).device
    graphs: list[Any] = []
    sums = {"micro_vs_macro": 0.0, "meso_vs_macro": 0.0}
    n = 0
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for item in batches:
                x, gb = item[0].to(device), item[1].to(device)
                feats = x if x.ndim == 3 else model.backbone_features(x)
                k = int(feats.shape[0])
                for key, v in scale_input_rel_diff(model, feats).items():
                    sums[key] += v * k
                n += k
                graphs.append(gb)
    finally:
        model.train(was)
    use_graph = bool(getattr(getattr(model, "cfg", None), "use_graph", True))
    edges = (
        sampler_diagnostics(model, graphs, n_draws=n_draws, seed=seed)
        if use_graph
        else {"skipped": "the model has no cell graph"}
    )
    return {
        "edges": edges,
        "scales": {"input_rel_diff": {k: v / max(n, 1) for k, v in sums.items()}},
        "n_tiles": n,
    }


def flat_diagnostics(diag: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a :func:`model_diagnostics` result as ``{"edges.meso.accept_train":
    0.48, …, "scales.input_rel_diff.micro_vs_macro": 0.17}`` (strings and skips dropped)."""
    out: dict[str, float] = {}
    for k, v in diag.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_diagnostics(v, name + "."))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[name] = float(v)
    return out
