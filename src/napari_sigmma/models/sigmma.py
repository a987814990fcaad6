"""SIGMMA: multi-crop H&E encoder + hierarchical cell-graph encoder + multi-scale InfoNCE.

Imports torch at module level: import it inside functions from code that must stay light
(its configuration, :class:`~napari_sigmma.models.config.ModelConfig`, does not need it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from napari_sigmma.models.backbones import backbone_stages, create_backbone
from napari_sigmma.models.config import FINETUNE_CHOICES, ModelConfig
from napari_sigmma.models.graph import GeneVectorEncoder, HierarchicalGraphEncoder
from napari_sigmma.models.loss import logit_scale_value, multiscale_loss
from napari_sigmma.models.multicrop import MultiCropImageEncoder

__all__ = ["FINETUNE_CHOICES", "ModelConfig", "SigmmaModel"]


class SigmmaModel(nn.Module):
    """The two encoders and the learnable temperature.

    Parameters
    ----------
    cfg
        Model configuration.
    n_node_features
        Width of the cell-graph node features ``x``.
    n_genes
        Length of ``genevec`` (used when ``cfg.use_graph`` is False).
    """

    def __init__(self, cfg: ModelConfig, n_node_features: int, n_genes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(
            cfg.backbone,
            checkpoint=cfg.checkpoint,
            pretrained=cfg.pretrained,
            img_size=cfg.img_size,
        )
        self.image = MultiCropImageEncoder(
            self.backbone,
            cfg.embed_dim,
            head=cfg.head,
            hidden=cfg.head_hidden,
            fast=cfg.fast_multicrop,
            region_map=cfg.fast_region_map,
            chunk_size=cfg.crop_chunk,
        )
        if cfg.use_graph:
            self.graph = HierarchicalGraphEncoder(
                n_node_features,
                cfg.embed_dim,
                hidden=cfg.hidden,
                gnn_layers=cfg.gnn_layers,
                candidate_k=cfg.candidate_k,
                candidate_cap=cfg.candidate_cap,
                sparsify=cfg.sparsify,
                dense_k=cfg.dense_k,
                edge_temperature=cfg.edge_temperature,
            )
        else:
            self.graph = GeneVectorEncoder(n_genes, cfg.embed_dim, hidden=cfg.hidden)
        init = torch.tensor(math.log(1.0 / cfg.init_temperature), dtype=torch.float32)
        if cfg.learn_temperature:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.apply_finetune_policy()

    # -- fine-tuning policy --------------------------------------------------------
    def _trainable_backbone_parts(self) -> list[nn.Module]:
        mode = self.cfg.finetune
        if mode == "full":
            return [self.image.backbone]
        if mode == "frozen":
            return []
        stages, tail = backbone_stages(self.backbone)
        k = min(self.cfg.last_k, len(stages))
        return list(stages[-k:]) + list(tail)

    def apply_finetune_policy(self) -> None:
        """Set ``requires_grad`` of the backbone per ``cfg.finetune`` and put frozen
        parts in eval mode (BatchNorm statistics and dropout stay fixed)."""
        bb = self.image.backbone
        for p in bb.parameters():
            p.requires_grad_(False)
        for part in self._trainable_backbone_parts():
            for p in part.parameters():
                p.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.finetune != "full":
            self.image.backbone.eval()
            if mode:
                for part in self._trainable_backbone_parts():
                    part.train(True)
        return self

    @property
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter is trained (features can be cached)."""
        return not any(p.requires_grad for p in self.image.backbone.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser should update."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def temperature(self) -> float:
        """Current InfoNCE temperature τ."""
        return float(1.0 / logit_scale_value(self.logit_scale.detach()))

    # -- encoders --------------------------------------------------------------------
    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, S, S)`` → ``(B, 21, C)`` crop features (no autograd graph when
        the backbone is frozen)."""
        if self.backbone_frozen:
            with torch.no_grad():
                return self.image.backbone_features(images)
        return self.image.backbone_features(images)

    def image_heads(self, crop_feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 21, C)`` → ``{scale: (B, D)}``."""
        return self.image.heads(crop_feats)

    def crop_embeddings(self, crop_feats: torch.Tensor) -> torch.Tensor:
        """``(B, 21, C)`` → ``(B, 21, D)`` per-crop embeddings (each crop through its
        scale's head)."""
        return self.image.crop_embeddings(crop_feats)

    def encode_image(
        self, images: torch.Tensor, *, attention: bool = False
    ) -> dict[str, torch.Tensor]:
        """``{scale: (B, D)}``, plus ``"attention"`` ``(B, heads, h, w)`` (macro crop, last
        block, CLS → patches) when asked and the backbone is a ViT."""
        out: dict[str, torch.Tensor] = dict(self.image_heads(self.backbone_features(images)))
        if attention and self.backbone.is_vit:
            with torch.no_grad():
                out["attention"] = self.image.macro_attention(images)
        return out

    def encode_graph(self, batch: Any):
        """PyG ``Batch`` → :class:`~napari_sigmma.models.graph.GraphOutput`.

        Runs in float32 even inside bf16 autocast: the weighted-mean scatter sums, the
        edge sigmoid and the attention-pooling softmax would lose too much in bf16, and
        the graph side is a small share of the FLOPs."""
        from napari_sigmma.device import float32_region

        with float32_region(self.logit_scale.device):
            return self.graph(batch)

    def epoch_diagnostics(self, batch: tuple[Any, Any]) -> dict[str, float]:
        """The training loop's per-epoch hook (``diagnostics/<name>`` in
        ``metrics.jsonl``): edge-sampler numbers per stage and the per-scale image-input
        differences on ``batch = (x, graph_batch)``, as ``edges.<meso|macro>.<key>`` and
        ``scales.input_rel_diff.<micro|meso>_vs_macro``
        (:func:`napari_sigmma.models.diagnostics.model_diagnostics`)."""
        from napari_sigmma.models.diagnostics import flat_diagnostics, model_diagnostics

        return flat_diagnostics(model_diagnostics(self, [batch]))

    def loss(self, img: dict, st: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Multi-scale symmetric InfoNCE over ``cfg.scales``; ``st`` is a GraphOutput or
        its ``emb`` dict."""
        st_emb = st.emb if hasattr(st, "emb") else st
        return multiscale_loss(img, st_emb, self.cfg.scales, self.logit_scale)

    def forward(self, images_or_feats: torch.Tensor, batch: Any) -> dict[str, Any]:
        """One training step's forward (call through DDP).

        Parameters
        ----------
        images_or_feats
            uint8 tiles ``(B, 3, S, S)`` or cached crop features ``(B, 21, C)``.
        batch
            The PyG Batch of the same tiles.

        Returns
        -------
        dict
            ``loss`` (tensor), ``parts`` ({scale: float}), ``img`` and ``st`` (GraphOutput).
        """
        if images_or_feats.ndim == 3:
            img = self.image_heads(images_or_feats)
        else:
            img = self.encode_image(images_or_feats)
        st = self.encode_graph(batch)
        total, parts = self.loss(img, st)
        return {"loss": total, "parts": parts, "img": img, "st": st}
