"""SpatialData .zarr stores (write / read back) and load_any's dispatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_sigmma.errors import SigmmaError
from napari_sigmma.io import detect_kind, load_any
from napari_sigmma.io.hest import read_hest
from napari_sigmma.io.store import is_sdata_store, read_sdata, write_sdata
from napari_sigmma.io.wsi import read_slide_sdata


def _matrix(element: object) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    return get_transformation(element, "global").to_affine_matrix(("x", "y"), ("x", "y"))


def test_hest_round_trip(tmp_path: Path, hest_sample: dict) -> None:
    sdata = read_hest(hest_sample["path"])
    path = write_sdata(sdata, tmp_path / "sample.zarr")
    assert is_sdata_store(path)
    back = read_sdata(path)
    table, table0 = back.tables["table"], sdata.tables["table"]
    np.testing.assert_array_equal(table.X.toarray(), table0.X.toarray())
    assert list(table.var_names) == list(table0.var_names)
    assert list(table.obs["cell_id"]) == list(table0.obs["cell_id"])
    np.testing.assert_allclose(table.obsm["spatial"], table0.obsm["spatial"])
    np.testing.assert_array_equal(
        table.obsm["controls"].to_numpy(), table0.obsm["controls"].to_numpy()
    )
    assert table.uns["sigmma"]["he_mpp"] == pytest.approx(hest_sample["mpp"])
    np.testing.assert_allclose(
        np.asarray(table.uns["sigmma"]["um_to_he_px"]),
        np.asarray(table0.uns["sigmma"]["um_to_he_px"]),
    )
    for key in ("cell_boundaries", "nucleus_boundaries", "cell_circles"):
        assert back.shapes[key].geometry.geom_equals_exact(sdata.shapes[key].geometry, 1e-9).all()
        np.testing.assert_allclose(_matrix(back.shapes[key]), _matrix(sdata.shapes[key]))
    img = back.images["he_image"]
    assert list(img.keys()) == list(sdata.images["he_image"].keys())
    np.testing.assert_array_equal(
        np.moveaxis(img["scale0"]["image"].data.compute(), 0, -1), hest_sample["image"]
    )
    np.testing.assert_allclose(_matrix(img), np.eye(3))
    assert back.attrs["sigmma"]["sample_id"] == hest_sample["sample_id"]


def test_slide_round_trip(tmp_path: Path, cmu_svs: Path) -> None:
    sdata = read_slide_sdata(cmu_svs)
    path = write_sdata(sdata, tmp_path / "slide.zarr")
    back = read_sdata(path)
    a, b = back.images["he_image"], sdata.images["he_image"]
    assert [a[k]["image"].shape for k in a] == [b[k]["image"].shape for k in b]
    np.testing.assert_array_equal(
        a["scale1"]["image"].data[:, 100:200, 50:90].compute(),
        b["scale1"]["image"].data[:, 100:200, 50:90].compute(),
    )
    np.testing.assert_allclose(_matrix(a), np.diag([0.499, 0.499, 1]))


def test_overwrite_rules(tmp_path: Path, hest_sample: dict) -> None:
    sdata = read_hest(hest_sample["path"])
    path = write_sdata(sdata, tmp_path / "s.zarr")
    with pytest.raises(SigmmaError, match="already exists") as err:
        write_sdata(sdata, path)
    assert str(path) in str(err.value)
    lazy = read_sdata(path)  # its image reads from the store: overwriting it would lose it
    with pytest.raises(SigmmaError, match="being read from"):
        write_sdata(lazy, path, overwrite=True)
    sdata.tables["table"].uns["sigmma"]["marker"] = "second"
    write_sdata(sdata, path, overwrite=True)
    assert read_sdata(path).tables["table"].uns["sigmma"]["marker"] == "second"
    assert not list(tmp_path.glob(".*partial*"))

    other = tmp_path / "notes.zarr"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SigmmaError, match="not a SpatialData store"):
        write_sdata(sdata, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(SigmmaError, match=r"\.zarr"):
        write_sdata(sdata, tmp_path / "s.h5ad")


def test_read_errors(tmp_path: Path) -> None:
    import zarr

    with pytest.raises(SigmmaError, match="not found"):
        read_sdata(tmp_path / "missing.zarr")
    f = tmp_path / "file.zarr"
    f.write_text("x")
    with pytest.raises(SigmmaError, match="not a folder"):
        read_sdata(f)
    plain = tmp_path / "plain.zarr"
    plain.mkdir()
    with pytest.raises(SigmmaError, match="not a SpatialData store") as err:
        read_sdata(plain)
    assert str(plain) in str(err.value)
    arr = tmp_path / "array.zarr"
    zarr.create_array(arr, shape=(4, 4), dtype="uint8")
    with pytest.raises(SigmmaError, match="not a SpatialData store"):
        read_sdata(arr)
    with pytest.raises(SigmmaError, match="not a SpatialData store"):
        load_any(arr)


def test_load_any_dispatch(tmp_path: Path, hest_sample: dict, cmu_svs: Path) -> None:
    assert detect_kind(hest_sample["path"]) == "hest"
    assert detect_kind(cmu_svs) == "slide"
    hest = load_any(hest_sample["path"])
    assert hest.tables["table"].n_obs == len(hest_sample["cell_ids"]) + 1
    slide = load_any(cmu_svs)
    assert "he_image" in slide.images and not slide.tables
    path = write_sdata(hest, tmp_path / "h.zarr")
    assert detect_kind(path) == "zarr"
    assert load_any(path).tables["table"].n_obs == hest.tables["table"].n_obs

    with pytest.raises(SigmmaError, match="not found"):
        load_any(tmp_path / "nothing")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert detect_kind(empty) is None
    with pytest.raises(SigmmaError, match=r"not a SpatialData \.zarr, a Xenium bundle") as err:
        load_any(empty)
    assert str(empty) in str(err.value)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(SigmmaError, match="not a slide file"):
        load_any(txt)


def test_load_any_xenium(hest_as_xenium: dict) -> None:
    bundle = hest_as_xenium["path"]
    assert detect_kind(bundle) == "xenium"
    sdata = load_any(bundle)
    table = sdata.tables["table"]
    assert list(table.var_names) == hest_as_xenium["genes"]
    np.testing.assert_array_equal(table.X.toarray(), hest_as_xenium["counts"])
    uns = table.uns["sigmma"]
    assert uns["he_mpp"] == pytest.approx(hest_as_xenium["he_mpp"], rel=1e-6)
    m = np.asarray(uns["um_to_he_px"])
    px = np.asarray(table.obsm["spatial"]) @ m[:2, :2].T + m[:2, 2]
    np.testing.assert_allclose(px, hest_as_xenium["centres_px"], atol=1e-3)


def _table_store(path: Path, name: str, values: np.ndarray) -> Path:
    """A small SpatialData store: squares ``squares_<name>`` annotated by ``t_<name>``."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import spatialdata as sd
    from shapely.geometry import box
    from spatialdata.models import ShapesModel, TableModel

    ids = [f"{name}{i}" for i in range(len(values))]
    gdf = gpd.GeoDataFrame(
        geometry=[box(i, 0, i + 1, 1) for i in range(len(ids))], index=pd.Index(ids)
    )
    obs = pd.DataFrame(
        {"id": ids, "region": pd.Categorical([f"squares_{name}"] * len(ids))},
        index=pd.Index(ids),
    )
    table = ad.AnnData(obs=obs)
    table.obsm["emb"] = values.astype(np.float32)
    data = sd.SpatialData(
        shapes={f"squares_{name}": ShapesModel.parse(gdf)},
        tables={
            f"t_{name}": TableModel.parse(
                table, region=f"squares_{name}", region_key="region", instance_key="id"
            )
        },
    )
    return write_sdata(data, path)


