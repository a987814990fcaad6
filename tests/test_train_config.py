"""TrainConfig: YAML round trip with the nested ModelConfig, errors naming the file."""

from __future__ import annotations

import pytest

from napari_sigmma.errors import SigmmaError
from napari_sigmma.models.config import ModelConfig
from napari_sigmma.train.config import TrainConfig


def test_yaml_round_trip_keeps_nested_model(tmp_path):
    cfg = TrainConfig(
        data=[str(tmp_path / "a"), str(tmp_path / "b")],
        run_dir=str(tmp_path / "run"),
        epochs=3,
        split_fractions=(0.6, 0.2, 0.2),
        graph_max_dist_um=40.0,
        model=ModelConfig(backbone="vit_tiny", scales=("macro",), gnn_layers=(1, 1, 1)),
    )
    path = tmp_path / "c.yaml"
    cfg.save_yaml(path)
    text = path.read_text()
    assert "backbone: vit_tiny" in text and "split_fractions:" in text
    back = TrainConfig.from_yaml(path)
    assert back == cfg
    assert isinstance(back.model, ModelConfig)
    assert back.model.scales == ("macro",) and back.split_fractions == (0.6, 0.2, 0.2)


def test_defaults_are_the_fast_cpu_setting():
    cfg = TrainConfig()
    assert cfg.model.backbone == "efficientnet_lite0"
    assert cfg.model.finetune == "frozen" and cfg.cache_features
    assert (cfg.tile_px, cfg.target_mpp) == (256, 0.5)


def test_unknown_keys_name_the_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(SigmmaError, match="learning_rate") as err:
        TrainConfig.from_yaml(p)
    assert str(p) in str(err.value)
    p.write_text("model:\n  backbone: vit_tiny\n  depth: 3\n")
    with pytest.raises(SigmmaError, match="depth") as err:
        TrainConfig.from_yaml(p)
    assert str(p) in str(err.value)


def test_bad_values_and_bad_yaml_raise(tmp_path):
    p = tmp_path / "v.yaml"
    p.write_text("batch_size: 1\n")
    with pytest.raises(SigmmaError, match="batch_size") as err:
        TrainConfig.from_yaml(p)
    assert str(p) in str(err.value)
    p.write_text("model:\n  finetune: sometimes\n")
    with pytest.raises(SigmmaError, match="finetune"):
        TrainConfig.from_yaml(p)
    p.write_text("epochs: [1\n")
    with pytest.raises(SigmmaError, match="YAML"):
        TrainConfig.from_yaml(p)
    with pytest.raises(SigmmaError, match="cannot read"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_replace_changes_model_fields():
    cfg = TrainConfig().replace(epochs=5, model={"finetune": "full"})
    assert cfg.epochs == 5 and cfg.model.finetune == "full"
    assert cfg.model.backbone == "efficientnet_lite0"
