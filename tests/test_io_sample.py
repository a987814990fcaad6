"""The embedded paired sample: real CMU-1 H&E, nuclei detected in it, simulated Xenium.

The bundle is written once through the command line (``napari-sigmma sample --out DIR``) and
read back with spatialdata-io's own reader (default flags) and with the project's reader.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_sigmma.cli import main

    out = tmp_path_factory.mktemp("embedded") / "bundle"
    assert main(["sample", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sdata(cli_bundle: Path):  # type: ignore[no-untyped-def]
    from napari_sigmma.io.xenium import read_xenium

    return read_xenium(cli_bundle, transcripts=False)


def _he_rgb(sdata) -> np.ndarray:  # type: ignore[no-untyped-def]
    img = sdata.images["he_image"]["scale0"]["image"].values  # (c, y, x)
    return np.moveaxis(np.asarray(img), 0, -1)


def _cells_he_px(sdata) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Cell centroids in H&E level-0 pixels: inv(A) @ (xy_um / pixel_size)."""
    from spatialdata.transformations import get_transformation

    a = get_transformation(sdata.images["he_image"], "global").to_affine_matrix(
        ("x", "y"), ("x", "y")
    )
    ps = sdata.attrs["sigmma"]["pixel_size"]
    xy = np.asarray(sdata.tables["table"].obsm["spatial"], float) / ps
    q = np.c_[xy, np.ones(len(xy))] @ np.linalg.inv(a).T
    return q[:, :2]