def test_merge_stores_moves_elements_without_loading(tmp_path: Path) -> None:
    from napari_sigmma.io.store import merge_stores

    rng = np.random.default_rng(0)
    vals = {k: rng.normal(size=(3 + k, 4)) for k in range(3)}
    parts = [_table_store(tmp_path / f"p{k}.zarr", str(k), v) for k, v in vals.items()]
    out = merge_stores(parts, tmp_path / "all.zarr")
    merged = read_sdata(out)
    assert set(merged.shapes) == {"squares_0", "squares_1", "squares_2"}
    for k, v in vals.items():
        np.testing.assert_allclose(merged.tables[f"t_{k}"].obsm["emb"], v.astype(np.float32))
        assert len(merged.shapes[f"squares_{k}"]) == len(v)
    assert not any(p.exists() for p in parts)  # consumed

    # two parts with one element name: a clear error, the existing target untouched
    a = _table_store(tmp_path / "a.zarr", "x", vals[0])
    b = _table_store(tmp_path / "b.zarr", "x", vals[1])
    with pytest.raises(SigmmaError, match="in two parts"):
        merge_stores([a, b], out, overwrite=True)
    again = read_sdata(out)
    assert set(again.tables) == {"t_0", "t_1", "t_2"}
    assert not (tmp_path / ".all.partial.zarr").exists()
    with pytest.raises(SigmmaError, match="not a SpatialData store"):
        merge_stores([tmp_path], tmp_path / "x.zarr")
