"""OpenSlide as the second backend behind ``io.wsi.open_slide`` (issue 17).

The dispatch table (which backend reads which file), and every slide the project ships or
writes read through both backends, pixel for pixel: the real Aperio SVS (CMU-1 small
region), the pyramidal OME-TIFF writer's output, and the HEST-1k generic pyramidal TIFF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_sigmma.constants import OPENSLIDE_SUFFIXES, SLIDE_SUFFIXES, TIFF_SLIDE_SUFFIXES
from napari_sigmma.errors import SigmmaError
from napari_sigmma.io.wsi import open_slide, read_slide_sdata, slide_backend


@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("a.svs", "tifffile"),
        ("a.tif", "tifffile"),
        ("a.ome.tiff", "tifffile"),
        ("A.SVS", "tifffile"),
        ("a.ndpi", "openslide"),
        ("a.mrxs", "openslide"),
        ("a.scn", "openslide"),
        ("a.bif", "openslide"),
        ("a.vms", "openslide"),
        ("a.vmu", "openslide"),
        ("a.svslide", "openslide"),
        ("a.dcm", "openslide"),
        ("a.czi", "openslide"),
    ],
)
def test_dispatch_table_by_suffix(name, backend):
    assert slide_backend(name) == backend


def test_one_home_for_the_suffixes():
    import yaml

    import napari_sigmma

    assert set(SLIDE_SUFFIXES) == set(TIFF_SLIDE_SUFFIXES) | set(OPENSLIDE_SUFFIXES)
    with pytest.raises(SigmmaError, match="not a slide file"):
        slide_backend("a.png")
    # the napari reader offers exactly these suffixes
    manifest = Path(napari_sigmma.__file__).with_name("napari.yaml")
    readers = yaml.safe_load(manifest.read_text())["contributions"]["readers"]
    patterns = next(r for r in readers if r["command"].endswith("get_slide_reader"))
    assert {p.lstrip("*") for p in patterns["filename_patterns"]} == {*SLIDE_SUFFIXES, ".ome.tif"}
    from napari_sigmma.viewer.hooks import get_slide_reader

    for suffix in OPENSLIDE_SUFFIXES:
        assert get_slide_reader(f"/nowhere/slide{suffix}") is not None


def _same_slides(path: Path, *, full_levels: int | None = None) -> tuple:
    a = open_slide(path, backend="tifffile")
    b = open_slide(path, backend="openslide")
    try:
        stored = a.level_count - a.computed_levels
        assert b.level_count - b.computed_levels == stored >= 1
        assert [a.level_shape(k) for k in range(a.level_count)] == [
            b.level_shape(k) for k in range(b.level_count)
        ]
        assert b.mpp == pytest.approx(a.mpp, rel=1e-6) and b.mpp_source == "openslide"
        for k in range(stored if full_levels is None else full_levels):
            h, w = a.level_shape(k)
            np.testing.assert_array_equal(
                a.read_region(0, 0, w, h, level=k), b.read_region(0, 0, w, h, level=k),
                err_msg=f"level {k}",
            )  # fmt: skip
            # the dask levels (chunked reads) agree with the direct reads
            ys, xs = slice(h // 3, h // 3 + 300), slice(w // 4, w // 4 + 200)
            np.testing.assert_array_equal(
                np.asarray(b.levels[k][ys, xs]), np.asarray(a.levels[k][ys, xs])
            )
        # outside the slide: white, as the tifffile backend pads
        edge = b.read_region(-10, -10, 30, 30, level=0)
        assert (edge[:10] == 255).all() and (edge[:, :10] == 255).all()
        return a.vendor, b.vendor, stored
    finally:
        a.close()
        b.close()


def test_cmu_svs_pixel_equal_through_both_backends(cmu_svs):
    assert slide_backend(cmu_svs) == "tifffile"
    assert _same_slides(cmu_svs) == ("aperio", "aperio", 1)  # one stored level


def test_written_ome_tiff_pixel_equal_through_both_backends(tmp_path):
    from napari_sigmma.samples.tiffwrite import write_pyramidal_ome_tiff

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:900, :1300]
    img = np.stack([180 + 60 * np.sin(xx / 29.0), 140 + 60 * np.cos(yy / 17.0),
                    200 + 40 * np.sin((xx - yy) / 41.0)], axis=-1)  # fmt: skip
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    path = write_pyramidal_ome_tiff(tmp_path / "w.ome.tif", img, mpp=0.5, tile=256)
    assert slide_backend(path) == "tifffile"
    from napari_sigmma.samples.tiffwrite import pyramid_shapes

    levels = len(pyramid_shapes(900, 1300, tile=256))
    assert _same_slides(path) == ("ome", "generic-tiff", levels)  # the whole stored pyramid


def test_hest_generic_tiff_pixel_equal_through_both_backends(hest_sample):
    wsi = next((Path(hest_sample["path"]) / "wsis").iterdir())
    # a small slide (640 x 800): no stored pyramid beyond one level is required of it, but
    # what is stored must be the same through both backends
    # HEST keeps the pixel size in metadata/<id>.json, not in the TIFF
    a = open_slide(wsi, backend="tifffile", mpp=hest_sample["mpp"])
    b = open_slide(wsi, backend="openslide", mpp=hest_sample["mpp"])
    try:
        assert a.level_count == b.level_count
        for k in range(a.level_count - a.computed_levels):
            h, w = a.level_shape(k)
            np.testing.assert_array_equal(
                a.read_region(0, 0, w, h, level=k), b.read_region(0, 0, w, h, level=k)
            )
    finally:
        a.close()
        b.close()


def test_openslide_backend_errors_and_sdata(tmp_path, cmu_svs):
    bad = tmp_path / "broken.mrxs"
    bad.write_bytes(b"not a slide at all" * 10)
    with pytest.raises(SigmmaError, match="OpenSlide") as err:
        open_slide(bad)
    assert "broken.mrxs" in str(err.value)
    with pytest.raises(SigmmaError, match="not found"):
        open_slide(tmp_path / "missing.ndpi")
    with pytest.raises(SigmmaError, match="unknown slide backend"):
        open_slide(cmu_svs, backend="pillow")
    s = open_slide(cmu_svs, backend="openslide", mpp=0.25)
    assert s.mpp == 0.25 and s.mpp_source == "argument"
    # a SpatialData image element from the OpenSlide backend, as from tifffile
    from spatialdata.transformations import Identity

    from napari_sigmma.io.wsi import slide_image_element

    tree = slide_image_element(s, Identity())
    ref = read_slide_sdata(cmu_svs).images["he_image"]
    assert list(tree) == list(ref)
    for k in tree:
        assert tree[k]["image"].shape == ref[k]["image"].shape
    np.testing.assert_array_equal(tree["scale2"]["image"].values, ref["scale2"]["image"].values)
    s.close()
