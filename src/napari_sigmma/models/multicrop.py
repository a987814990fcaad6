"""Multi-crop H&E encoder (paper §5.1): 16 micro + 4 meso + 1 macro crops per tile.

Crop layout, used everywhere in the project: index 0..15 = the 4×4 micro grid row-major
(row = y), 16..19 = the 2×2 meso grid row-major, 20 = the whole tile. A micro crop with index
``j`` covers the cells whose ``micro`` label (``4*floor(4y)+floor(4x)``) is ``j``; likewise meso.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from napari_sigmma.constants import CROP_SLICES, SCALES
from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    import torch

    from napari_sigmma.models.backbones import Backbone

GRIDS = {"micro": 4, "meso": 2, "macro": 1}
N_CROPS = 21


def _bounds(size: int, n: int) -> list[tuple[int, int]]:
    edges = [round(i * size / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def make_crops(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """Cut every tile into its 21 crops and resize each to ``out_size``.

    Parameters
    ----------
    x
        ``(B, 3, S, S)`` float images (already normalised; resizing is linear, so the order of
        normalising and resizing does not matter).
    out_size
        Backbone input side.

    Returns
    -------
    torch.Tensor
        ``(B, 21, 3, out_size, out_size)`` in the crop order of this module (bilinear,
        antialiased, so down-sampling a 256-px tile to 224 does not alias).
    """
    import torch

    B, C, H, W = x.shape
    per_scale = []
    for g in (4, 2, 1):
        if H % g == 0 and W % g == 0:  # fast path: one reshape, one resize
            h, w = H // g, W // g
            crops = x.reshape(B, C, g, h, g, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, h, w)
            crops = _resize(crops, out_size)
        else:
            crops = torch.stack(
                [
                    _resize(x[:, :, y0:y1, x0:x1], out_size)
                    for (y0, y1) in _bounds(H, g)
                    for (x0, x1) in _bounds(W, g)
                ],
                dim=1,
            ).reshape(-1, C, out_size, out_size)
        per_scale.append(crops.reshape(B, g * g, C, out_size, out_size))
    return torch.cat(per_scale, dim=1)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    import torch.nn.functional as F

    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def pool_scales(crop_feats: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean-pool ``(B, 21, C)`` crop features per scale → ``{scale: (B, C)}``."""
    return {s: crop_feats[:, sl].mean(dim=1) for s, sl in CROP_SLICES.items()}


def region_pool(fmap: torch.Tensor) -> torch.Tensor:
    """Pool a spatial feature map over the 21 regions → ``(B, 21, C)`` (crop order).

    Adaptive average pooling, so grids that the blocks do not divide (e.g. 18×18 tokens of a
    patch-14 ViT on 256 px) are split as evenly as possible.
    """
    import torch
    import torch.nn.functional as F

    B, C = fmap.shape[:2]
    parts = [F.adaptive_avg_pool2d(fmap, g).reshape(B, C, g * g) for g in (4, 2, 1)]
    return torch.cat(parts, dim=2).transpose(1, 2)


def _make_head(in_dim: int, out_dim: int, kind: str, hidden: int):
    from torch import nn

    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    raise SigmmaError(f"unknown projection head {kind!r}; choose 'linear' or 'mlp'")


