"""The synthetic paired sample: procedural H&E with known cell types, simulated Xenium."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SIZE = 1536


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_sigmma.cli import main

    out = tmp_path_factory.mktemp("synthetic") / "bundle"
    assert main(["sample", "--synthetic", "--size", str(SIZE), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sdata(bundle: Path):  # type: ignore[no-untyped-def]
    from napari_sigmma.io.xenium import read_xenium

    return read_xenium(bundle, transcripts=False)


def _he_rgb(sdata) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.moveaxis(np.asarray(sdata.images["he_image"]["scale0"]["image"].values), 0, -1)


def _cells_he_px(sdata) -> np.ndarray:  # type: ignore[no-untyped-def]
    from spatialdata.transformations import get_transformation

    a = get_transformation(sdata.images["he_image"], "global").to_affine_matrix(
        ("x", "y"), ("x", "y")
    )
    xy = np.asarray(sdata.tables["table"].obsm["spatial"], float)
    xy = xy / sdata.attrs["sigmma"]["pixel_size"]
    return (np.c_[xy, np.ones(len(xy))] @ np.linalg.inv(a).T)[:, :2]


def _sample(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    r = np.clip(np.floor(xy[:, 1]).astype(int), 0, img.shape[0] - 1)
    c = np.clip(np.floor(xy[:, 0]).astype(int), 0, img.shape[1] - 1)
    return img[r, c]


def _log_norm(table) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    x = table.X.toarray().astype(np.float64)
    x = np.log1p(x / np.maximum(x.sum(axis=1, keepdims=True), 1) * 100)
    return pd.DataFrame(x, columns=list(table.var_names))


def test_bundle_reads_with_spatialdata_io(bundle: Path) -> None:
    import spatialdata_io
    from spatialdata.transformations import Affine, get_transformation

    sd = spatialdata_io.xenium(bundle)
    table = sd.tables["table"]
    assert table.n_obs >= 1000
    assert table.n_vars >= 100
    t = get_transformation(sd.images["he_image"], "global")
    assert isinstance(t, Affine)
    m = t.to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(m, np.loadtxt(bundle / "he_imagealignment.csv", delimiter=","))
    assert not np.allclose(m, np.eye(3))
    assert sd.images["he_image"]["scale0"]["image"].shape == (3, SIZE, SIZE)
    # H&E at 0.5 µm/px: the affine's scale times the morphology pixel size
    assert np.sqrt(abs(np.linalg.det(m[:2, :2]))) * 0.2125 == pytest.approx(0.5, rel=1e-6)


def test_cells_sit_on_rendered_nuclei(sdata) -> None:  # type: ignore[no-untyped-def]
    from skimage.color import rgb2hed

    rgb = _he_rgb(sdata)
    h = rgb2hed(rgb)[..., 0]
    table = sdata.tables["table"]
    types = table.obs["cell_type"].astype(str).to_numpy()
    xy = _cells_he_px(sdata)
    # adipocyte centroids are the fat cell's middle, its nucleus is pressed to the side
    keep = types != "adipocyte"
    at_cells = _sample(h, xy[keep])
    rng = np.random.default_rng(0)
    tissue = np.argwhere(rgb.min(axis=-1) < 215)
    pick = tissue[rng.choice(len(tissue), 5000, replace=False)]
    at_random = h[pick[:, 0], pick[:, 1]]
    assert at_cells.mean() > 2.0 * at_random.mean()
    assert np.mean(at_cells > np.median(at_random)) > 0.9


def test_image_and_expression_correspond(sdata) -> None:  # type: ignore[no-untyped-def]
    """Per 64 µm tile: what the image shows predicts the mean expression of the markers."""
    from scipy.stats import spearmanr
    from skimage.color import rgb2hed

    rgb = _he_rgb(sdata)
    hed = rgb2hed(rgb)
    h, e = hed[..., 0], hed[..., 1]
    dark = h > np.percentile(h, 97)  # dense small nuclei: lymphocytes
    pink = (e > np.percentile(e, 75)) & (h < np.percentile(h, 60))  # collagen
    table = sdata.tables["table"]
    expr = _log_norm(table)
    xy = _cells_he_px(sdata)
    s = 128
    nt = rgb.shape[0] // s
    tile = (xy[:, 1] // s).astype(int) * nt + (xy[:, 0] // s).astype(int)
    rows = []
    for t in np.unique(tile):
        r, c = divmod(int(t), nt)
        m = tile == t
        if r >= nt or c >= nt or m.sum() < 5:
            continue
        win = (slice(r * s, (r + 1) * s), slice(c * s, (c + 1) * s))
        rows.append(
            {
                "dark": dark[win].mean(),
                "pink": pink[win].mean(),
                "PTPRC": expr["PTPRC"][m].mean(),
                "COL1A1": expr["COL1A1"][m].mean(),
            }
        )
    df = pd.DataFrame(rows)
    assert len(df) >= 60
    assert spearmanr(df["dark"], df["PTPRC"]).statistic > 0.5
    assert spearmanr(df["pink"], df["COL1A1"]).statistic > 0.5


def test_types_look_and_express_differently(sdata) -> None:  # type: ignore[no-untyped-def]
    from scipy.stats import mannwhitneyu
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from napari_sigmma.samples.synthetic import CELL_TYPES

    table = sdata.tables["table"]
    types = table.obs["cell_type"].astype(str).to_numpy()
    assert set(types) <= set(CELL_TYPES) and len(set(types)) >= 8
    expr = _log_norm(table)
    means = expr.groupby(types).mean()
    markers = {
        "TFF1": "tumour_a",
        "KRT17": "tumour_b",
        "COL1A1": "fibroblast",
        "CD3E": "t_cell",
        "MS4A1": "b_cell",
        "CD68": "macrophage",
        "VWF": "endothelial",
        "PIGR": "epithelial",
    }
    for gene, cell_type in markers.items():
        assert means[gene].idxmax() == cell_type, (gene, means[gene].to_dict())

    area = table.obs["nucleus_area"].to_numpy()
    from skimage.color import rgb2hed

    dark = _sample(rgb2hed(_he_rgb(sdata))[..., 0], _cells_he_px(sdata))
    tumour = np.isin(types, ["tumour_a", "tumour_b"])
    lymph = np.isin(types, ["t_cell", "b_cell"])
    assert mannwhitneyu(area[lymph], area[tumour], alternative="less").pvalue < 1e-10
    assert mannwhitneyu(dark[tumour], dark[lymph], alternative="less").pvalue < 1e-10

    # look-alike pairs: same nuclei, different programs
    for a, b in (("tumour_a", "tumour_b"), ("t_cell", "b_cell")):
        ma, mb = types == a, types == b
        assert abs(np.median(area[ma]) / np.median(area[mb]) - 1) < 0.1
        pair = ma | mb
        acc = cross_val_score(
            LogisticRegression(max_iter=3000), expr.to_numpy()[pair], types[pair], cv=3
        ).mean()
        assert acc > 0.9, (a, b, acc)


def test_rendering_is_tile_deterministic() -> None:
    from napari_sigmma.samples.synthetic import SyntheticTissue

    tissue = SyntheticTissue(2048, seed=3)
    y0, x0, n = 700, 600, 600
    whole = tissue.render(y0, x0, n, n)
    tiled = np.zeros_like(whole)
    for y in range(0, n, 256):
        for x in range(0, n, 256):
            h, w = min(256, n - y), min(256, n - x)
            tiled[y : y + h, x : x + w] = tissue.render(y0 + y, x0 + x, h, w)
    np.testing.assert_array_equal(whole, tiled)
    # and the cells of a region are the same whichever region asks for them
    cells = tissue.cells(300.0, 300.0, 600.0, 600.0)
    part = tissue.cells(300.0, 300.0, 450.0, 600.0)
    assert set(part.key.tolist()) <= set(cells.key.tolist())
    other = SyntheticTissue(2048, seed=4).render(y0, x0, n, n)
    assert np.abs(other.astype(int) - whole).mean() > 10


def test_same_seed_same_bundle(tmp_path: Path, bundle: Path) -> None:
    import h5py
    import tifffile

    from napari_sigmma.samples.synthetic import SyntheticTissue, write_synthetic_sample

    a = write_synthetic_sample(tmp_path / "a", size=768, seed=5)
    b = write_synthetic_sample(tmp_path / "b", size=768, seed=5)
    c = write_synthetic_sample(tmp_path / "c", size=768, seed=6)
    ca, cb, cc = (pd.read_parquet(p / "cells.parquet") for p in (a, b, c))
    pd.testing.assert_frame_equal(ca, cb)
    assert len(ca) != len(cc) or not np.allclose(ca["x_centroid"], cc["x_centroid"])
    with (
        h5py.File(a / "cell_feature_matrix.h5") as fa,
        h5py.File(b / "cell_feature_matrix.h5") as fb,
    ):
        np.testing.assert_array_equal(fa["matrix/data"][()], fb["matrix/data"][()])
        np.testing.assert_array_equal(fa["matrix/indices"][()], fb["matrix/indices"][()])
    ia = tifffile.imread(a / "he_image.ome.tif")
    np.testing.assert_array_equal(ia, tifffile.imread(b / "he_image.ome.tif"))
    # the written H&E is the procedural tissue (up to JPEG loss)
    ref = SyntheticTissue(768, seed=5).render(0, 0, 768, 768)
    assert np.abs(ia.astype(int) - ref).mean() < 3.0
    truth = pd.read_parquet(a / "sigmma_ground_truth.parquet")
    assert truth["cell_id"].tolist() == ca["cell_id"].tolist()


@pytest.mark.slow
def test_big_slide_streams_with_bounded_memory(tmp_path: Path) -> None:
    """Strips of an 8192 px slide stream to disk tile by tile: peak memory does not grow with
    the number of tile rows, and a tile's rendering needs a bounded amount of memory."""
    import tracemalloc

    import tifffile

    from napari_sigmma.samples.synthetic import SyntheticTissue
    from napari_sigmma.samples.tiffwrite import write_pyramidal_ome_tiff

    size, width = 8192, 2048
    tissue = SyntheticTissue(size, seed=1)
    x0 = 3072  # a vertical strip through the middle of the slide

    def source(y: int, x: int, h: int, w: int) -> np.ndarray:
        return tissue.render(y, x0 + x, h, w)

    peaks = {}
    for height in (1024, size):
        tracemalloc.start()
        try:
            path = write_pyramidal_ome_tiff(
                tmp_path / f"strip{height}.ome.tif", source, shape=(height, width, 3), mpp=0.5
            )
            peaks[height] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # 8x the rows (8192 x 2048 px = 50 MB of RGB), about the same peak
    assert peaks[size] < 1.25 * peaks[1024] + 8e6, peaks
    tracemalloc.start()
    try:
        for y, x in ((0, 0), (4000, 4000), (7680, 5000), (2000, 7680)):
            tracemalloc.reset_peak()
            tissue.render(y, x, 512, 512)
            assert tracemalloc.get_traced_memory()[1] < 120e6
    finally:
        tracemalloc.stop()
    with tifffile.TiffFile(path) as tf:
        level0 = tf.series[0].levels[0]
        assert level0.shape == (size, width, 3)
        region = level0.asarray()[5000:5256, 1000:1256]
    ref = tissue.render(5000, x0 + 1000, 256, 256)
    assert np.abs(region.astype(int) - ref).mean() < 3.0
