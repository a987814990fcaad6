"""The layout benchmark: composition-matched tiles with equal expected expression and
different spatial arrangements, written as a real Xenium bundle whose tiles the trainer's
grid cuts exactly where the generator placed them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from napari_sigmma.samples import synthetic as syn


def _same_type_fraction(xy: np.ndarray, types: np.ndarray, k: int = 4) -> float:
    """Mean fraction of same-type cells among each structural cell's k nearest cells."""
    _, nb = cKDTree(xy).query(xy, k=k + 1)
    struct = np.isin(types, [syn._T["tumour_a"], syn._T["epithelial"]])
    same = (types[nb[:, 1:]] == types[:, None]).mean(axis=1)
    return float(same[struct].mean())


def test_composition_matched_tiles_have_equal_expected_expression_and_other_layouts():
    from napari_sigmma.samples.layout import (
        LAYOUTS,
        build_layout_cells,
        expected_tile_expression,
        layout_programs,
    )

    cells, tiles, tile_of = build_layout_cells(8, group_side=4, seed=3)
    progs = layout_programs(3)
    assert len(tiles) == 64 and tiles["group"].nunique() == 4
    comps = set()
    for g, sub in tiles.groupby("group"):
        assert sorted(sub["layout"].value_counts().to_dict().items()) == [
            (lay, 4) for lay in sorted(LAYOUTS)
        ]
        exp, stats, pos = [], {}, []
        for k in sub.index:
            sel = tile_of == k
            types = cells.type[sel]
            exp.append(expected_tile_expression(types, progs))
            xy = np.column_stack([cells.x[sel], cells.y[sel]])
            pos.append(xy - xy.mean(axis=0))
            stats.setdefault(sub.loc[k, "layout"], []).append(_same_type_fraction(xy, types))
        exp = np.array(exp)
        # equal expected summed expression within the group (to float precision)...
        np.testing.assert_allclose(exp, exp[:1].repeat(len(exp), 0), rtol=1e-12)
        comps.add(tuple(np.round(exp[0], 6)))
        # ... while the arrangement differs: structural cells cluster far more in the
        # clustered layout than in the dispersed one, in every pair of tiles
        assert min(stats["clustered"]) > max(stats["dispersed"]) + 0.1, (g, stats)
        assert min(stats["stripes"]) > max(stats["dispersed"])
        assert min(stats["glands"]) > max(stats["dispersed"])
    assert len(comps) == 4  # the groups differ in composition


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from napari_sigmma.cli import main

    out = tmp_path_factory.mktemp("layout") / "bench"
    code = main(
        ["sample", "--synthetic", "--layout-benchmark", "--layout-tiles", "4", "--out", str(out)]
    )
    assert code == 0
    return out


def test_written_bundle_tiles_are_the_generators(bundle):
    """Read back through the reader and the trainer's grid: every tile holds exactly the
    cells the generator placed in it, with the group's composition."""
    from napari_sigmma.io import load_any
    from napari_sigmma.samples.layout import read_layout_tiles
    from napari_sigmma.tiles.dataset import prepare_slide
    from napari_sigmma.tiles.paired import PairedSlide

    tiles = read_layout_tiles(bundle)
    truth = pd.read_parquet(bundle / syn.GROUND_TRUTH_FILE)
    assert {"tile_id", "layout", "group"} <= set(truth.columns)
    paired = PairedSlide.from_sdata(load_any(bundle), name="bench")
    st = prepare_slide(paired, tile_px=256, target_mpp=0.5, min_tissue=0.25)
    assert sorted(st.grid.tile_ids) == sorted(tiles["tile_id"])
    ids = np.asarray(paired.cell_ids).astype(str)
    by_id = truth.set_index("cell_id")
    for ti, tid in enumerate(st.grid.tile_ids):
        row = tiles.set_index("tile_id").loc[tid]
        cells = st.cells[ti].cells
        assert cells.size == row["n_cells"]
        got = by_id.loc[ids[cells]]
        assert (got["tile_id"] == tid).all()
        counts = got["cell_type"].value_counts()
        for t in syn.CELL_TYPES:
            assert counts.get(t, 0) == row[f"n_{t}"]
