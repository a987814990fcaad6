"""Xenium bundles both ways: our writer, spatialdata-io's reader, our canonical reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import tifffile

from napari_sigmma.errors import SigmmaError
from napari_sigmma.io import xenium_format as xf
from napari_sigmma.io.xenium import (
    affine_from_keypoints,
    check_xenium_bundle,
    he_mpp,
    he_pixels_from_um,
    read_alignment_csv,
    read_xenium,
)
from napari_sigmma.samples.tiffwrite import pyramid_shapes, write_pyramidal_ome_tiff
from napari_sigmma.samples.xenium_write import write_xenium_bundle

PIXEL_SIZE = 0.2125
HE_MPP = 0.5
N_GENES, N_CTRL = 120, 10
PREFIX = "sample_"


def _affine(rot_deg: float = 12.0, tx: float = 400.0, ty: float = 80.0) -> np.ndarray:
    s = HE_MPP / PIXEL_SIZE
    t = np.deg2rad(rot_deg)
    return np.array(
        [[s * np.cos(t), -s * np.sin(t), tx], [s * np.sin(t), s * np.cos(t), ty], [0, 0, 1]]
    )


def _inputs(n_side: int = 18, size: int = 1024, seed: int = 0) -> dict:
    """300-ish cells on a jittered grid (no overlaps) over a 1024² H&E with dark dots at the
    cells, 120 genes + 10 controls, a rotated affine."""
    rng = np.random.default_rng(seed)
    a = _affine()
    g = np.linspace(60, size - 60, n_side)
    he_xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)[:300]
    he_xy = he_xy + rng.uniform(-4, 4, he_xy.shape)
    n = len(he_xy)
    um = (np.c_[he_xy, np.ones(n)] @ a.T)[:, :2] * PIXEL_SIZE
    ang = np.linspace(0, 2 * np.pi, 17)[:-1]
    ring = np.c_[np.cos(ang), np.sin(ang)]
    cell_polys = [c + 6.0 * ring * (1 + 0.08 * rng.standard_normal(16))[:, None] for c in um]
    nuc_polys = [c + 2.5 * ring for c in um]
    nuc_polys[5] = None  # one cell without a nucleus
    cells = pd.DataFrame(
        {
            "cell_id": xf.xenium_cell_ids(n),
            "x_centroid": um[:, 0],
            "y_centroid": um[:, 1],
            "cell_area": np.pi * 36.0,
            "nucleus_area": np.pi * 6.25,
            "cell_type": rng.choice(["tumour", "stroma"], n),
        }
    )
    nf = N_GENES + N_CTRL
    lam = rng.gamma(1.0, 1.0, (n, nf))
    lam[:, N_GENES:] *= 0.3
    counts = sp.csr_matrix(rng.poisson(lam))
    names = [f"GENE{i}" for i in range(N_GENES)]
    names += [f"NegControlProbe_{i}" for i in range(4)]
    names += [f"NegControlCodeword_{i}" for i in range(3)]
    names += [f"BLANK_{i:04d}" for i in range(3)]
    types = [xf.GENE_EXPRESSION] * N_GENES + [xf.NEG_CONTROL_PROBE] * 4
    types += [xf.NEG_CONTROL_CODEWORD] * 3 + [xf.UNASSIGNED_CODEWORD] * 3
    features = pd.DataFrame(
        {"id": [f"ENSG{i:05d}" for i in range(nf)], "name": names, "feature_type": types}
    )
    he = rng.integers(170, 250, (size, size, 3)).astype(np.uint8)
    for x, y in np.rint(he_xy).astype(int):
        he[y - 2 : y + 3, x - 2 : x + 3] = 20
    return dict(
        he_image=he,
        he_to_morph=a,
        pixel_size=PIXEL_SIZE,
        cells=cells,
        counts=counts,
        features=features,
        cell_polygons=cell_polys,
        nucleus_polygons=nuc_polys,
        he_xy=he_xy,
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> dict:
    data = _inputs()
    out = tmp_path_factory.mktemp("xenium") / "bundle"
    kwargs = {k: v for k, v in data.items() if k != "he_xy"}
    write_xenium_bundle(out, name_prefix=PREFIX, seed=3, **kwargs)
    data["path"] = out
    return data


@pytest.fixture(scope="module")
def sdata(bundle):
    return read_xenium(bundle["path"])


def _copy(bundle: dict, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle["path"], dst)
    return dst


# --- the format helpers ----------------------------------------------------------------
def test_cell_id_encoding_matches_spatialdata_io():
    from spatialdata_io.readers.xenium import cell_id_str_from_prefix_suffix_uint32

    prefix = np.array([0, 1, 0xF, 0xDEADBEEF, 0xFFFFFFFF], dtype=np.uint32)
    ours = xf.cell_ids_from_pairs(prefix, np.ones(5, np.uint32))
    assert ours.tolist() == cell_id_str_from_prefix_suffix_uint32(prefix, np.ones(5, int)).tolist()
    assert ours[0] == "aaaaaaaa-1" and ours[3] == "noknloop-1" and ours[4] == "pppppppp-1"
    back_p, back_s = xf.pairs_from_cell_ids(ours)
    assert back_p.tolist() == prefix.tolist() and back_s.tolist() == [1] * 5
    ids = xf.xenium_cell_ids(1000, suffix=2)
    assert len(set(ids)) == 1000 and ids == sorted(ids) and ids[0].endswith("-2")
    for bad in ["abc-1", "aaaaaaaz-1", "aaaaaaaa1", "aaaaaaaa-x"]:
        with pytest.raises(SigmmaError):
            xf.pairs_from_cell_ids([bad])


def test_pyramidal_ome_tiff_from_tile_source(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 4000, (700, 1000), dtype=np.uint16)
    calls = []

    def source(y, x, h, w):
        calls.append((y, x, h, w))
        return img[y : y + h, x : x + w]

    path = write_pyramidal_ome_tiff(
        tmp_path / "g.ome.tif",
        source,
        shape=img.shape,
        dtype=np.uint16,
        mpp=0.25,
        tile=256,
        compression="zlib",
        channel_names=["DAPI"],
    )
    assert max(h for *_, h, _w in calls) <= 256  # tile by tile, never the whole image
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert tif.is_ome and tif.pages[0].is_tiled
        assert [lvl.shape for lvl in series.levels] == pyramid_shapes(700, 1000, tile=256)
        assert np.array_equal(series.levels[0].asarray(), img)
        lvl1 = series.levels[1].asarray().astype(float)
        assert abs(lvl1[10, 10] - img[20:22, 20:22].mean()) <= 0.5
        assert 'PhysicalSizeX="0.25"' in tif.ome_metadata


def test_pyramidal_ome_tiff_rgb_jpeg(tmp_path):
    yy, xx = np.mgrid[0:600, 0:900]
    img = np.stack([(xx % 256), (yy % 256), ((xx + yy) % 256)], -1).astype(np.uint8)
    path = write_pyramidal_ome_tiff(tmp_path / "he.ome.tif", img, mpp=0.5, tile=256)
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert len(levels) == 3 and levels[0].shape == (600, 900, 3)
        assert np.abs(levels[0].asarray().astype(int) - img).mean() < 4


# --- the writer, judged by spatialdata-io with its default flags -------------------------
def test_spatialdata_io_reads_written_bundle(bundle):
    from spatialdata.transformations import get_transformation
    from spatialdata_io import xenium

    sdata = xenium(bundle["path"])
    table = sdata.tables["table"]
    assert table.n_obs == 300 and table.n_vars == N_GENES  # gex_only by default
    assert table.obs["cell_id"].tolist() == bundle["cells"]["cell_id"].tolist()
    assert "cell_type" in table.obs
    he = sdata.images["he_image"]
    a = get_transformation(he, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    assert np.allclose(a, bundle["he_to_morph"]) and not np.allclose(a, np.eye(3))
    assert he["scale0"]["image"].shape == (3, 1024, 1024)
    assert set(sdata.labels) == {"cell_labels", "nucleus_labels"}
    assert len(sdata.shapes["cell_boundaries"]) == 300
    assert len(sdata.shapes["nucleus_boundaries"]) == 299
    assert sdata.images["morphology_focus"]["scale0"]["image"].dtype == np.uint16

    # the raster labels: every cell centroid falls on its own label
    lab = np.asarray(sdata.labels["cell_labels"]["scale0"]["image"])
    xy = table.obsm["spatial"] / PIXEL_SIZE
    hit = lab[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    assert np.array_equal(hit, table.obs["cell_labels"].to_numpy())

    # each assigned transcript is one count of the matrix, inside its own cell
    tx = sdata.points["transcripts"].compute()
    assigned = tx[tx["cell_id"] != xf.UNASSIGNED]
    names = bundle["features"]["name"].to_numpy()
    row = pd.Series(np.arange(300), index=bundle["cells"]["cell_id"])[assigned["cell_id"]]
    col = pd.Series(np.arange(len(names)), index=names)[assigned["feature_name"].astype(str)]
    rebuilt = sp.csr_matrix(
        (np.ones(len(row)), (row.to_numpy(), col.to_numpy())), shape=bundle["counts"].shape
    )
    assert (rebuilt != bundle["counts"]).nnz == 0
    own = lab[(assigned["y"] / PIXEL_SIZE).astype(int), (assigned["x"] / PIXEL_SIZE).astype(int)]
    assert (own == row.to_numpy() + 1).mean() > 0.99
    assert assigned["qv"].between(20, 40).all()
    assert 0.05 < assigned["overlaps_nucleus"].mean() < 0.6


def test_writer_takes_a_written_slide_and_rejects_bad_input(tmp_path):
    data = _inputs(n_side=6, size=600)
    data.pop("he_xy")
    slide = write_pyramidal_ome_tiff(
        tmp_path / "slide.ome.tif", data.pop("he_image"), mpp=0.5, tile=256
    )
    out = write_xenium_bundle(tmp_path / "b", he_image=slide, **data)
    with tifffile.TiffFile(out / xf.HE_IMAGE_SUFFIX) as tif:
        assert tif.series[0].shape == (600, 600, 3)
    assert check_xenium_bundle(out).n_cells == 36

    bad = dict(data, counts=data["counts"][:10])
    with pytest.raises(SigmmaError, match="rows"):
        write_xenium_bundle(tmp_path / "c", he_image=slide, **bad)
    neg = data["counts"].copy().astype(np.int64)
    neg.data[0] = -1
    with pytest.raises(SigmmaError, match="negative"):
        write_xenium_bundle(tmp_path / "d", he_image=slide, **dict(data, counts=neg))


# --- our reader: the canonical layout ----------------------------------------------------
def test_read_xenium_canonical_layout(bundle, sdata):
    from spatialdata.transformations import get_transformation

    he = sdata.images["he_image"]
    assert [k for k in he.children][:2] == ["scale0", "scale1"]
    img = he["scale0"]["image"]
    assert img.dims == ("c", "y", "x") and img.dtype == np.uint8 and img.shape == (3, 1024, 1024)
    a = get_transformation(he, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    assert np.allclose(a, bundle["he_to_morph"], atol=1e-9)

    table = sdata.tables["table"]
    assert table.n_obs == 300 and table.n_vars == N_GENES
    assert sp.issparse(table.X) and table.X.format == "csr" and table.X.dtype == np.float32
    counts = bundle["counts"]
    assert np.array_equal(table.X.toarray(), counts[:, :N_GENES].toarray())
    assert not any(n.startswith(("NegControl", "BLANK")) for n in table.var_names)
    controls = table.obsm["controls"]
    assert isinstance(controls, pd.DataFrame) and controls.shape == (300, N_CTRL)
    assert np.array_equal(controls.to_numpy(), counts[:, N_GENES:].toarray())
    assert controls.columns[-1] == "BLANK_0002"
    assert table.obs["cell_id"].map(type).eq(str).all()
    assert table.obs["cell_id"].tolist() == bundle["cells"]["cell_id"].tolist()
    cells = bundle["cells"]
    assert np.allclose(table.obsm["spatial"], cells[["x_centroid", "y_centroid"]].to_numpy())
    assert "spatialdata_attrs" in table.uns
    assert set(sdata.shapes) >= {"cell_boundaries", "nucleus_boundaries", "cell_circles"}
    assert "transcripts" in sdata.points


def test_cells_land_on_their_he_pixels(bundle, sdata):
    table = sdata.tables["table"]
    px = he_pixels_from_um(sdata, table.obsm["spatial"])
    assert np.abs(px - bundle["he_xy"]).max() < 0.5
    assert he_mpp(sdata) == pytest.approx(HE_MPP, rel=1e-9)
    m = np.asarray(table.uns["sigmma"]["um_to_he_px"])
    assert np.allclose((np.c_[table.obsm["spatial"], np.ones(300)] @ m.T)[:, :2], px)
    # and the image really has the cell's dark dot there (not transposed / flipped)
    img = np.asarray(sdata.images["he_image"]["scale0"]["image"])
    xi, yi = np.rint(px).astype(int).T
    assert img[:, yi, xi].max() < 80
    assert img[:, yi + 10, xi + 10].min() > 120


def test_keypoints_give_the_same_affine(bundle, tmp_path):
    path = _copy(bundle, tmp_path)
    (path / f"{PREFIX}{xf.HE_ALIGNMENT_SUFFIX}").unlink()
    a = bundle["he_to_morph"]
    rng = np.random.default_rng(5)
    he_pts = rng.uniform(0, 1024, (6, 2))
    fixed = (np.c_[he_pts, np.ones(6)] @ a.T)[:, :2]
    kp = pd.DataFrame(
        {
            "fixedX": fixed[:, 0],
            "fixedY": fixed[:, 1],
            "alignmentX": he_pts[:, 0],
            "alignmentY": he_pts[:, 1],
        }
    )
    kp.to_csv(path / f"{PREFIX}keypoints.csv", index=False)
    assert np.abs(affine_from_keypoints(path / f"{PREFIX}keypoints.csv") - a).max() < 1e-6
    info = check_xenium_bundle(path)
    assert info.alignment_source == "keypoints" and np.abs(info.alignment - a).max() < 1e-6
    kp_um = kp.assign(fixedX=fixed[:, 0] * PIXEL_SIZE, fixedY=fixed[:, 1] * PIXEL_SIZE)
    kp_um.to_csv(tmp_path / "um_keypoints.csv", index=False)
    got = affine_from_keypoints(
        tmp_path / "um_keypoints.csv", fixed_units="um", pixel_size=PIXEL_SIZE
    )
    assert np.abs(got - a).max() < 1e-6

    from spatialdata.transformations import get_transformation

    sdata = read_xenium(path, transcripts=False)
    t = get_transformation(sdata.images["he_image"], "global")
    assert np.abs(t.to_affine_matrix(("x", "y"), ("x", "y")) - a).max() < 1e-6
    assert sdata.attrs["sigmma"]["alignment_source"] == "keypoints"


# --- bad input: SigmmaError naming the file ---------------------------------------------
def _rewrite_h5(path: Path, **changes) -> None:
    with h5py.File(path / xf.CELL_FEATURE_MATRIX, "r+") as f:
        m = f["matrix"]
        for key, value in changes.items():
            del m[key]
            m.create_dataset(key, data=value)


def _swap_barcodes(p: Path) -> None:
    with h5py.File(p / xf.CELL_FEATURE_MATRIX, "r") as f:
        bc = f["matrix/barcodes"][()].copy()
    bc[[0, 1]] = bc[[1, 0]]
    _rewrite_h5(p, barcodes=bc)


def _bad_data(p: Path, value: float) -> None:
    with h5py.File(p / xf.CELL_FEATURE_MATRIX, "r") as f:
        data = f["matrix/data"][()].astype(np.float32)
    data[3] = value
    _rewrite_h5(p, data=data)


def _truncate(p: Path, name: str) -> None:
    raw = (p / name).read_bytes()
    (p / name).write_bytes(raw[: len(raw) // 3])


def _alignment(p: Path, text: str) -> None:
    (p / f"{PREFIX}{xf.HE_ALIGNMENT_SUFFIX}").write_text(text)


def _keypoints(p: Path, pts: list[tuple[float, float]]) -> None:
    (p / f"{PREFIX}{xf.HE_ALIGNMENT_SUFFIX}").unlink()
    arr = np.asarray(pts, float)
    pd.DataFrame(
        {
            "fixedX": arr[:, 0] * 2 + 5,
            "fixedY": arr[:, 1] * 2,
            "alignmentX": arr[:, 0],
            "alignmentY": arr[:, 1],
        }
    ).to_csv(p / "keypoints.csv", index=False)


def _shuffle_boundaries(p: Path) -> None:
    df = pd.read_parquet(p / xf.CELL_BOUNDARIES)
    df.sample(frac=1.0, random_state=0).to_parquet(p / xf.CELL_BOUNDARIES, index=False)


def _drop_column(p: Path, name: str, column: str) -> None:
    table = pq.read_table(p / name)
    pq.write_table(table.drop([column]), p / name)


def _remove(p: Path, name: str) -> None:
    target = p / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()


BAD_CASES = {
    **{f"missing {n}": (lambda p, n=n: _remove(p, n), n) for n in xf.REQUIRED_FILES},
    "invalid json": (
        lambda p: (p / xf.EXPERIMENT_FILE).write_text("{pixel_size: 0.2"),
        xf.EXPERIMENT_FILE,
    ),
    "no pixel size": (
        lambda p: (p / xf.EXPERIMENT_FILE).write_text(
            json.dumps({"analysis_sw_version": "xenium-2.0.0.10"})
        ),
        xf.EXPERIMENT_FILE,
    ),
    "truncated h5": (lambda p: _truncate(p, xf.CELL_FEATURE_MATRIX), xf.CELL_FEATURE_MATRIX),
    "corrupt zarr zip": (lambda p: _truncate(p, xf.CELLS_ZARR), xf.CELLS_ZARR),
    "corrupt cells parquet": (lambda p: _truncate(p, xf.CELLS_PARQUET), xf.CELLS_PARQUET),
    "transcripts without feature_name": (
        lambda p: _drop_column(p, xf.TRANSCRIPTS, "feature_name"),
        xf.TRANSCRIPTS,
    ),
    "alignment 2x3": (lambda p: _alignment(p, "1,0,0\n0,1,0\n"), xf.HE_ALIGNMENT_SUFFIX),
    "alignment not numeric": (
        lambda p: _alignment(p, "1,0,a\n0,1,0\n0,0,1\n"),
        xf.HE_ALIGNMENT_SUFFIX,
    ),
    "alignment singular": (
        lambda p: _alignment(p, "1,2,0\n2,4,0\n0,0,1\n"),
        xf.HE_ALIGNMENT_SUFFIX,
    ),
    "keypoints too few": (lambda p: _keypoints(p, [(0, 0), (10, 3)]), "keypoints.csv"),
    "keypoints collinear": (
        lambda p: _keypoints(p, [(0, 0), (1, 1), (2, 2), (5, 5)]),
        "keypoints.csv",
    ),
    "table ids differ from cells.parquet": (_swap_barcodes, xf.CELL_FEATURE_MATRIX),
    "nan counts": (lambda p: _bad_data(p, np.nan), xf.CELL_FEATURE_MATRIX),
    "negative counts": (lambda p: _bad_data(p, -2.0), xf.CELL_FEATURE_MATRIX),
    "no h&e image": (lambda p: _remove(p, f"{PREFIX}{xf.HE_IMAGE_SUFFIX}"), xf.HE_IMAGE_SUFFIX),
    # passes our checks, fails inside spatialdata-io: the error is re-raised naming the file
    "non-contiguous polygons": (_shuffle_boundaries, xf.CELL_BOUNDARIES),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_names_the_file(bundle, tmp_path, case):
    mutate, name = BAD_CASES[case]
    path = _copy(bundle, tmp_path)
    mutate(path)
    with pytest.raises(SigmmaError) as err:
        read_xenium(path, transcripts=False)
    assert name in str(err.value)


def test_missing_folder_and_alignment_helpers(tmp_path):
    with pytest.raises(SigmmaError, match="not found"):
        read_xenium(tmp_path / "nowhere")
    (tmp_path / "ok.csv").write_text("2,0,1\n0,2,3\n0,0,1\n")
    assert np.array_equal(
        read_alignment_csv(tmp_path / "ok.csv"), [[2, 0, 1], [0, 2, 3], [0, 0, 1]]
    )
    (tmp_path / "bad.csv").write_text("2,0,1\n0,2,3\n1,0,1\n")
    with pytest.raises(SigmmaError, match=r"bad\.csv"):
        read_alignment_csv(tmp_path / "bad.csv")


def test_without_he_and_without_alignment(bundle, tmp_path):
    sdata = read_xenium(bundle["path"], he=False, transcripts=False)
    assert "he_image" not in sdata.images and "transcripts" not in sdata.points
    assert sdata.tables["table"].n_vars == N_GENES
    assert sdata.tables["table"].uns["sigmma"]["he_frame"] == "morphology"

    path = _copy(bundle, tmp_path)
    (path / f"{PREFIX}{xf.HE_ALIGNMENT_SUFFIX}").unlink()
    with pytest.warns(UserWarning, match="identity"):
        info = check_xenium_bundle(path)
    assert info.alignment_source == "identity" and np.array_equal(info.alignment, np.eye(3))
