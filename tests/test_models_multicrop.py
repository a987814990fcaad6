"""Multi-crop image encoder: crop layout, batching, heads, fast mode (real backbones)."""

from __future__ import annotations

import pytest
import torch

from _models_data import one_thread
from napari_sigmma.models.backbones import create_backbone
from napari_sigmma.models.multicrop import (
    CROP_SLICES,
    MultiCropImageEncoder,
    make_crops,
    pool_scales,
    region_pool,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


COLOURS = [(200, 30, 40), (20, 180, 60), (40, 50, 210), (230, 220, 30)]


@pytest.fixture(scope="module")
def effnet64():
    # real ImageNet weights; 64-px crops keep the 21·B forward cheap
    return create_backbone("efficientnet_lite0", img_size=64)


def _quadrant_image(side: int) -> torch.Tensor:
    img = torch.zeros(3, side, side, dtype=torch.uint8)
    h = side // 2
    for j, c in enumerate(COLOURS):
        r, q = divmod(j, 2)
        img[:, r * h : (r + 1) * h, q * h : (q + 1) * h] = torch.tensor(c, dtype=torch.uint8)[
            :, None, None
        ]
    return img


def test_crop_geometry_without_resizing():
    """Pixel (y, x) holds the value y*S + x; with crops cut to their own size the crops are
    exactly the grid cells, in row-major order, micro then meso then macro."""
    S = 16
    x = torch.arange(S * S, dtype=torch.float32).reshape(1, 1, S, S).repeat(2, 3, 1, 1)
    x[1] += 1000  # a second tile stays separate
    crops = make_crops(x, 4)  # micro crops are 4x4: no resampling for them
    assert crops.shape == (2, 21, 3, 4, 4)
    for b in range(2):
        for j in range(16):
            r, c = divmod(j, 4)
            assert torch.equal(crops[b, j], x[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4])
    # meso crop j = the j-th quadrant (8x8) downsampled: its mean is the quadrant's mean
    for j in range(4):
        r, c = divmod(j, 2)
        quad = x[0, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
        assert torch.allclose(crops[0, 16 + j].mean(), quad.mean(), rtol=1e-4)
    assert torch.allclose(crops[0, 20].mean(), x[0].mean(), rtol=1e-4)


def test_crop_geometry_with_uneven_tile():
    S = 18  # not divisible by 4: crop bounds are rounded, nothing is dropped or reused
    x = torch.rand(1, 3, S, S)
    crops = make_crops(x, 8)
    assert crops.shape == (1, 21, 3, 8, 8)
    edges = [0, 4, 9, 14, 18]  # round(i*18/4)
    c5 = torch.nn.functional.interpolate(
        x[:, :, edges[1] : edges[2], edges[1] : edges[2]],
        size=(8, 8),
        mode="bilinear",
        antialias=True,
    )
    assert torch.allclose(crops[0, 5], c5[0])


def test_quadrant_colours_give_the_constant_image_features(effnet64):
    """Meso crop j of a tile whose quadrants are constant colours has exactly the features of
    the constant image of colour j; micro crops inside quadrant j too; macro differs."""
    enc = MultiCropImageEncoder(effnet64, 32).eval()
    tile = _quadrant_image(128)[None]
    with torch.no_grad():
        feats = enc.backbone_features(tile)
        consts = torch.stack(
            [torch.tensor(c, dtype=torch.uint8)[:, None, None].expand(3, 64, 64) for c in COLOURS]
        )
        ref = effnet64.features(consts)
    assert feats.shape == (1, 21, 1280)
    for j in range(4):
        assert torch.allclose(feats[0, 16 + j], ref[j], atol=1e-4)
    for m in range(16):
        r, c = divmod(m, 4)
        quadrant = 2 * (r // 2) + c // 2
        assert torch.allclose(feats[0, m], ref[quadrant], atol=1e-4)
    # the colours are distinguishable, and the macro crop is none of them
    assert min((ref[i] - ref[j]).abs().max() for i in range(4) for j in range(i)) > 0.1
    assert all((feats[0, 20] - ref[j]).abs().max() > 0.1 for j in range(4))


def test_batched_forward_chunking_and_heads(effnet64):
    torch.manual_seed(0)
    tiles = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    enc = MultiCropImageEncoder(effnet64, 16, head="mlp", hidden=24).eval()
    chunked = MultiCropImageEncoder(effnet64, 16, chunk_size=10).eval()
    with torch.no_grad():
        feats = enc.backbone_features(tiles)
        assert torch.allclose(chunked.backbone_features(tiles), feats, atol=1e-4)
        # tile order is preserved: tile 1 alone gives the same crops
        assert torch.allclose(enc.backbone_features(tiles[1:2])[0], feats[1], atol=1e-4)
        out = enc.heads(feats)
        pooled = pool_scales(feats)
    assert set(out) == {"micro", "meso", "macro"}
    assert all(v.shape == (3, 16) for v in out.values())
    assert torch.allclose(pooled["micro"], feats[:, :16].mean(1))
    assert torch.allclose(pooled["meso"], feats[:, 16:20].mean(1))
    assert torch.allclose(pooled["macro"], feats[:, 20])
    with torch.no_grad():
        assert torch.allclose(out["meso"], enc.proj["meso"](feats[:, 16:20].mean(1)))
    # per-crop embeddings: each crop through its scale's head
    with torch.no_grad():
        ce = enc.crop_embeddings(feats)
    assert ce.shape == (3, 21, 16)
    assert torch.allclose(ce[:, 20], out["macro"], atol=1e-6)
    # gradients reach the heads through the pooled features
    enc.train()
    loss = sum(v.sum() for v in enc.heads(feats).values())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.proj.parameters())


def test_region_pool_layout():
    # feature value = its grid row*8+col on an 8x8 map: region means are known
    fmap = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    pooled = region_pool(fmap)
    assert pooled.shape == (1, 21, 1)
    for j in range(16):
        r, c = divmod(j, 4)
        assert pooled[0, j, 0] == fmap[0, 0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean()
    for j in range(4):
        r, c = divmod(j, 2)
        assert pooled[0, 16 + j, 0] == fmap[0, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].mean()
    assert pooled[0, 20, 0] == fmap.mean()
    assert [CROP_SLICES[s] for s in ("micro", "meso", "macro")] == [
        slice(0, 16),
        slice(16, 20),
        slice(20, 21),
    ]


def test_fast_mode_one_pass_per_tile():
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny", pretrained=False)
    enc = MultiCropImageEncoder(bb, 8, fast=True).eval()
    tiles = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        feats = enc.backbone_features(tiles)
        fmap = bb.feature_map(tiles)  # native resolution: 8x8 patch tokens
        att = enc.macro_attention(tiles)
    assert fmap.shape == (2, 192, 8, 8)
    assert feats.shape == (2, 21, 192)
    assert torch.allclose(feats[:, 5], fmap[:, :, 2:4, 2:4].mean(dim=(-1, -2)), atol=1e-5)
    assert torch.allclose(feats[:, 20], fmap.mean(dim=(-1, -2)), atol=1e-5)
    assert att.shape == (2, 3, 8, 8)
    # paper mode resizes the macro crop to the backbone's input size first
    paper = MultiCropImageEncoder(bb, 8).eval()
    with torch.no_grad():
        assert paper.macro_attention(tiles).shape == (2, 3, 14, 14)
