"""HEST-1k Xenium samples: a folder written from generated arrays, read back, bad variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from napari_sigmma.errors import SigmmaError
from napari_sigmma.io.hest import read_hest, write_hest_sample


def _copy(hest_sample: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(hest_sample["path"], tmp_path / "copy"))


def test_counts_genes_controls(hest_sample: dict) -> None:
    sdata = read_hest(hest_sample["path"])
    table = sdata.tables["table"]
    n = len(hest_sample["cell_ids"])
    assert list(table.var_names) == hest_sample["genes"]
    assert list(table.obs_names[:n]) == hest_sample["cell_ids"]
    assert table.obs["cell_id"].tolist()[:n] == hest_sample["cell_ids"]
    assert sparse.issparse(table.X) and table.X.dtype == np.float32
    # low-quality and unassigned transcripts are not counted; controls are set apart
    np.testing.assert_array_equal(table.X[:n].toarray(), hest_sample["counts"])
    controls = table.obsm["controls"]
    assert list(controls.columns) == sorted(hest_sample["controls"])
    expect = pd.DataFrame(hest_sample["control_counts"], columns=hest_sample["controls"])
    np.testing.assert_array_equal(
        controls.iloc[:n][sorted(hest_sample["controls"])].to_numpy(),
        expect[sorted(hest_sample["controls"])].to_numpy(),
    )
    assert not any(g.startswith(("BLANK", "NegControl")) for g in table.var_names)
    np.testing.assert_array_equal(
        table.obs["transcript_counts"].to_numpy()[:n], hest_sample["counts"].sum(axis=1)
    )


def test_centroids_and_the_um_to_px_contract(hest_sample: dict) -> None:
    sdata = read_hest(hest_sample["path"])
    table = sdata.tables["table"]
    mpp = hest_sample["mpp"]
    n = len(hest_sample["cell_ids"])
    uns = table.uns["sigmma"]
    assert uns["he_mpp"] == pytest.approx(mpp)
    m = np.asarray(uns["um_to_he_px"])
    assert m.shape == (3, 3)
    xy_um = np.asarray(table.obsm["spatial"])
    px = xy_um @ m[:2, :2].T + m[:2, 2]
    # segmented cells: polygon centroid = the generated centre (regular polygons)
    np.testing.assert_allclose(px[:n], hest_sample["centres_px"], atol=1e-6)
    # the cell with transcripts but no polygon: mean of its transcripts
    orphan = list(table.obs_names).index("orphan-1")
    np.testing.assert_allclose(px[orphan], hest_sample["orphan_xy_px"].mean(axis=0), atol=1e-9)
    assert table.X[orphan].sum() == 3
    # µm really are µm: H&E px × mpp
    np.testing.assert_allclose(xy_um[:n], hest_sample["centres_px"] * mpp, atol=1e-6)


def test_image_shapes_and_transforms(hest_sample: dict) -> None:
    from spatialdata.transformations import get_transformation

    sdata = read_hest(hest_sample["path"])
    mpp = hest_sample["mpp"]
    tree = sdata.images["he_image"]
    affine = get_transformation(tree, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(affine, np.eye(3))  # global = H&E pixels
    img = np.moveaxis(tree["scale0"]["image"].data.compute(), 0, -1)
    np.testing.assert_array_equal(img, hest_sample["image"])  # zlib: lossless
    assert len(tree) >= 2  # the file's pyramid levels are kept

    for key in ("cell_boundaries", "nucleus_boundaries", "cell_circles"):
        t = get_transformation(sdata.shapes[key], "global").to_affine_matrix(("x", "y"), ("x", "y"))
        np.testing.assert_allclose(t, np.diag([1 / mpp, 1 / mpp, 1]))
    cells = sdata.shapes["cell_boundaries"]
    assert list(cells.index) == hest_sample["cell_ids"]
    # boundaries in µm: a 24-gon of radius r px has area ~ π r² (mpp)²
    area = cells.geometry.area.to_numpy()
    cent = np.column_stack([cells.geometry.centroid.x, cells.geometry.centroid.y])
    np.testing.assert_allclose(cent, hest_sample["centres_px"] * mpp, atol=1e-6)
    assert np.all(area > np.pi * (18 * mpp) ** 2 * 0.95)
    assert np.all(area < np.pi * (26 * mpp) ** 2)
    circles = sdata.shapes["cell_circles"]
    assert list(circles.index) == list(sdata.tables["table"].obs["cell_id"])
    n = len(hest_sample["cell_ids"])
    np.testing.assert_allclose(circles["radius"].to_numpy()[:n], np.sqrt(area / np.pi))
    nuclei = sdata.shapes["nucleus_boundaries"]
    assert np.all(nuclei.geometry.area < np.pi * (8 * mpp) ** 2 + 1e-9)
    assert sdata.tables["table"].uns["spatialdata_attrs"]["region"] == "cell_circles"


def test_include_transcripts(hest_sample: dict) -> None:
    sdata = read_hest(hest_sample["path"], hest_sample["sample_id"], include_transcripts=True)
    points = sdata.points["transcripts"].compute()
    n_cells = len(hest_sample["cell_ids"])
    n_kept = hest_sample["n_transcripts"] - 3 * n_cells  # the low-qv ones are dropped
    assert len(points) == n_kept
    assert points["qv"].min() >= 20
    assert points["x"].max() <= hest_sample["image"].shape[1] * hest_sample["mpp"]


def test_int_cell_ids_and_no_segmentation(tmp_path: Path, hest_sample: dict) -> None:
    """Older Xenium stores integer cell ids with -1 for 'no cell'; no seg: transcript means."""
    rng = np.random.default_rng(1)
    centres = np.array([[50.0, 60.0], [150.0, 80.0], [90.0, 160.0]])
    rows = []
    for i, (x, y) in enumerate(centres, start=1):
        for g in range(4):
            for _ in range(g + 1):
                rows.append((i, x + rng.normal(0, 3), y + rng.normal(0, 3), f"G{g}", 30.0))
    rows += [(-1, 10.0, 10.0, "G0", 30.0)] * 5
    df = pd.DataFrame(rows, columns=["cell_id", "he_x", "he_y", "feature_name", "qv"])
    out = write_hest_sample(
        tmp_path / "old",
        sample_id="NCBI1",
        he_image=np.full((200, 200, 3), 240, np.uint8),
        mpp=0.5,
        transcripts=df,
    )
    sdata = read_hest(out)
    table = sdata.tables["table"]
    assert list(table.obs_names) == ["1", "2", "3"]
    np.testing.assert_array_equal(table.X.toarray(), np.tile([1, 2, 3, 4], (3, 1)))
    expect = df[df.cell_id > 0].groupby("cell_id")[["he_x", "he_y"]].mean().to_numpy() * 0.5
    np.testing.assert_allclose(table.obsm["spatial"], expect)
    assert "cell_boundaries" not in sdata.shapes and "cell_circles" in sdata.shapes


def test_mpp_from_tiff_when_metadata_missing(tmp_path: Path, hest_sample: dict) -> None:
    root = _copy(hest_sample, tmp_path)
    (root / "metadata" / f"{hest_sample['sample_id']}.json").unlink()
    with pytest.raises(SigmmaError, match=r"no pixel size.*pass mpp") as err:
        read_hest(root)  # HEST TIFFs carry no pixel size: the metadata JSON is needed
    assert "wsis" in str(err.value) and "metadata" in str(err.value)
    assert read_hest(root, mpp=0.25).tables["table"].uns["sigmma"]["he_mpp"] == 0.25
    write_hest_sample(
        tmp_path / "withres",
        sample_id="S1",
        he_image=hest_sample["image"],
        mpp=0.3,
        transcripts=pd.read_parquet(
            root / "transcripts" / f"{hest_sample['sample_id']}_transcripts.parquet"
        ),
        mpp_in_tiff=True,
    )
    (tmp_path / "withres" / "metadata" / "S1.json").unlink()
    sdata = read_hest(tmp_path / "withres")
    assert sdata.tables["table"].uns["sigmma"]["he_mpp"] == pytest.approx(0.3)


# ----------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SigmmaError, match="not found") as err:
        read_hest(tmp_path / "absent")
    assert "absent" in str(err.value)


def test_missing_subfolder(tmp_path: Path, hest_sample: dict) -> None:
    root = _copy(hest_sample, tmp_path)
    shutil.rmtree(root / "transcripts")
    with pytest.raises(SigmmaError, match="transcripts/ subfolder is missing") as err:
        read_hest(root)
    assert str(root) in str(err.value)


def test_missing_transcripts_file(tmp_path: Path, hest_sample: dict) -> None:
    root = _copy(hest_sample, tmp_path)
    next((root / "transcripts").glob("*.parquet")).unlink()
    with pytest.raises(SigmmaError, match="no sample"):
        read_hest(root)


def test_unknown_sample_id(hest_sample: dict) -> None:
    with pytest.raises(SigmmaError, match=r"no sample 'TENX999'.*TENXTEST"):
        read_hest(hest_sample["path"], sample_id="TENX999")


def test_two_samples_need_an_id(tmp_path: Path, hest_sample: dict) -> None:
    root = _copy(hest_sample, tmp_path)
    sid = hest_sample["sample_id"]
    shutil.copy(root / "wsis" / f"{sid}.tif", root / "wsis" / "OTHER.tif")
    shutil.copy(
        root / "transcripts" / f"{sid}_transcripts.parquet",
        root / "transcripts" / "OTHER_transcripts.parquet",
    )
    shutil.copy(root / "metadata" / f"{sid}.json", root / "metadata" / "OTHER.json")
    with pytest.raises(SigmmaError, match=r"2 samples.*pass sample_id"):
        read_hest(root)
    assert read_hest(root, sample_id="OTHER").tables["table"].n_obs > 0


def test_transcripts_missing_a_column(tmp_path: Path, hest_sample: dict) -> None:
    root = _copy(hest_sample, tmp_path)
    path = root / "transcripts" / f"{hest_sample['sample_id']}_transcripts.parquet"
    pd.read_parquet(path).drop(columns=["he_y"]).to_parquet(path)
    with pytest.raises(SigmmaError, match=r"lacks column.*he_y") as err:
        read_hest(root)
    assert str(path) in str(err.value)


def test_transcripts_not_parquet(tmp_path: Path, hest_sample: dict) -> None:
    root = _copy(hest_sample, tmp_path)
    path = root / "transcripts" / f"{hest_sample['sample_id']}_transcripts.parquet"
    path.write_text("cell_id,he_x\n")
    with pytest.raises(SigmmaError, match="parquet") as err:
        read_hest(root)
    assert str(path) in str(err.value)


def test_bad_metadata(tmp_path: Path, hest_sample: dict) -> None:
    root = _copy(hest_sample, tmp_path)
    meta = root / "metadata" / f"{hest_sample['sample_id']}.json"
    meta.write_text(json.dumps({"pixel_size_um_estimated": -1}))
    with pytest.raises(SigmmaError, match="positive") as err:
        read_hest(root)
    assert str(meta) in str(err.value)
    meta.write_text("{not json")
    with pytest.raises(SigmmaError, match="JSON"):
        read_hest(root)


def test_bad_segmentation(tmp_path: Path, hest_sample: dict) -> None:
    root = _copy(hest_sample, tmp_path)
    seg = root / "xenium_seg" / f"{hest_sample['sample_id']}_xenium_cell_seg.parquet"
    pd.DataFrame({"cell_id": ["a"], "x": [1.0]}).to_parquet(seg)
    with pytest.raises(SigmmaError, match="geometry") as err:
        read_hest(root)
    assert str(seg) in str(err.value)
