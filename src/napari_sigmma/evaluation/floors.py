"""The floors every trained model is compared with: the frozen backbone (its pooled crop
features, with the graph side's gene vector), built without training."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_sigmma.constants import CROP_SLICES
from napari_sigmma.errors import SigmmaError


def frozen_backbone_model(model_cfg: Any, n_node_features: int, n_genes: int) -> Any:
    """A SIGMMA model whose backbone is the pretrained, frozen backbone of ``model_cfg``
    (its heads are unused: only :meth:`backbone_features` serves the baseline)."""
    import torch

    from napari_sigmma.models.config import ModelConfig
    from napari_sigmma.models.sigmma import SigmmaModel

    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    cfg = ModelConfig.from_dict({**d, "finetune": "frozen"})
    torch.manual_seed(0)
    model = SigmmaModel(cfg, int(n_node_features), int(n_genes))
    return model.eval()


def pooled_crop_features(crops: np.ndarray) -> dict[str, np.ndarray]:
    """``(n, 21, C)`` crop features → ``{scale: (n, C)}`` means over each scale's crops."""
    crops = np.asarray(crops, dtype=np.float32)
    if crops.ndim != 3 or crops.shape[1] != 21:
        raise SigmmaError(f"crop features must be (n, 21, C), got {crops.shape}")
    return {s: crops[:, sl].mean(axis=1) for s, sl in CROP_SLICES.items()}
