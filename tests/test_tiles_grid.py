"""Paired slide (transforms, µm/px) and the tile grid (count, bounds, resampling, tissue)."""

from __future__ import annotations

import numpy as np
import pytest

from _tiles_data import make_image, make_sdata
from napari_sigmma.errors import SigmmaError
from napari_sigmma.tiles.grid import make_tile_grid, read_tile, read_tiles, tissue_mask_rgb
from napari_sigmma.tiles.paired import PairedSlide


@pytest.mark.parametrize("with_uns", [False, True])
def test_cells_reach_he_pixels_through_a_rotated_affine(with_uns):
    sdata, cells_px, um_to_he = make_sdata(
        h=400,
        w=500,
        he_mpp=0.3,
        angle_deg=17.0,
        translate=(120.0, -45.0),
        with_uns_matrix=with_uns,
    )
    p = PairedSlide.from_sdata(sdata, name="s1")
    assert p.he_mpp == pytest.approx(0.3, rel=1e-9)
    np.testing.assert_allclose(p.cells_px, cells_px, atol=1e-6)
    np.testing.assert_allclose(p.um_to_he_px, um_to_he, atol=1e-9)
    assert p.counts.shape == (cells_px.shape[0], 12)
    assert p.genes[:2] == ["gene0", "gene1"]
    assert p.cell_ids[0] == "cell0"
    assert p.image.levels[0].shape == (400, 500, 3)
    assert p.image.downsamples == pytest.approx([1.0, 2.0, 4.0], rel=0.01)


def test_missing_obsm_key_is_a_sigmma_error():
    sdata, _, _ = make_sdata(h=300, w=300)
    with pytest.raises(SigmmaError, match="not_there"):
        PairedSlide.from_sdata(sdata, node_obsm="not_there")
    p = PairedSlide.from_sdata(sdata, node_obsm="my_latent")
    assert p.node_features.shape == (p.n_cells, 5)


