"""Table 4 exactly (cumulative rows), seeds with paired bootstrap CIs, topology controls.

The row configurations are checked on a real TrainConfig; the bootstrap on constructed
per-tile values with a known gap; the shuffled-position control on the real tiles of a
layout-benchmark bundle; and (slow) the whole ``evaluate --baselines --seeds 2`` on a tiny
model of that bundle.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from _train_data import tiny_cfg


@pytest.fixture(scope="module")
def layout_bundle(sigmma_cache: Path) -> Path:
    from napari_sigmma.samples.layout import write_layout_benchmark

    out = sigmma_cache / "layout_8_seed0"
    if not (out / "experiment.xenium").is_file():
        write_layout_benchmark(out, n_side=8, seed=0)
    return out


def test_the_four_rows_are_exactly_the_cumulative_ones(tmp_path) -> None:
    from napari_sigmma.evaluation.table4 import (
        LEAVE_ONE_OUT,
        TABLE4_ROWS,
        marks,
        row_config,
    )
    from napari_sigmma.train.config import TrainConfig

    ref = TrainConfig.from_dict(
        {"data": ["x"], "run_dir": str(tmp_path / "ref"), "model": {"embed_dim": 48}, "seed": 5}
    )
    want = {
        "row1": (False, False, False),
        "row2": (True, False, False),
        "row3": (True, True, False),
        "row4": (True, True, True),
    }
    got = {}
    for name, ch in TABLE4_ROWS.items():
        cfg = row_config(ref, ch, tmp_path / name, seed=7, ref_run=tmp_path / "ref")
        m = cfg.model.to_dict()
        got[name] = tuple(marks(m).values())
        # only the three switches (and the seed and folders) differ from the reference
        ref_m = ref.model.to_dict()
        assert {k for k in m if m[k] != ref_m[k]} <= {"use_graph", "scales", "sparsify"}
        assert cfg.seed == 7 and cfg.split_fractions == ref.split_fractions
        assert cfg.model.use_graph == want[name][0]
        assert (cfg.model.scales == ("micro", "meso", "macro")) == want[name][1]
        if cfg.model.use_graph:
            assert cfg.model.sparsify == want[name][2]
    assert got == want
    # each row adds exactly one mark to the row before it
    seq = [want[f"row{i}"] for i in range(1, 5)]
    for a, b in itertools.pairwise(seq):
        assert sum(y and not x for x, y in zip(a, b, strict=True)) == 1
    # the leave-one-out variants each switch off exactly one component of the full model
    full = TABLE4_ROWS["row4"]
    for ch in LEAVE_ONE_OUT.values():
        assert sum(ch[k] != full[k] for k in full) == 1


def test_paired_bootstrap_ci_covers_a_constructed_gap() -> None:
    from napari_sigmma.evaluation.stats import paired_bootstrap

    rng = np.random.default_rng(0)
    gap = 0.05
    covered = excluded = 0
    reps = 120
    for r in range(reps):
        tile = rng.normal(0.5, 0.2, 150)  # tile difficulty, shared by both models
        b = tile + rng.normal(0, 0.1, (3, 150))  # 3 seeds
        a = tile + gap + rng.normal(0, 0.1, (3, 150))
        ci = paired_bootstrap(a, b, n_boot=600, seed=r)
        covered += ci["lo"] <= gap <= ci["hi"]
        excluded += ci["excludes_zero"]
        assert ci["n_tiles"] == 150 and ci["n_seeds"] == 3
    # a 95 % interval: coverage near 0.95, and this gap is resolved nearly always
    assert 0.88 <= covered / reps <= 1.0
    assert excluded / reps > 0.9
    # a null gap: the interval covers 0 about 95 % of the time
    null = sum(
        (lambda c: c["lo"] <= 0 <= c["hi"])(
            paired_bootstrap(
                rng.normal(0, 0.1, (2, 100)), rng.normal(0, 0.1, (2, 100)), n_boot=600, seed=r
            )
        )
        for r in range(80)
    )
    assert null / 80 >= 0.85
    # hits (0/1) work the same way
    h = paired_bootstrap(np.ones(50), np.zeros(50))
    assert h["gap"] == 1.0 and h["lo"] == 1.0


def test_group_hits_chance_and_perfect_retrieval() -> None:
    from napari_sigmma.evaluation.stats import group_hits

    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 8))
    groups = np.repeat(["a", "b", "c"], 8)
    g = group_hits(x, x, groups)
    assert g["he_to_st"].mean() == 1.0 and g["st_to_he"].mean() == 1.0
    assert g["chance"] == pytest.approx(1 / 8)
    const = group_hits(np.ones((24, 8)), np.ones((24, 8)), groups)
    assert const["he_to_st"].mean() == 0.0  # ties count against the query


def test_shuffled_positions_change_the_graph_and_keep_the_gene_vector(layout_bundle, tmp_path):
    from napari_sigmma.evaluation.controls import shuffle_positions
    from napari_sigmma.train.data import prepare_run_data

    cfg = tiny_cfg(layout_bundle, tmp_path / "run", tmp_path / "cache")
    rd = prepare_run_data(cfg)
    slide = rd.slides[0]
    tiles = [t for t in range(len(slide.cells)) if slide.cells[t].valid]
    sh = shuffle_positions(slide, tiles, seed=3)
    changed = 0
    for t in tiles:
        a, b = slide.cells[t], sh.cells[t]
        np.testing.assert_array_equal(a.cells, b.cells)  # the same cells, the same order
        # the same set of positions, handed to other cells
        np.testing.assert_allclose(np.sort(a.pos, axis=0), np.sort(b.pos, axis=0))
        assert not np.allclose(a.pos, b.pos)
        ea = {tuple(e) for e in a.edge_index.T}
        eb = {tuple(e) for e in b.edge_index.T}
        changed += ea != eb
        da, db = slide.tile_data(t), sh.tile_data(t)
        np.testing.assert_array_equal(da.genevec.numpy(), db.genevec.numpy())
        np.testing.assert_array_equal(da.x.numpy(), db.x.numpy())
        assert not np.array_equal(da.micro.numpy(), db.micro.numpy())
    assert changed == len(tiles)
    # the original slide is untouched
    assert slide.cells is not sh.cells and slide.genevec is sh.genevec


@pytest.mark.slow
def test_evaluate_baselines_table4_on_the_layout_benchmark(layout_bundle, tmp_path) -> None:
    """``evaluate --baselines --seeds 2``: all rows, CIs, controls, composition groups."""
    from napari_sigmma.cli import main
    from napari_sigmma.train.loop import train

    cfg = tiny_cfg(
        layout_bundle,
        tmp_path / "ref",
        tmp_path / "cache",
        epochs=1,
        split_block=4,
        split_fractions=[0.5, 0.0, 0.5],
    )
    assert train(cfg).status == "completed"
    out = tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(cfg.run_dir),
            "--out",
            str(out),
            "--baselines",
            "--seeds",
            "2",
            "--device",
            "cpu",
            "--throughput-tiles",
            "0",
        ]
    )
    assert code == 0
    t4 = json.loads((out / "table4.json").read_text())
    assert set(t4["rows"]) == {"row1", "row2", "row3", "row4"}
    assert [tuple(t4["rows"][f"row{i}"]["marks"].values()) for i in range(1, 5)] == [
        (False, False, False),
        (True, False, False),
        (True, True, False),
        (True, True, True),
    ]
    for name, e in t4["rows"].items():
        assert e["n_seeds"] == 2 and len(e["per_seed"]) == 2
        assert e["summary"]["task1"]["pcc"]["sd"] is not None
        if name != "row4":
            ci = e["gap_to_full"]["task1_pcc"]
            assert ci["lo"] <= ci["gap"] <= ci["hi"]
            assert "group_he_to_st" in e["gap_to_full"]
    assert {"no_graph", "single_scale"} <= set(t4["leave_one_out"])
    # each trained row is the model its marks say: without the cell graph the ST side is the
    # gene-vector MLP (no graph encoder); without sparsification no edge scorer weights
    from napari_sigmma.models.graph import GeneVectorEncoder, HierarchicalGraphEncoder
    from napari_sigmma.train.checkpoint import model_from_checkpoint

    loo = t4["leave_one_out"]
    for name in ("row1", "row2", "row3", "row4", "no_graph"):
        entry = t4["rows"].get(name) or loo[name]
        graph, _, sparsify = entry["marks"].values()
        model, _ = model_from_checkpoint(Path(entry["runs"][0]) / "checkpoints" / "best.pt")
        kind = HierarchicalGraphEncoder if graph else GeneVectorEncoder
        assert isinstance(model.graph, kind), (name, type(model.graph))
        assert any("scorer" in k for k in model.state_dict()) == sparsify, name
        assert len(model.cfg.scales) == (3 if entry["marks"]["multi_scale"] else 1), name
    full_ctl = t4["rows"]["row4"]["controls"]
    assert {"normal", "shuffled", "no_added_edges", "all_candidates", "random_candidates"} <= set(
        full_ctl
    )
    assert "gap_R@5%_he_to_st" in full_ctl["shuffled"]
    assert t4["rows"]["row1"]["controls"] == {}
    assert t4["composition_groups"]["chance"] == pytest.approx(1 / 16)
    assert "training_mean" in t4["floors"] and "frozen_backbone" in t4["floors"]
    md = (out / "compare.md").read_text()
    assert "Order check against Table 4 as published" in md and "group R@1" in md
    assert any(x in md for x in ("pseudo-bulk", "uses the cells' arrangement", "at chance level"))
    m = json.loads((out / "metrics.json").read_text())
    assert m["table4"]["n_seeds"] == 2
