"""Drag and drop into a real napari viewer: slide files, HEST folders, .zarr stores, Xenium
bundles; bad files become notifications and the viewer keeps working."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_sigmma.io.hest import read_hest
from napari_sigmma.io.store import write_sdata
from napari_sigmma.viewer import layers as layers_mod
from napari_sigmma.viewer.hooks import get_folder_reader, get_slide_reader
from napari_sigmma.viewer.layers import sdata_layers

PLUGIN = "napari-sigmma"


def _messages(since: int) -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records[since:]]


def _n_records() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def _polygon_centroid(yx: np.ndarray) -> np.ndarray:
    import shapely

    c = shapely.Polygon(yx[:, ::-1]).centroid
    return np.array([c.y, c.x])


def test_open_svs(make_napari_viewer, cmu_svs: Path) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    added = viewer.open(str(cmu_svs), plugin=PLUGIN)
    assert len(added) == 1
    layer = added[0]
    assert layer.name == "cmu_small_region H&E"
    assert layer.rgb and layer.multiscale
    assert len(layer.data) == 4 and layer.data[0].shape == (2967, 2220, 3)
    np.testing.assert_allclose(layer.scale, [0.499, 0.499])
    np.testing.assert_allclose(layer.translate, [0, 0])
    assert layer.metadata["element"] == "he_image"
    assert layer.metadata["sdata_path"] == str(cmu_svs)
    # world coordinates are µm: the slide's far corner is at H x mpp
    np.testing.assert_allclose(layer.data_to_world([2967, 2220]), [2967 * 0.499, 2220 * 0.499])


def _check_hest_layers(added: list, hest_sample: dict, source: str) -> None:
    mpp = hest_sample["mpp"]
    n = len(hest_sample["cell_ids"])
    names = [layer.name for layer in added]
    assert [type(layer).__name__ for layer in added] == ["Image", "Shapes", "Points"], names
    image, shapes, points = added
    for layer in added:
        np.testing.assert_allclose(layer.scale, [mpp, mpp])
        np.testing.assert_allclose(layer.translate, [0, 0])
        assert layer.metadata["sdata_path"] == source
        assert layer.metadata["he_mpp"] == pytest.approx(mpp)
    assert image.metadata["element"] == "he_image"
    assert shapes.metadata["element"] == "cell_boundaries"
    assert points.metadata["element"] == "table"
    assert image.rgb
    np.testing.assert_array_equal(np.asarray(image.data[0]), hest_sample["image"])
    # cells: H&E pixels (y, x), so they sit on their nuclei in the image
    assert len(points.data) == n + 1
    np.testing.assert_allclose(points.data[:n], hest_sample["centres_px"][:, ::-1], atol=1e-6)
    assert list(points.features["cell_id"][:n]) == hest_sample["cell_ids"]
    nucleus_rgb = np.asarray(image.data[0])[tuple(np.round(points.data[:n]).astype(int).T)]
    assert (nucleus_rgb == (110, 60, 150)).all()
    assert len(shapes.data) == n
    centroids = np.array([_polygon_centroid(d) for d in shapes.data])
    np.testing.assert_allclose(centroids, hest_sample["centres_px"][:, ::-1], atol=1e-6)


def test_open_hest_folder(make_napari_viewer, hest_sample: dict) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    added = viewer.open(str(hest_sample["path"]), plugin=PLUGIN)
    _check_hest_layers(added, hest_sample, str(hest_sample["path"]))
    assert len(viewer.layers) == 3


def test_open_zarr(make_napari_viewer, tmp_path: Path, hest_sample: dict) -> None:  # type: ignore[no-untyped-def]
    store = write_sdata(read_hest(hest_sample["path"]), tmp_path / "sample.zarr")
    viewer = make_napari_viewer()
    added = viewer.open(str(store), plugin=PLUGIN)
    _check_hest_layers(added, hest_sample, str(store))


def test_open_xenium_bundle(make_napari_viewer, hest_as_xenium: dict) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    added = viewer.open(str(hest_as_xenium["path"]), plugin=PLUGIN)
    kinds = {type(layer).__name__: layer for layer in added}
    assert set(kinds) == {"Image", "Shapes", "Points"}
    mpp = hest_as_xenium["he_mpp"]
    for layer in added:
        np.testing.assert_allclose(layer.scale, [mpp, mpp], rtol=1e-6)
        np.testing.assert_allclose(layer.translate, [0, 0])
    # the bundle's cells are in µm of the rotated morphology frame; on screen they must
    # land back on the H&E pixels they were generated at
    points = kinds["Points"]
    assert len(points.data) == len(hest_as_xenium["centres_px"])
    np.testing.assert_allclose(points.data, hest_as_xenium["centres_px"][:, ::-1], atol=1e-3)
    centroids = np.array([_polygon_centroid(d) for d in kinds["Shapes"].data])
    np.testing.assert_allclose(centroids, hest_as_xenium["centres_px"][:, ::-1], atol=0.05)


def test_thinning_note_is_shown(  # type: ignore[no-untyped-def]
    make_napari_viewer, monkeypatch: pytest.MonkeyPatch, hest_sample: dict
) -> None:
    monkeypatch.setattr(layers_mod, "MAX_POINTS", 10)
    monkeypatch.setattr(layers_mod, "MAX_SHAPES", 7)
    viewer = make_napari_viewer()
    before = _n_records()
    added = viewer.open(str(hest_sample["path"]), plugin=PLUGIN)
    shapes, points = added[1], added[2]
    assert len(points.data) == 10 and len(shapes.data) == 7
    assert points.metadata["n_total"] == 49 and points.metadata["n_shown"] == 10
    assert "showing 10 of 49 cells" in points.metadata["note"]
    assert "showing 7 of 48 outlines" in shapes.metadata["note"]
    # the shown rows are the ones the metadata says
    idx = points.metadata["obs_index"]
    table = read_hest(hest_sample["path"]).tables["table"]
    assert list(points.features["cell_id"]) == list(table.obs["cell_id"].iloc[idx])
    # the outlines kept are a compact patch around the middle
    centres = np.array([_polygon_centroid(d) for d in shapes.data])
    middle = np.median(hest_sample["centres_px"][:, ::-1], axis=0)
    assert np.hypot(*(centres - middle).T).max() < 160
    messages = _messages(before)
    assert any("showing 10 of 49 cells" in m for m in messages)
    assert any("showing 7 of 48 outlines" in m for m in messages)


def test_sdata_layers_pure(hest_sample: dict) -> None:
    layers = sdata_layers(read_hest(hest_sample["path"]), max_points=5, nuclei=True)
    assert [t for _, _, t in layers] == ["image", "shapes", "shapes", "points"]
    data, kwargs, _ = layers[-1]
    assert data.shape == (5, 2) and kwargs["metadata"]["n_total"] == 49
    assert kwargs["size"] == pytest.approx(layers_mod.POINT_SIZE_UM / hest_sample["mpp"])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_bad_slide_is_a_notification(  # type: ignore[no-untyped-def]
    make_napari_viewer, tmp_path: Path, cmu_svs: Path, kind: str
) -> None:
    bad = tmp_path / "broken.tif"
    if kind == "text":
        bad.write_text("definitely not a TIFF")
    else:
        import tifffile

        with tifffile.TiffWriter(tmp_path / "ok.tif") as tw:
            tw.write(
                np.full((600, 600, 3), 200, np.uint8),
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                resolution=(2e4, 2e4),
                resolutionunit="CENTIMETER",
            )
        data = (tmp_path / "ok.tif").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    viewer = make_napari_viewer()
    before = _n_records()
    assert viewer.open(str(bad), plugin=PLUGIN) == []
    messages = _messages(before)
    assert any(str(bad) in m for m in messages), messages
    assert len(viewer.layers) == 0
    # the viewer carries on: a good slide still opens
    assert len(viewer.open(str(cmu_svs), plugin=PLUGIN)) == 1


def test_broken_hest_folder_is_a_notification(  # type: ignore[no-untyped-def]
    make_napari_viewer, tmp_path: Path, hest_sample: dict
) -> None:
    root = Path(shutil.copytree(hest_sample["path"], tmp_path / "hest"))
    tx = root / "transcripts" / f"{hest_sample['sample_id']}_transcripts.parquet"
    import pandas as pd

    pd.read_parquet(tx).drop(columns=["feature_name"]).to_parquet(tx)
    viewer = make_napari_viewer()
    before = _n_records()
    assert viewer.open(str(root), plugin=PLUGIN) == []
    messages = _messages(before)
    assert any(str(tx) in m and "feature_name" in m for m in messages), messages
    assert len(viewer.open(str(hest_sample["path"]), plugin=PLUGIN)) == 3


def test_readers_decline_what_is_not_theirs(tmp_path: Path, hest_sample: dict) -> None:
    import zarr

    assert get_slide_reader(str(tmp_path / "image.png")) is None
    assert get_slide_reader(str(hest_sample["path"])) is None  # a folder
    assert get_slide_reader(str(tmp_path / "a.svs")) is not None
    assert get_folder_reader(str(tmp_path / "a.svs")) is None
    plain = tmp_path / "empty"
    plain.mkdir()
    assert get_folder_reader(str(plain)) is None
    arr = tmp_path / "image.zarr"
    zarr.create_array(arr, shape=(4, 4), dtype="uint8")
    assert get_folder_reader(str(arr)) is None  # a plain zarr: left to other plugins
    assert get_folder_reader(str(hest_sample["path"])) is not None
    assert get_folder_reader([str(hest_sample["path"]), str(plain)]) is None


def test_manifest_offers_the_readers_where_they_belong(tmp_path: Path) -> None:
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()

    def ours(path: Path) -> list[str]:
        return [
            r.command
            for r in pm.iter_compatible_readers([str(path)])
            if r.command.startswith(PLUGIN)
        ]

    assert ours(tmp_path / "picture.png") == []  # no "which plugin?" prompt for others' files
    assert ours(tmp_path / "slide.svs") == [f"{PLUGIN}.get_slide_reader"]
    assert ours(tmp_path / "slide.ome.tif") == [f"{PLUGIN}.get_slide_reader"]
    assert ours(tmp_path / "slide.NDPI") == [f"{PLUGIN}.get_slide_reader"]
    assert ours(tmp_path) == [f"{PLUGIN}.get_folder_reader"]


# ----------------------------------------------------------------------------- sample data


@pytest.mark.slow  # builds the embedded sample (~40 s) unless $SIGMMA_TEST_CACHE has it
def test_embedded_sample_menu_entry(  # type: ignore[no-untyped-def]
    make_napari_viewer, monkeypatch: pytest.MonkeyPatch, sigmma_cache: Path
) -> None:
    """File > Open Sample > SIGMMA embedded: the CMU-1 H&E with its simulated cells."""
    monkeypatch.setenv("SIGMMA_CACHE", str(sigmma_cache))
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "embedded")
    kinds = [type(layer).__name__ for layer in viewer.layers]
    assert kinds == ["Image", "Shapes", "Points"]
    image, _, points = viewer.layers
    mpp = image.metadata["he_mpp"]
    assert mpp == pytest.approx(0.499, rel=0.01)  # the CMU slide's own pixel size
    assert image.data[0].shape[:2] == (2967, 2220)
    for layer in viewer.layers:
        np.testing.assert_allclose(layer.scale, [mpp, mpp])
    assert len(points.data) > 500
    # cells lie on the slide
    assert points.data.min() >= 0
    assert (points.data.max(axis=0) <= [2967 + 2, 2220 + 2]).all()  # border cells
    assert "cell_type" in points.features


def test_synthetic_sample_menu_entry(  # type: ignore[no-untyped-def]
    make_napari_viewer, monkeypatch: pytest.MonkeyPatch, sigmma_cache: Path
) -> None:
    """File > Open Sample > SIGMMA synthetic (made smaller here to keep the test quick)."""
    from napari_sigmma.viewer import hooks

    monkeypatch.setenv("SIGMMA_CACHE", str(sigmma_cache))
    monkeypatch.setattr(hooks, "SYNTHETIC_SIZE", 1024)
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "synthetic")
    kinds = [type(layer).__name__ for layer in viewer.layers]
    assert kinds == ["Image", "Shapes", "Points"]
    image = viewer.layers[0]
    assert max(image.data[0].shape[:2]) == 1024
    assert (sigmma_cache / "synthetic_1024_seed0" / "experiment.xenium").is_file()
    assert not list(sigmma_cache.glob("*.partial"))
    assert len(viewer.layers[2].data) > 50
    # a second open reuses the cached bundle
    viewer.layers.clear()
    viewer.open_sample(PLUGIN, "synthetic")
    assert len(viewer.layers) == 3