@pytest.mark.parametrize(
    ("he_mpp", "tile_px", "target"),
    [(0.25, 256, 0.5), (0.3, 224, 0.5), (0.5, 256, 0.5), (0.21, 512, 0.5), (0.4, 256, 0.5)],
)
def test_grid_count_and_bounds_follow_the_slide_resolution(he_mpp, tile_px, target):
    h, w = 1300, 2600
    sdata, _, _ = make_sdata(h=h, w=w, he_mpp=he_mpp)
    p = PairedSlide.from_sdata(sdata)
    g = make_tile_grid(p, tile_px=tile_px, target_mpp=target, min_tissue=0)
    size = tile_px * target / he_mpp  # level-0 px per tile
    assert g.tile_size == pytest.approx(size)
    assert g.n_rows == int(h // size) and g.n_cols == int(w // size)
    assert len(g) == g.n_rows * g.n_cols
    widths = g.bounds[:, 2] - g.bounds[:, 0]
    np.testing.assert_allclose(widths, size)
    np.testing.assert_allclose(g.bounds[:, 3] - g.bounds[:, 1], size)
    assert g.bounds[:, 2].max() <= w + 1e-6 and g.bounds[:, 3].max() <= h + 1e-6
    # Tiles abut: the neighbour to the right starts where this one ends.
    i = g.index_of(0, 0)
    j = g.index_of(0, 1)
    assert g.bounds[j, 0] == pytest.approx(g.bounds[i, 2])
    assert len(set(g.tile_ids)) == len(g)


def _gradient_image(h: int, w: int) -> np.ndarray:
    """R = x/8, G = y/8 (mod 256 avoided by the sizes used), B constant."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([xx / 8.0, yy / 8.0, np.full_like(xx, 100.0)], axis=2)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("he_mpp", [0.25, 0.3, 0.5, 0.8])
def test_read_tile_resamples_to_the_target_resolution(he_mpp):
    h, w = 1400, 1900
    img = _gradient_image(h, w)
    sdata, _, _ = make_sdata(h=h, w=w, he_mpp=he_mpp, image=img)
    p = PairedSlide.from_sdata(sdata)
    g = make_tile_grid(p, tile_px=256, target_mpp=0.5, min_tissue=0)
    assert len(g) >= 2
    for i in (0, len(g) - 1):
        tile = read_tile(p, g, i)
        assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
        x0, y0, x1, y1 = g.bounds[i]
        # Output pixel j samples level-0 position x0 + (j + 0.5) * size / 256 - 0.5.
        j = np.arange(256)
        ex = (x0 + (j + 0.5) * (x1 - x0) / 256 - 0.5) / 8.0
        ey = (y0 + (j + 0.5) * (y1 - y0) / 256 - 0.5) / 8.0
        got_x = tile[128, 8:-8, 0].astype(float)
        got_y = tile[8:-8, 128, 1].astype(float)
        assert np.abs(got_x - ex[8:-8]).max() <= 1.5
        assert np.abs(got_y - ey[8:-8]).max() <= 1.5
    many = read_tiles(p, g, np.array([0, 1]))
    np.testing.assert_array_equal(many[0], read_tile(p, g, 0))


def test_background_tiles_are_dropped():
    h, w = 1024, 2048
    # Tissue on the left 40 % only; 0.25 µm/px → 512 px tiles at 0.5 µm/px: 2 × 4 grid.
    tissue = (0, 0, int(0.4 * w), h)
    sdata, _, _ = make_sdata(h=h, w=w, he_mpp=0.25, tissue=tissue)
    p = PairedSlide.from_sdata(sdata)
    full = make_tile_grid(p, min_tissue=0)
    g = make_tile_grid(p, min_tissue=0.25)
    assert len(full) == 8
    # Columns 0 (all tissue) and 1 (819 - 512 = 307 of 512 px: 60 %) kept; 2, 3 are glass.
    assert sorted(set(g.cols.tolist())) == [0, 1]
    assert len(g) == 4
    assert np.all(g.tissue[g.cols == 0] > 0.9)
    strict = make_tile_grid(p, min_tissue=0.9)
    assert sorted(set(strict.cols.tolist())) == [0]


def test_tissue_mask_does_not_split_an_all_tissue_slide():
    img = make_image(300, 300, (0, 0, 300, 300), seed=3)
    assert tissue_mask_rgb(img).mean() > 0.95
    glass = make_image(300, 300, None, seed=3)
    assert tissue_mask_rgb(glass).mean() < 0.05


def test_bad_tile_size_is_rejected():
    sdata, _, _ = make_sdata(h=300, w=300)
    p = PairedSlide.from_sdata(sdata)
    with pytest.raises(SigmmaError, match="tile_px"):
        make_tile_grid(p, tile_px=300)


def test_slide_smaller_than_a_tile_gives_an_empty_grid():
    sdata, _, _ = make_sdata(h=200, w=200, he_mpp=0.5)
    p = PairedSlide.from_sdata(sdata)
    g = make_tile_grid(p)
    assert len(g) == 0 and g.bounds.shape == (0, 4)


def test_image_only_slide_tiles_without_cells():
    import spatialdata as sd

    from napari_sigmma.tiles.graphs import build_tile_cells

    full, _, _ = make_sdata(h=600, w=600, he_mpp=0.5)
    img_only = sd.SpatialData(images={"he_image": full.images["he_image"]})
    with pytest.raises(SigmmaError, match="µm/px"):
        PairedSlide.from_sdata(img_only)
    img_only.attrs["sigmma"] = {"he_mpp": 0.5}  # as io.wsi.read_slide_sdata records it
    p = PairedSlide.from_sdata(img_only)
    assert p.he_mpp == 0.5 and p.n_cells == 0 and p.genes == []
    g = make_tile_grid(p, min_tissue=0)
    assert len(g) == 4
    cells = build_tile_cells(p, g)
    assert all(c.n_cells == 0 and not c.valid for c in cells)
    assert read_tile(p, g, 3).shape == (256, 256, 3)


def test_direct_reads_equal_dask_reads_on_a_real_tiff(embedded_bundle):
    """Region reads slice the TIFF's zarr view without dask when that gives the same
    pixels; in-memory and converted images keep the dask path, with the same results."""
    import xarray as xr

    from napari_sigmma.io import load_any
    from napari_sigmma.tiles.paired import SdataImage

    paired = PairedSlide.from_sdata(load_any(embedded_bundle), name="e")
    img = paired.image
    rng = np.random.default_rng(0)
    for level in range(img.level_count):
        assert img._direct_reader(level) is not None, level  # a TIFF-backed level
        h, w = img.level_shape(level)
        boxes = [(int(rng.integers(-50, w)), int(rng.integers(-50, h)), 300, 200) for _ in range(8)]
        boxes.append((w - 10, h - 10, 64, 64))  # over the corner: white outside
        for x, y, bw, bh in boxes:
            got = img.read_region(x, y, bw, bh, level=level)
            want = np.full((bh, bw, 3), 255, np.uint8)
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
            if x1 > x0 and y1 > y0:
                lvl = img.levels[level]
                want[y0 - y : y1 - y, x0 - x : x1 - x] = lvl[y0:y1, x0:x1].compute()
            np.testing.assert_array_equal(got, want)
    # a uint16 image is converted by dask (clip, cast): no direct reader, same pixels
    data = rng.integers(0, 300, size=(3, 70, 90)).astype(np.uint16)
    other = SdataImage(xr.DataArray(data, dims=("c", "y", "x")), mpp=0.5)
    assert other._direct_reader(0) is None
    want = np.clip(data, 0, 255).astype(np.uint8).transpose(1, 2, 0)[5:25, 10:40]
    np.testing.assert_array_equal(other.read_region(10, 5, 30, 20), want)
