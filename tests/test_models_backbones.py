"""Backbone registry: real timm models, the real EfficientNet-Lite0 ImageNet weights, bad
checkpoints, attention maps and the UNI loading path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _models_data import one_thread
from napari_sigmma.errors import SigmmaError
from napari_sigmma.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    available_backbones,
    create_backbone,
    efficientnet_lite0_weights_file,
    uni2h_kwargs,
    uni_kwargs,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def effnet():
    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def vit_tiny():
    torch.manual_seed(0)
    return create_backbone("vit_tiny", pretrained=False)


def test_registry_names():
    assert set(available_backbones()) >= {
        "uni",
        "uni2-h",
        "vit_small",
        "vit_tiny",
        "efficientnet_lite0",
        "resnet50",
    }
    with pytest.raises(SigmmaError, match="unknown backbone"):
        create_backbone("vit_huge_nonexistent")


def test_efficientnet_lite0_loads_the_shipped_imagenet_weights(effnet):
    path = efficientnet_lite0_weights_file()
    file_sd = torch.load(path, map_location="cpu", weights_only=True)
    file_tensors = [v for k, v in file_sd.items() if not k.endswith("num_batches_tracked")]
    model_tensors = [
        v for k, v in effnet.module.state_dict().items() if not k.endswith("num_batches_tracked")
    ]
    # the file's classifier (_fc) is the only part a num_classes=0 extractor lacks
    assert len(file_tensors) == len(model_tensors) + 2
    for a, b in zip(file_tensors[:-2], model_tensors, strict=True):
        assert torch.equal(a, b)
    assert effnet.embed_dim == 1280 and not effnet.is_vit
    assert effnet.mean == IMAGENET_MEAN and effnet.std == IMAGENET_STD
    assert str(path) in effnet.source


def test_efficientnet_lite0_classifies_real_photos(effnet):
    """Features + the file's ImageNet classifier recognise two real photographs shipped with
    scikit-image: a tabby cat (ImageNet 281-285 are cats) and a cup of espresso (967/968)."""
    from skimage import data

    file_sd = torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    w, b = file_sd["_fc.weight"], file_sd["_fc.bias"]
    imgs = []
    for im in (data.chelsea(), data.coffee()):
        x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None]
        x = torch.nn.functional.interpolate(
            x.float(), size=(224, 224), mode="bilinear", antialias=True
        )
        imgs.append(x.round().clamp(0, 255).to(torch.uint8))
    with torch.no_grad():
        logits = effnet.features(torch.cat(imgs)) @ w.t() + b
    top = logits.argmax(-1).tolist()
    assert 281 <= top[0] <= 285, top
    assert top[1] in (967, 968), top
    # and not because every image maps to those classes
    noise = torch.randint(
        0, 256, (1, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        p = (effnet.features(noise) @ w.t() + b).softmax(-1)
    assert p[0, 281:286].sum() < 0.5 and p[0, 967:969].sum() < 0.5


def test_checkpoint_round_trip_and_wrappers(tmp_path, vit_tiny):
    sd = vit_tiny.module.state_dict()
    plain = tmp_path / "vit_tiny.pt"
    torch.save(sd, plain)
    wrapped = tmp_path / "wrapped.pt"
    # a DDP-style prefix, a wrapper dict and an ImageNet head the extractor does not have
    head = {"head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}
    torch.save({"state_dict": {**{f"module.{k}": v for k, v in sd.items()}, **{
        f"module.{k}": v for k, v in head.items()}}}, wrapped)  # fmt: skip
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        ref = vit_tiny.features(x)
        for path in (plain, wrapped):
            bb = create_backbone("vit_tiny", checkpoint=path)
            assert bb.source == str(path)
            assert torch.allclose(bb.features(x), ref, atol=1e-5)


def test_checkpoint_of_another_backbone_is_refused(tmp_path, vit_tiny):
    path = tmp_path / "tiny_weights.pt"
    torch.save(vit_tiny.module.state_dict(), path)
    with pytest.raises(SigmmaError) as err:
        create_backbone("efficientnet_lite0", checkpoint=path)
    msg = str(err.value)
    assert str(path) in msg and "missing keys" in msg and "conv_stem.weight" in msg
    with pytest.raises(SigmmaError) as err:  # same keys, other widths
        create_backbone("vit_small", checkpoint=path)
    msg = str(err.value)
    assert str(path) in msg and "shape mismatches" in msg and "(1, 1, 192)" in msg
    with pytest.raises(SigmmaError, match=r"tiny_weights\.pt"):
        create_backbone("uni", checkpoint=path)


def test_corrupt_and_missing_checkpoints(tmp_path, vit_tiny):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(SigmmaError, match=r"junk\.bin.*corrupt"):
        create_backbone("vit_tiny", checkpoint=junk)
    good = tmp_path / "good.pt"
    torch.save(vit_tiny.module.state_dict(), good)
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SigmmaError, match=r"truncated\.pt"):
        create_backbone("vit_tiny", checkpoint=cut)
    with pytest.raises(SigmmaError, match="not found"):
        create_backbone("resnet50", checkpoint=tmp_path / "nope.pt")
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(SigmmaError, match=r"empty\.pt"):
        create_backbone("vit_tiny", checkpoint=empty)


def _manual_cls_attention(bb, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: q·k of the last block from its own qkv projection."""
    attn = bb.module.blocks[-1].attn
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0]))
    try:
        bb.module.forward_features(bb.normalize(x))
    finally:
        handle.remove()
    t = seen["x"]
    B, N, C = t.shape
    qkv = attn.qkv(t).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
    return a[:, :, 0, bb.num_prefix_tokens :]


