"""Fast multi-crop keeps the three image scales distinct (the region map before the grid
mean), on real tiles of the embedded sample; old collapsed-mode checkpoints still load, and
warn."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from _models_data import one_thread
from napari_sigmma.models.backbones import create_backbone
from napari_sigmma.models.multicrop import (
    MultiCropImageEncoder,
    pool_scales,
    scale_input_rel_diff,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def real_tiles(embedded_bundle) -> torch.Tensor:
    """12 tissue tiles (256 px at 0.5 µm/px) of the embedded sample, uint8 (B, 3, S, S)."""
    from napari_sigmma.io import load_any, slide_name
    from napari_sigmma.tiles.dataset import prepare_slide
    from napari_sigmma.tiles.paired import PairedSlide

    paired = PairedSlide.from_sdata(load_any(embedded_bundle), name=slide_name(embedded_bundle))
    st = prepare_slide(paired)
    images = st.load_images()
    pick = np.linspace(0, len(images) - 1, 12).round().astype(int)
    return torch.from_numpy(images[pick]).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize(
    "name, kw", [("vit_tiny", {"pretrained": False}), ("efficientnet_lite0", {})]
)
def test_fast_scale_inputs_differ_on_real_tiles(real_tiles, name, kw):
    torch.manual_seed(0)
    bb = create_backbone(name, **kw)
    enc = MultiCropImageEncoder(bb, 16, fast=True).eval()
    with torch.no_grad():
        feats = enc.backbone_features(real_tiles)
    d = scale_input_rel_diff(enc, feats)
    assert d["micro_vs_macro"] > 0.05 and d["meso_vs_macro"] > 0.05, d
    # the region means alone collapse (what the fix is for): the mean of region means is
    # the whole-map mean
    raw = pool_scales(feats)
    rel = ((raw["micro"] - raw["macro"]).norm(dim=1) / raw["macro"].norm(dim=1)).max()
    assert rel < 1e-4
    # the heads see exactly the region-mapped grid means
    with torch.no_grad():
        u = enc.scale_inputs(feats)
        mapped = enc.region_map(feats)
        assert torch.allclose(u["micro"], mapped[:, :16].mean(1), atol=1e-5)
        assert torch.allclose(enc.heads(feats)["meso"], enc.proj["meso"](u["meso"]), atol=1e-5)
        ce = enc.crop_embeddings(feats)
        assert torch.allclose(ce[:, 20], enc.heads(feats)["macro"], atol=1e-5)


def test_paper_mode_is_unchanged_and_collapsed_fast_mode_warns():
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny", pretrained=False, img_size=32)
    paper = MultiCropImageEncoder(bb, 8)
    assert paper.region_map is None
    feats = torch.randn(3, 21, bb.embed_dim)
    u = paper.scale_inputs(feats)
    ref = pool_scales(feats)
    assert all(torch.equal(u[s], ref[s]) for s in ref)
    with pytest.warns(UserWarning, match="SAME"):
        old = MultiCropImageEncoder(bb, 8, fast=True, region_map=False)
    # collapsed mode: region means of one map give every scale the same input
    from napari_sigmma.models.multicrop import region_pool

    d = scale_input_rel_diff(old, region_pool(torch.rand(2, bb.embed_dim, 8, 8)))
    assert d["micro_vs_macro"] < 1e-5 and d["meso_vs_macro"] < 1e-5


def test_old_fast_checkpoint_config_loads_collapsed_new_configs_get_the_map():
    from napari_sigmma.models.config import ModelConfig
    from napari_sigmma.models.sigmma import SigmmaModel

    full = dataclasses.asdict(ModelConfig(fast_multicrop=True))
    old = {k: v for k, v in full.items() if k not in ("fast_region_map", "candidate_cap")}
    assert ModelConfig.from_dict(old).fast_region_map is False  # a pre-fix checkpoint
    assert ModelConfig.from_dict({"fast_multicrop": True}).fast_region_map is True  # a recipe
    assert ModelConfig.from_dict(full).fast_region_map is True
    small = {"backbone": "vit_tiny", "pretrained": False, "img_size": 32, "embed_dim": 8}
    cfg = ModelConfig.from_dict({**old, **small, "hidden": 8, "head_hidden": 8})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = SigmmaModel(cfg, 4, 5)
    assert m.image.region_map is None and any("SAME" in str(x.message) for x in w)
    assert not any(k.startswith("image.region_map") for k in m.state_dict())