def _sample(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Pixel values under continuous (x, y) positions (pixel i covers [i, i + 1))."""
    r = np.clip(np.floor(xy[:, 1]).astype(int), 0, img.shape[0] - 1)
    c = np.clip(np.floor(xy[:, 0]).astype(int), 0, img.shape[1] - 1)
    return img[r, c]


def _log_norm(table) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    x = table.X.toarray().astype(np.float64)
    x = np.log1p(x / np.maximum(x.sum(axis=1, keepdims=True), 1) * 100)
    return pd.DataFrame(x, columns=list(table.var_names))


def test_cli_bundle_reads_with_spatialdata_io(cli_bundle: Path) -> None:
    import spatialdata_io
    from spatialdata.transformations import Affine, get_transformation

    sd = spatialdata_io.xenium(cli_bundle)
    table = sd.tables["table"]
    assert table.n_obs >= 1000
    assert table.n_vars >= 100
    assert not any(v.startswith(("NegControl", "Unassigned")) for v in table.var_names)
    t = get_transformation(sd.images["he_image"], "global")
    assert isinstance(t, Affine)
    m = t.to_affine_matrix(("x", "y"), ("x", "y"))
    csv = np.loadtxt(cli_bundle / "he_imagealignment.csv", delimiter=",")
    np.testing.assert_allclose(m, csv, rtol=1e-12)
    assert not np.allclose(m, np.eye(3))
    assert abs(np.arctan2(m[1, 0], m[0, 0])) > np.deg2rad(1.0)  # a real rotation
    # the H&E µm/px (CMU-1: 0.499) is the affine's scale times the morphology pixel size
    he_mpp = np.sqrt(abs(np.linalg.det(m[:2, :2]))) * 0.2125
    assert he_mpp == pytest.approx(0.499, rel=1e-3)
    # the H&E really is the CMU slide: 2220 x 2967 px
    assert sd.images["he_image"]["scale0"]["image"].shape == (3, 2967, 2220)
    # every count is a transcript inside a cell (plus unassigned background)
    assert len(sd.points["transcripts"]) >= table.X.sum()


def test_cells_land_on_detected_nuclei(sdata) -> None:  # type: ignore[no-untyped-def]
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed

    rgb = _he_rgb(sdata)
    h = ndi.gaussian_filter(rgb2hed(rgb)[..., 0], 1.0)
    od = ndi.gaussian_filter(-np.log((rgb.astype(float) + 1) / 256).sum(-1), 4)
    tissue = np.argwhere(od > 0.6)
    xy = _cells_he_px(sdata)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < rgb.shape[1]) & (xy[:, 1] >= 0)
    inside &= xy[:, 1] < rgb.shape[0]
    assert inside.mean() > 0.995  # a cell grown past the slide edge may end just outside
    at_cells = _sample(h, xy)
    rng = np.random.default_rng(0)
    pick = tissue[rng.choice(len(tissue), 5000, replace=False)]
    at_random = h[pick[:, 0], pick[:, 1]]
    # nuclei are haematoxylin-dense: cell centroids sit on them, random tissue points mostly not
    assert at_cells.mean() > 2.0 * at_random.mean()
    assert np.mean(at_cells > np.percentile(at_random, 80)) > 0.7
    # a shifted copy of the cells (by ~8 µm) no longer lands on nuclei
    shifted = _sample(h, xy + 16)
    assert at_cells.mean() > 1.6 * shifted.mean()


def test_cell_types_differ_in_expression(sdata) -> None:  # type: ignore[no-untyped-def]
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from napari_sigmma.samples.embedded import CELL_TYPES

    table = sdata.tables["table"]
    types = table.obs["cell_type"].astype(str).to_numpy()
    assert set(types) == set(CELL_TYPES)
    expr = _log_norm(table)
    means = expr.groupby(types).mean()
    markers = {
        "KRT14": "basal_keratinocyte",
        "KRT10": "suprabasal_keratinocyte",
        "PMEL": "melanocyte",
        "COL1A1": "fibroblast",
        "VWF": "endothelial",
        "CD3E": "lymphocyte",
        "CD68": "macrophage",
    }
    for gene, cell_type in markers.items():
        assert means[gene].idxmax() == cell_type, (gene, means[gene].to_dict())
    z = PCA(20, random_state=0).fit_transform(expr.to_numpy())
    acc = cross_val_score(LogisticRegression(max_iter=3000), z, types, cv=3).mean()
    assert acc > 0.85
    # controls are kept apart, with a few counts
    ctrl = table.obsm["controls"]
    assert ctrl.shape[1] >= 20 and 0 < ctrl.to_numpy().sum() < 0.05 * table.X.sum()


def test_cell_types_differ_in_morphology(sdata) -> None:  # type: ignore[no-untyped-def]
    from scipy.spatial import cKDTree
    from scipy.stats import mannwhitneyu

    table = sdata.tables["table"]
    types = table.obs["cell_type"].astype(str).to_numpy()
    area = table.obs["nucleus_area"].to_numpy()
    nuc = sdata.shapes["nucleus_boundaries"]
    elong = {}
    for cid, geom in zip(nuc["cell_id"], nuc.geometry, strict=True):
        xy = np.asarray(geom.exterior.coords)[:-1]
        ev = np.linalg.eigvalsh(np.cov(xy.T))
        elong[cid] = np.sqrt(ev[1] / max(ev[0], 1e-9))
    elongation = table.obs["cell_id"].map(elong).to_numpy(float)
    xy = np.asarray(table.obsm["spatial"], float)
    density = cKDTree(xy).query_ball_point(xy, r=25.0, return_length=True).astype(float)

    def less(values: np.ndarray, a: str, b: str) -> float:
        return mannwhitneyu(values[types == a], values[types == b], alternative="less").pvalue

    # measured on the bundle's own polygons and image, not on the generator's features
    assert less(area, "lymphocyte", "macrophage") < 1e-6
    assert less(elongation, "lymphocyte", "fibroblast") < 1e-6
    assert less(density, "fibroblast", "suprabasal_keratinocyte") < 1e-6  # sparse dermis
    # melanocytes are drawn among basal-layer cells: they look like basal keratinocytes
    basal, melano = types == "basal_keratinocyte", types == "melanocyte"
    assert abs(np.median(area[basal]) - np.median(area[melano])) < 0.25 * np.median(area[basal])


def test_context_genes_carry_spatial_signal(sdata) -> None:  # type: ignore[no-untyped-def]
    from scipy.spatial import cKDTree
    from scipy.stats import spearmanr

    table = sdata.tables["table"]
    types = table.obs["cell_type"].astype(str).to_numpy()
    xy = np.asarray(table.obsm["spatial"], float)
    expr = _log_norm(table)
    # interferon response follows the number of lymphocytes around a cell (graph context)
    ifn = expr[["CXCL9", "CXCL10", "STAT1", "ISG15", "GBP1"]].sum(axis=1).to_numpy()
    lymph = cKDTree(xy[types == "lymphocyte"])
    n_lymph = lymph.query_ball_point(xy, r=40.0, return_length=True)
    others = types != "lymphocyte"
    rho_ifn = spearmanr(n_lymph[others], ifn[others]).statistic
    assert rho_ifn > 0.2
    # cornified-envelope genes rise with distance from the basal layer
    supra = types == "suprabasal_keratinocyte"
    d_basal, _ = cKDTree(xy[types == "basal_keratinocyte"]).query(xy[supra])
    late = expr.loc[supra, ["IVL", "LOR", "FLG", "SPRR1A"]].sum(axis=1).to_numpy()
    assert spearmanr(d_basal, late).statistic > 0.3


def test_embedded_sample_is_cached_and_deterministic(
    embedded_bundle: Path, cli_bundle: Path
) -> None:
    from napari_sigmma.samples.embedded import GROUND_TRUTH_FILE, embedded_sample

    t0 = time.perf_counter()
    again = embedded_sample(cache_dir=embedded_bundle.parent)
    assert again == embedded_bundle
    assert time.perf_counter() - t0 < 2.0  # reused, not rebuilt
    leftovers = [p for p in embedded_bundle.parent.iterdir() if p.name.startswith(".embedded")]
    assert not leftovers
    a = pd.read_parquet(embedded_bundle / "cells.parquet")
    b = pd.read_parquet(cli_bundle / "cells.parquet")
    pd.testing.assert_frame_equal(a, b)
    truth = pd.read_parquet(embedded_bundle / GROUND_TRUTH_FILE)
    assert truth["cell_id"].tolist() == a["cell_id"].tolist()
    assert (truth["cell_type"].to_numpy() == a["cell_type"].to_numpy()).all()
