"""Multi-crop H&E encoder (paper §5.1): 16 micro + 4 meso + 1 macro crops per tile.

Crop layout, used everywhere in the project: index 0..15 = the 4×4 micro grid row-major
(row = y), 16..19 = the 2×2 meso grid row-major, 20 = the whole tile. A micro crop with index
``j`` covers the cells whose ``micro`` label (``4*floor(4y)+floor(4x)``) is ``j``; likewise meso.

Two modes give the same ``(B, 21, C)`` crop-feature layout:

- **Paper-exact** (``fast=False``): each of the 21 crops is resized to the backbone input and
  encoded; the per-scale input is the mean of that scale's crop embeddings (Pool_I).
- **Fast** (``fast=True``, beyond the paper): one backbone pass per tile at its native
  resolution; the 21 "crop features" are the token / feature-map means over each region.
  Averaging those region means per scale would give every scale the *same* vector (the mean
  of the 16 micro-region means is the whole-map mean whenever the grid divides evenly), so
  the fast mode puts a shared non-linear **region map** φ (:class:`RegionMap`,
  LayerNorm–Linear–GELU–Linear) on every region feature *before* the grid mean:
  ``u_s = mean_{r ∈ grid_s} φ(f_r)``, then the scale's head. This is the paper's structure
  with φ standing for the non-linear part of the encoder that the one-pass shortcut skips:
  in the paper each crop goes through the non-linear backbone before Pool_I. φ is shared by
  the scales (the scales differ because of what each region holds, not because of separate
  weights), learnt with the heads, and cheap (``2·C²`` weights); the cached crop features
  stay the region means, so the frozen-backbone feature cache is unchanged.
  Measured on the 38 tiles of the embedded sample with φ at initialisation: relative norm
  difference of the per-scale inputs micro vs macro 0.18 (vit_tiny, random weights) and
  0.46 (EfficientNet-Lite0, ImageNet), meso vs macro 0.11 and 0.32 (was 1e-7 without φ);
  after training, 0.12 / 0.07 for the demo model (last two ViT blocks trained). What φ
  cannot undo is a backbone whose tokens all carry the same tile-global content: training
  every block of the random-init demo ViT shrank the spread of its region features by half
  and the differences to 0.045 / 0.023 (``diagnostics.scales.input_rel_diff`` of
  ``napari-sigmma evaluate`` reports it).
  Alternatives considered: regional max pooling (R-MAC style) also separates the scales, but
  changes what the feature cache holds under an unchanged cache key; attention pooling over
  region tokens needs per-scale weights and leaves the macro scale (one region) unchanged.

Models saved before the region map (``fast_region_map`` absent from their config) load in
the old, collapsed fast mode and warn loudly: their three image scales come from one input.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_sigmma.constants import CROP_SLICES, SCALES
from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
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
    B, C = fmap.shape[:2]
    parts = [F.adaptive_avg_pool2d(fmap, g).reshape(B, C, g * g) for g in (4, 2, 1)]
    return torch.cat(parts, dim=2).transpose(1, 2)


def _make_head(in_dim: int, out_dim: int, kind: str, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    raise SigmmaError(f"unknown projection head {kind!r}; choose 'linear' or 'mlp'")


class RegionMap(nn.Module):
    """Shared non-linear map of fast mode's region features, applied before the grid mean.

    ``φ(f) = W₂ · GELU(W₁ · LayerNorm(f) + b₁) + b₂`` (width kept), so
    ``u_s = mean_{r ∈ grid_s} φ(f_r)`` differs between scales (see the module docstring).

    Parameters
    ----------
    dim
        Width ``C`` of the region features.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


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
        ``dynamic_img_size``), region means of the patch tokens / feature map as the 21 crop
        features, and the shared :class:`RegionMap` before each scale's grid mean (module
        docstring). ~21× cheaper than the paper's 21 crops.
    region_map
        Fast mode only: False = no region map (models saved before it existed; every scale
        then gets the same input, and a warning says so).
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
        region_map: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone_info = backbone
        self.backbone = backbone.module
        self.fast = bool(fast)
        self.chunk_size = chunk_size
        self.embed_dim = int(embed_dim)
        self.proj = nn.ModuleDict(
            {s: _make_head(backbone.embed_dim, self.embed_dim, head, hidden) for s in SCALES}
        )
        self.region_map = RegionMap(backbone.embed_dim) if self.fast and region_map else None
        if self.fast and not region_map:
            warnings.warn(
                "fast multi-crop without the region map: micro, meso and macro get the SAME "
                "image input (the mean of region means is the whole-tile mean); only the "
                "projection heads differ. This is the collapsed fast mode of models saved "
                "before the fix: retrain (fast_region_map=True) or use paper-exact multi-crop.",
                UserWarning,
                stacklevel=2,
            )

    @property
    def feature_dim(self) -> int:
        """Width ``C`` of the backbone crop features."""
        return self.backbone_info.embed_dim

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise SigmmaError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")

    def _chunked(self, fn: Any, x: torch.Tensor) -> torch.Tensor:
        n = self.chunk_size
        if not n or x.shape[0] <= n:
            return fn(x)
        return torch.cat([fn(x[i : i + n]) for i in range(0, x.shape[0], n)], dim=0)

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` uint8 tiles → ``(B, 21, C)`` crop features.

        Paper mode: all ``21·B`` resized crops go through the backbone in one batched forward
        (in chunks of ``chunk_size`` if set). Fast mode: region means of one pass per tile.
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

    def _check_feats(self, crop_feats: torch.Tensor) -> torch.Tensor:
        if crop_feats.ndim != 3 or crop_feats.shape[1] != N_CROPS:
            raise SigmmaError(f"crop features must be (B, 21, C), got {tuple(crop_feats.shape)}")
        x = crop_feats.float()
        return self.region_map(x) if self.region_map is not None else x

    def scale_inputs(self, crop_feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 21, C)`` crop features → ``{scale: (B, C)}``, what each scale's head sees:
        the grid mean of the crop features (fast mode: of their region map)."""
        return pool_scales(self._check_feats(crop_feats))

    def heads(self, crop_feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 21, C)`` crop features → ``{scale: (B, D)}`` (:meth:`scale_inputs`, then
        the scale's head)."""
        pooled = self.scale_inputs(crop_feats)
        return {s: self.proj[s](pooled[s]) for s in SCALES}

    def crop_embeddings(self, crop_feats: torch.Tensor) -> torch.Tensor:
        """``(B, 21, C)`` → ``(B, 21, D)``: every crop (its region map in fast mode) through
        its own scale's head (the per-patch counterparts of the pooled tile embeddings;
        exact for the macro crop and for linear heads, whose mean over crops is the tile
        embedding)."""
        x = self._check_feats(crop_feats)
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


def scale_input_rel_diff(model: Any, crop_feats: torch.Tensor) -> dict[str, float]:
    """How different the per-scale image inputs are (before the heads).

    Parameters
    ----------
    model
        A SigmmaModel or a :class:`MultiCropImageEncoder`.
    crop_feats
        ``(B, 21, C)`` crop features of some tiles.

    Returns
    -------
    dict
        ``{"micro_vs_macro", "meso_vs_macro"}``: mean over tiles of
        ``‖u_s − u_macro‖ / ‖u_macro‖`` (0 = the scales see the same vector).
    """
    enc = getattr(model, "image", model)
    with torch.no_grad():
        u = enc.scale_inputs(crop_feats)
    ref = u["macro"].double()
    den = ref.norm(dim=1).clamp_min(1e-12)
    return {
        f"{s}_vs_macro": float(((u[s].double() - ref).norm(dim=1) / den).mean())
        for s in ("micro", "meso")
    }
