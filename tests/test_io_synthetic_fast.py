"""The synthetic sample's composed ("fast") rendering outside the cell window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SIZE, WINDOW = 3072, 1024  # a slide three times the side of its cell window


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_sigmma.cli import main

    out = tmp_path_factory.mktemp("synthetic-fast") / "bundle"
    argv = ["sample", "--synthetic", "--size", str(SIZE), "--cell-window", str(WINDOW)]
    assert main([*argv, "--seed", "2", "--out", str(out)]) == 0
    return out


def test_fast_render_is_tile_and_seed_deterministic() -> None:
    from napari_sigmma.samples.synthetic import FAST_TILE, SyntheticTissue

    tissue = SyntheticTissue(SIZE, seed=3)
    # a region across grid lines, with part of an exactly rendered box inside it
    y0, x0, h, w = FAST_TILE - 200, 2 * FAST_TILE - 300, 700, 800
    box = (y0 + 400, x0 + 500, y0 + 1000, x0 + 1000)
    whole = tissue.render_fast(y0, x0, h, w, exact_box=box)
    tiled = np.zeros_like(whole)
    for y in range(0, h, 300):
        for x in range(0, w, 270):
            hh, ww = min(300, h - y), min(270, w - x)
            tiled[y : y + hh, x : x + ww] = tissue.render_fast(
                y0 + y, x0 + x, hh, ww, exact_box=box
            )
    np.testing.assert_array_equal(whole, tiled)
    # inside the box: byte for byte the exact rendering
    inner = tissue.render(box[0], box[1], y0 + h - box[0], x0 + w - box[1])
    np.testing.assert_array_equal(whole[400:, 500:], inner)
    # outside it: not the exact rendering (stand-in texture), but the same colours overall
    exact = tissue.render(y0, x0, 400, w)
    assert np.abs(whole[:400].astype(int) - exact).mean() > 5
    assert np.abs(whole[:400].mean((0, 1)) - exact.mean((0, 1))).max() < 25
    # a fresh tissue with the same seed composes the same pixels; another seed does not
    again = SyntheticTissue(SIZE, seed=3).render_fast(y0, x0, 300, 300)
    np.testing.assert_array_equal(again, whole[:300, :300])
    other = SyntheticTissue(SIZE, seed=4).render_fast(y0, x0, 300, 300)
    assert np.abs(other.astype(int) - whole[:300, :300]).mean() > 10


def test_fast_render_follows_the_domain_map() -> None:
    from napari_sigmma.samples.synthetic import DOMAINS, FAST_DOMAIN_STRIDE, SyntheticTissue

    tissue = SyntheticTissue(SIZE, seed=0)
    s = FAST_DOMAIN_STRIDE
    n = 1536 // s  # a corner of the slide: glass and tissue
    img = tissue.render_fast(0, 0, n * s, n * s).astype(np.float64)
    nodes = tissue.domain_grid(0, 0, n, n)
    # pixels of block (i, j) lie between nodes i..i+1, j..j+1 (centres at +0.5 px)
    blocks = img.reshape(n, s, n, s, 3).mean(axis=(1, 3))
    corners = np.stack([nodes[:-1, :-1], nodes[1:, :-1], nodes[:-1, 1:], nodes[1:, 1:]])
    glass = (corners == DOMAINS.index("background")).all(axis=0)
    dense = np.isin(corners, [DOMAINS.index(d) for d in ("tumour", "immune")]).all(axis=0)
    assert glass.sum() > 100 and dense.sum() > 100, (glass.sum(), dense.sum())
    brightness = blocks.mean(axis=2)
    # glass: bright and colourless; tumour and immune tissue: darker and stained
    assert (brightness[glass] > 230).all()
    assert (np.ptp(blocks[glass], axis=1) < 15).all()
    assert np.quantile(brightness[dense], 0.95) < 215
    # and the exact rendering agrees about where the glass is
    exact = tissue.render(0, 0, n * s, n * s).astype(np.float64)
    exact_bright = exact.reshape(n, s, n, s, 3).mean(axis=(1, 3, 4))
    assert (exact_bright[glass] > 230).mean() > 0.97


def test_fast_render_needs_a_window(tmp_path: Path) -> None:
    from napari_sigmma.errors import SigmmaError
    from napari_sigmma.samples.synthetic import write_synthetic_sample

    with pytest.raises(SigmmaError, match="cell window"):
        write_synthetic_sample(tmp_path / "x", size=512, render="fast")


def test_windowed_bundle_reads_back_with_cells_in_the_window(windowed: Path) -> None:
    import spatialdata_io
    import tifffile

    from napari_sigmma.io import load_any
    from napari_sigmma.samples.synthetic import SyntheticTissue

    truth = pd.read_parquet(windowed / "sigmma_ground_truth.parquet")
    lo, hi = (SIZE - WINDOW) / 2, (SIZE + WINDOW) / 2
    for col in ("he_x", "he_y", "nucleus_he_x", "nucleus_he_y"):
        assert truth[col].between(lo - 40, hi + 40).all(), col
    # cell centres (not centroids) lie in the window: centroids stay within a few px
    assert truth["he_x"].between(lo, hi).mean() > 0.99
    assert len(truth) > 500

    sdata = load_any(windowed)
    table = sdata.tables["table"]
    assert table.n_obs == len(truth)
    he = sdata.images["he_image"]
    assert he["scale0"]["image"].shape == (3, SIZE, SIZE)
    sd = spatialdata_io.xenium(windowed)
    assert sd.tables["table"].n_obs == len(truth)
    assert sd.images["he_image"]["scale0"]["image"].shape == (3, SIZE, SIZE)

    tissue = SyntheticTissue(SIZE, seed=2)
    with tifffile.TiffFile(windowed / "he_image.ome.tif") as tf:
        level0 = tf.series[0].levels[0].asarray()
    # the window is the exact rendering (up to JPEG loss) ...
    c = int(lo) + 256
    inside = level0[c : c + 512, c : c + 512].astype(int)
    assert np.abs(inside - tissue.render(c, c, 512, 512)).mean() < 3.0
    # ... outside it the composed one, tile for tile
    out = level0[0:512, 2048:2560].astype(int)
    assert np.abs(out - tissue.render_fast(0, 2048, 512, 512)).mean() < 4.0
    assert np.abs(out - tissue.render(0, 2048, 512, 512)).mean() > 6.0

    # the table's cells sit on dark (haematoxylin-rich) nuclei of the written image
    from skimage.color import rgb2hed

    hed = rgb2hed(level0[int(lo) - 64 : int(hi) + 64, int(lo) - 64 : int(hi) + 64])[..., 0]
    r = np.floor(truth["nucleus_he_y"].to_numpy() - lo + 64).astype(int)
    q = np.floor(truth["nucleus_he_x"].to_numpy() - lo + 64).astype(int)
    at_nuclei = hed[r, q]
    rng = np.random.default_rng(0)
    anywhere = hed[rng.integers(0, hed.shape[0], 5000), rng.integers(0, hed.shape[1], 5000)]
    assert np.median(at_nuclei) > np.quantile(anywhere, 0.75)


def test_render_workers_write_the_same_slide(tmp_path: Path) -> None:
    import tifffile

    from napari_sigmma.samples.synthetic import write_synthetic_sample

    kw = {"size": 1024, "cell_window": 512, "seed": 5}
    a = write_synthetic_sample(tmp_path / "one", **kw)
    b = write_synthetic_sample(tmp_path / "two", workers=2, **kw)
    with (
        tifffile.TiffFile(a / "he_image.ome.tif") as ta,
        tifffile.TiffFile(b / "he_image.ome.tif") as tb,
    ):
        for la, lb in zip(ta.series[0].levels, tb.series[0].levels, strict=True):
            np.testing.assert_array_equal(la.asarray(), lb.asarray())
