"""SigmmaModel end to end: config, fine-tuning policies, feature caching, attention, a few
optimisation steps on a small paired problem."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _models_data import make_batch, one_thread
from napari_sigmma.errors import SigmmaError
from napari_sigmma.models.config import ModelConfig
from napari_sigmma.models.graph import GraphOutput
from napari_sigmma.models.sigmma import SigmmaModel


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    yield from one_thread()


F, G = 8, 12


def _model(**kw) -> SigmmaModel:
    torch.manual_seed(0)
    base = dict(backbone="vit_tiny", pretrained=False, img_size=32, embed_dim=16, hidden=16)
    base.update(kw)
    return SigmmaModel(ModelConfig(**base), F, G)


def test_config_is_plain_and_round_trips():
    cfg = ModelConfig(backbone="uni", checkpoint="/x/pytorch_model.bin", scales=["macro"])
    d = dataclasses.asdict(cfg)
    assert d["scales"] == ("macro",) and d["gnn_layers"] == (2, 1, 1)
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # as YAML gives
    assert ModelConfig.from_dict(plain) == cfg
    assert all(isinstance(v, (str, int, float, bool, tuple, type(None))) for v in d.values())
    with pytest.raises(SigmmaError, match="finetune"):
        ModelConfig(finetune="some")
    with pytest.raises(SigmmaError, match="scales"):
        ModelConfig(scales=("nano",))
    with pytest.raises(SigmmaError, match="unknown model config keys"):
        ModelConfig.from_dict({"backbone": "uni", "lr": 1})


def _trainable_names(m: SigmmaModel) -> set[str]:
    return {n for n, p in m.image.backbone.named_parameters() if p.requires_grad}


def test_finetune_policies_vit():
    m = _model(finetune="frozen")
    assert _trainable_names(m) == set() and m.backbone_frozen
    m.train()
    assert not m.image.backbone.training and m.graph.training and m.image.proj.training
    assert all(p.requires_grad for p in m.image.proj.parameters())
    assert m.logit_scale.requires_grad

    m = _model(finetune="last_k", last_k=2)
    names = _trainable_names(m)
    assert names and all(n.startswith(("blocks.10.", "blocks.11.", "norm.")) for n in names)
    assert any(n.startswith("blocks.10.") for n in names)
    m.train()
    assert m.image.backbone.blocks[11].training and not m.image.backbone.blocks[9].training
    assert not m.image.backbone.patch_embed.training

    m = _model(finetune="full")
    assert all(p.requires_grad for p in m.image.backbone.parameters())
    n_all = sum(p.numel() for p in m.parameters())
    assert sum(p.numel() for p in m.trainable_parameters()) == n_all


def test_finetune_last_k_cnn_keeps_frozen_batchnorm_in_eval():
    m = _model(backbone="efficientnet_lite0", pretrained=True, finetune="last_k", last_k=1)
    names = _trainable_names(m)
    assert names
    assert all(n.startswith(("blocks.6.", "conv_head.", "bn2.")) for n in names)
    m.train()
    bb = m.image.backbone
    assert not bb.bn1.training and not bb.blocks[0].training
    assert bb.blocks[6].training and bb.bn2.training
    # a training-mode forward leaves the frozen BatchNorm statistics untouched
    before = bb.bn1.running_mean.clone()
    m.backbone_features(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert torch.equal(bb.bn1.running_mean, before)


def test_cached_features_give_the_same_loss_as_images():
    m = _model().eval()
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    batch = make_batch(n_features=F, n_genes=G)
    with torch.no_grad():
        feats = m.backbone_features(images)
        a = m(images, batch)
        b = m(feats, batch)
    assert feats.shape == (3, 21, 192)
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-5)
    assert set(a["parts"]) == {"micro", "meso", "macro"}
    assert isinstance(a["st"], GraphOutput)
    # frozen backbone: no autograd graph is built through it
    m.train()
    assert not m.backbone_features(images).requires_grad


def test_encode_image_attention_vit_and_cnn():
    m = _model().eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = m.encode_image(images, attention=True)
    assert out["attention"].shape == (2, 3, 2, 2)  # 32-px macro crop, patch 16
    assert torch.allclose(out["attention"].sum((-1, -2)), torch.ones(2, 3), atol=1e-5)
    assert all(out[s].shape == (2, 16) for s in ("micro", "meso", "macro"))
    cnn = _model(backbone="efficientnet_lite0", img_size=64).eval()
    with torch.no_grad():
        out = cnn.encode_image(images, attention=True)
    assert "attention" not in out and out["macro"].shape == (2, 16)


def test_training_steps_reduce_the_loss_and_move_the_temperature():
    """Cached crop features of 6 tiles paired with their cell graphs: 40 Adam steps on the
    heads, the graph encoder (edge sampler included) and τ lower the multi-scale loss well
    below chance (3·log 6 ≈ 5.4). The first Adam steps at τ = 0.07 overshoot (the loss rises
    before it falls), so only the end point is checked. The crop features are random vectors:
    a random-init ViT gives nearly the same features for all tiles."""
    m = _model(scales=("micro", "meso", "macro"))
    batch = make_batch((30, 25, 35, 20, 28, 33), n_features=F, n_genes=G)
    feats = torch.randn(6, 21, 192, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(m.trainable_parameters(), lr=2e-3)
    m.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(40):
        out = m(feats, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.3 * losses[0] and losses[-1] < 2.0, losses
    assert m.temperature != pytest.approx(0.07)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.graph.scorers.parameters())


def test_ablations_build_and_run():
    batch = make_batch(n_features=F, n_genes=G)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    m = _model(use_graph=False, scales=("macro",), learn_temperature=False)
    assert not isinstance(m.logit_scale, torch.nn.Parameter)
    # the graph encoder is replaced, not bypassed: the ST side reads the gene vector only
    from napari_sigmma.models.graph import GeneVectorEncoder, HierarchicalGraphEncoder

    assert isinstance(m.graph, GeneVectorEncoder)
    assert not any(isinstance(mod, HierarchicalGraphEncoder) for mod in m.modules())
    m.eval()
    with torch.no_grad():
        st = m.encode_graph(batch).emb["macro"]
        moved = batch.clone()
        moved.x = torch.randn_like(moved.x)
        moved.pos = torch.rand_like(moved.pos) * 0.999
        moved.edge_index = moved.edge_index[:, :0]
        torch.testing.assert_close(m.encode_graph(moved).emb["macro"], st)
        moved.genevec = moved.genevec.flip(0)
        assert not torch.allclose(m.encode_graph(moved).emb["macro"], st)
    m.train()
    out = m(images, batch)
    assert list(out["parts"]) == ["macro"]
    out["loss"].backward()
    assert m.temperature == pytest.approx(0.07)
    m = _model(sparsify=False, dense_k=None, fast_multicrop=True)
    out = m(images, batch)
    assert out["st"].edges["macro"][0].shape[1] > 0
    assert torch.isfinite(out["loss"])


def test_state_dict_round_trip(tmp_path):
    m = _model().eval()
    path = tmp_path / "model.pt"
    torch.save({"config": m.cfg.to_dict(), "state": m.state_dict()}, path)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    m2 = SigmmaModel(ModelConfig.from_dict(ck["config"]), F, G)
    m2.load_state_dict(ck["state"])
    m2.eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    batch = make_batch((20, 30), n_features=F, n_genes=G)
    with torch.no_grad():
        a, b = m(images, batch), m2(images, batch)
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-6)