@functools.cache
def _classes() -> dict[str, type]:
    # nn.Module subclasses are defined on first use so importing this module stays torch-free
    from torch import nn

    class MultiCropImageEncoder(nn.Module):
        """Backbone over the 21 crops of each tile + one projection head per scale.

        Parameters
        ----------
        backbone
            From :func:`napari_sigmma.models.backbones.create_backbone`.
        embed_dim
            Shared embedding dimension ``D``.
        head
            ``"mlp"`` (Linear–GELU–Linear with ``hidden`` units) or ``"linear"``.
        hidden
            Hidden width of MLP heads.
        fast
            Beyond the paper: one backbone pass per tile at its native resolution (ViTs use
            ``dynamic_img_size``) and average pooling of the patch tokens / feature map over each
            micro, meso and macro region. Same ``(B, 21, C)`` layout, ~21× cheaper, but the
            features are pooled tokens rather than per-crop CLS embeddings.
        chunk_size
            Backbone forward in chunks of at most this many crops (memory); None = all at once.
        """

        def __init__(
            self,
            backbone: Backbone,
            embed_dim: int = 128,
            *,
            head: str = "mlp",
            hidden: int = 512,
            fast: bool = False,
            chunk_size: int | None = None,
        ) -> None:
            from torch import nn

            super().__init__()
            self.backbone_info = backbone
            self.backbone = backbone.module
            self.fast = bool(fast)
            self.chunk_size = chunk_size
            self.embed_dim = int(embed_dim)
            self.proj = nn.ModuleDict(
                {s: _make_head(backbone.embed_dim, self.embed_dim, head, hidden) for s in SCALES}
            )

        @property
        def feature_dim(self) -> int:
            """Width ``C`` of the backbone crop features."""
            return self.backbone_info.embed_dim

        def _check(self, images: torch.Tensor) -> None:
            if images.ndim != 4 or images.shape[1] != 3:
                raise SigmmaError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")

        def _chunked(self, fn, x: torch.Tensor) -> torch.Tensor:
            import torch

            n = self.chunk_size
            if not n or x.shape[0] <= n:
                return fn(x)
            return torch.cat([fn(x[i : i + n]) for i in range(0, x.shape[0], n)], dim=0)

        def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
            """``(B, 3, S, S)`` uint8 tiles → ``(B, 21, C)`` crop features.

            Paper mode: all ``21·B`` resized crops go through the backbone in one batched forward
            (in chunks of ``chunk_size`` if set). Fast mode: see the class notes.
            """
            self._check(images)
            bb = self.backbone_info
            x = bb.normalize(images)
            B = x.shape[0]
            if self.fast:
                fmap = self._chunked(bb.feature_map, x)
                return region_pool(fmap)
            size = bb.input_size
            crops = make_crops(x, size).reshape(B * N_CROPS, 3, size, size)
            feats = self._chunked(bb.features, crops)
            return feats.reshape(B, N_CROPS, -1)

        def heads(self, crop_feats: torch.Tensor) -> dict[str, torch.Tensor]:
            """``(B, 21, C)`` crop features → ``{scale: (B, D)}`` (mean per scale, then head)."""
            if crop_feats.ndim != 3 or crop_feats.shape[1] != N_CROPS:
                raise SigmmaError(
                    f"crop features must be (B, 21, C), got {tuple(crop_feats.shape)}"
                )
            pooled = pool_scales(crop_feats.float())
            return {s: self.proj[s](pooled[s]) for s in SCALES}

        def crop_embeddings(self, crop_feats: torch.Tensor) -> torch.Tensor:
            """``(B, 21, C)`` → ``(B, 21, D)``: every crop through its own scale's head (the
            per-patch counterparts of the pooled tile embeddings; exact for the macro crop and
            for linear heads, whose mean over crops is the tile embedding)."""
            import torch

            x = crop_feats.float()
            return torch.cat([self.proj[s](x[:, sl]) for s, sl in CROP_SLICES.items()], dim=1)

        def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.heads(self.backbone_features(images))

        def macro_attention(self, images: torch.Tensor) -> torch.Tensor:
            """Attention maps ``(B, heads, h, w)`` of the macro crop (the tile resized to the
            backbone input; at native resolution in fast mode)."""
            bb = self.backbone_info
            x = bb.normalize(images)
            if not self.fast:
                x = _resize(x, bb.input_size)
            return bb.attention_maps(x)

    return {"MultiCropImageEncoder": _publish(MultiCropImageEncoder)}


def _publish(cls: type) -> type:
    cls.__module__ = __name__
    cls.__qualname__ = cls.__name__
    return cls


def __getattr__(name: str):
    if name in ("MultiCropImageEncoder",):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