def test_vit_tiny_attention_maps(vit_tiny):
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        maps = vit_tiny.attention_maps(x)
        ref = _manual_cls_attention(vit_tiny, x)
    assert maps.shape == (2, 3, 14, 14)
    assert (maps >= 0).all()
    # prefix (CLS) column dropped, then renormalised over the 196 patches
    assert torch.allclose(maps.sum(dim=(-1, -2)), torch.ones(2, 3), atol=1e-5)
    ref = ref / ref.sum(-1, keepdim=True)
    assert torch.allclose(maps.reshape(2, 3, -1), ref, atol=1e-5)
    # fused attention is restored afterwards
    assert (
        vit_tiny.module.blocks[-1].attn.fused_attn
        == type(vit_tiny.module.blocks[0].attn)(8, 2).fused_attn
    )
    # dynamic image size: a 256-px tile gives a 16x16 grid
    with torch.no_grad():
        assert vit_tiny.attention_maps(torch.zeros(1, 3, 256, 256, dtype=torch.uint8)).shape == (
            1, 3, 16, 16)  # fmt: skip


def test_cnn_has_no_attention(effnet):
    with pytest.raises(SigmmaError, match="no attention heads for CNN backbone"):
        effnet.attention_maps(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_feature_maps_and_resnet():
    bb = create_backbone("resnet50", pretrained=False, img_size=64)
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert bb.features(x).shape == (1, 2048)
        assert bb.feature_map(x).shape == (1, 2048, 2, 2)
    assert bb.patch_size == 32 and bb.input_size == 64 and bb.num_heads == 0


def test_uni_factory_path_with_a_tiny_vit(tmp_path):
    """The UNI factory code (folder with ``pytorch_model.bin``, meta-device build, strict
    assign-load, ImageNet normalisation) on a ViT-Tiny body with UNI's kwargs; the real
    ViT-L/16 is the slow test below."""
    import timm

    from napari_sigmma.models.backbones import _build_uni_like

    kwargs = uni_kwargs()
    src = timm.create_model("vit_tiny_patch16_224", **kwargs)
    assert src.blocks[0].ls1.gamma.shape == (192,)  # init_values → LayerScale, as UNI has
    folder = tmp_path / "uni_tiny"
    folder.mkdir()
    torch.save(src.state_dict(), folder / "pytorch_model.bin")

    def build(checkpoint, pretrained=True):
        return _build_uni_like(
            name="uni",
            arch="vit_tiny_patch16_224",
            kwargs=kwargs,
            hub_id="hf-hub:none/none",
            checkpoint=checkpoint,
            pretrained=pretrained,
            input_size=224,
        )

    bb = build(folder)
    assert bb.source == str(folder / "pytorch_model.bin")
    assert bb.mean == IMAGENET_MEAN and bb.std == IMAGENET_STD
    for k, v in src.state_dict().items():
        assert torch.equal(bb.module.state_dict()[k], v), k
    x = torch.randint(0, 256, (1, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(bb.features(x), src.eval()(bb.normalize(x)), atol=1e-5)
    # the same file with one tensor cut: strict loading names it
    sd = src.state_dict()
    sd.pop("blocks.3.ls2.gamma")
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(SigmmaError, match=r"missing keys: blocks\.3\.ls2\.gamma"):
        build(folder)
    assert build(None, pretrained=False).embed_dim == 192


@pytest.mark.slow
def test_uni_factory_loads_a_local_checkpoint(tmp_path):
    """The real UNI ViT-L/16 factory with a state dict of the right shapes saved as
    ``pytorch_model.bin`` in a folder (the layout of the gated download). ~7 s on an idle
    2-core CPU (1.2 GB written and read), much longer on a busy one, hence slow."""
    import timm

    with torch.device("meta"):
        ref = timm.create_model("vit_large_patch16_224", **uni_kwargs())
    # zeros are allocated for free (random values for 300M floats take 5-8 s); a few tensors
    # get distinct random values so the test sees that they land where they belong
    sd = {k: torch.zeros(v.shape) for k, v in ref.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for k in ("pos_embed", "blocks.23.ls2.gamma", "norm.weight", "blocks.0.attn.qkv.weight"):
        sd[k] = torch.randn(sd[k].shape, generator=g)
    folder = tmp_path / "uni"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    bb = create_backbone("uni", checkpoint=folder)
    assert bb.embed_dim == 1024 and bb.is_vit and bb.patch_size == 16
    assert bb.num_prefix_tokens == 1 and bb.num_heads == 16
    assert bb.mean == IMAGENET_MEAN and bb.std == IMAGENET_STD  # not timm's 0.5/0.5
    got = bb.module.state_dict()
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert not any(t.is_meta for t in got.values())
    # a small input (dynamic_img_size) keeps the ViT-L forward cheap on a shared CPU
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = bb.features(x)
        att = bb.attention_maps(x)
    assert out.shape == (1, 1024) and torch.isfinite(out).all()
    assert att.shape == (1, 16, 4, 4)


def test_uni_needs_weights_and_uni2h_architecture():
    with pytest.raises(SigmmaError, match="gated"):
        create_backbone("uni")
    with pytest.raises(SigmmaError, match="gated"):
        create_backbone("uni2-h")
    import timm

    with torch.device("meta"):  # shapes only: ViT-g is 681M parameters
        m = timm.create_model("vit_giant_patch14_224", **uni2h_kwargs())
    assert m.num_prefix_tokens == 9 and m.num_features == 1536
    assert m.patch_embed.patch_size == (14, 14) and len(m.blocks) == 24
    assert m.blocks[-1].attn.num_heads == 24
