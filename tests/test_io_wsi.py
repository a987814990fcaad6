"""Whole-slide reading: the real Aperio SVS, and TIFF variants written here with tifffile."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_sigmma.errors import SigmmaError
from napari_sigmma.io.wsi import open_slide, read_slide_sdata, tissue_mask

CMU_SHAPE = (2967, 2220)  # level 0 of CMU-1-Small-Region (OpenSlide's test slide)
CMU_MPP = 0.499


def he_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A white slide with an elliptical pink 'tissue' sprinkled with purple 'nuclei'."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 244, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    tissue = ((yy - height / 2) / (height * 0.35)) ** 2 + (
        (xx - width / 2) / (width * 0.3)
    ) ** 2 < 1
    img[tissue] = (225, 150, 190)
    for _ in range(height * width // 4000):
        y, x = rng.integers(0, height), rng.integers(0, width)
        if tissue[y, x]:
            img[max(0, y - 3) : y + 3, max(0, x - 3) : x + 3] = (110, 50, 140)
    return img


def reduce2(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    return a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return he_like(1000, 1400)


def write_subifd_pyramid(path: Path, img: np.ndarray, *, mpp: float | None) -> list[np.ndarray]:
    levels = [img, img[::2, ::2].copy(), img[::4, ::4].copy()]
    res = (
        {}
        if mpp is None
        else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    )
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            levels[0], tile=(256, 256), subifds=2, photometric="rgb", compression="zlib", **res
        )
        for lvl in levels[1:]:
            tw.write(lvl, tile=(256, 256), subfiletype=1, photometric="rgb", compression="zlib")
    return levels


def write_page_pyramid(path: Path, img: np.ndarray) -> list[np.ndarray]:
    """Reduced levels as plain pages (NewSubfileType 1), as pyvips writes; no resolution."""
    levels = [img, img[::2, ::2].copy(), img[::4, ::4].copy()]
    with tifffile.TiffWriter(path) as tw:
        for k, lvl in enumerate(levels):
            tw.write(lvl, tile=(256, 256), photometric="rgb", subfiletype=1 if k else 0)
    return levels


# ----------------------------------------------------------------------------- real SVS


def test_cmu_svs_levels_mpp_and_skipped_series(cmu_svs: Path) -> None:
    slide = open_slide(cmu_svs)
    assert slide.vendor == "aperio"
    assert slide.mpp == pytest.approx(CMU_MPP)
    assert slide.mpp_source == "aperio"
    assert slide.shape == CMU_SHAPE
    # the 574x768 page, label and macro are not pyramid levels; the pyramid is computed
    for level in slide.levels:
        assert level.shape[0] not in (768, 463, 431)
    assert slide.computed_levels == len(slide.levels) - 1 >= 2
    assert [lvl.shape[:2] for lvl in slide.levels[:3]] == [(2967, 2220), (1483, 1110), (741, 555)]
    assert slide.downsamples[0] == 1.0
    assert slide.downsamples[1] == pytest.approx(2.0, abs=0.01)
    assert all(lvl.dtype == np.uint8 and lvl.shape[2] == 3 for lvl in slide.levels)


def test_cmu_svs_read_region_matches_tifffile_and_pads_white(cmu_svs: Path) -> None:
    slide = open_slide(cmu_svs)
    truth = tifffile.imread(cmu_svs, series=0)
    region = slide.read_region(1000, 1200, 300, 200)
    assert region.shape == (200, 300, 3)
    np.testing.assert_array_equal(region, truth[1200:1400, 1000:1300])
    edge = slide.read_region(2100, -50, 200, 100)  # over the right and top edges
    np.testing.assert_array_equal(edge[50:, :120], truth[:50, 2100:2220])
    assert (edge[:50] == 255).all() and (edge[:, 120:] == 255).all()
    outside = slide.read_region(5000, 5000, 10, 10)
    assert (outside == 255).all()
    # a computed level equals the 2x2 mean of level 0
    lvl1 = slide.read_region(100, 100, 64, 64, level=1)
    expect = reduce2(truth[200:328, 200:328])
    assert np.abs(lvl1.astype(float) - expect).max() <= 1.0


def test_cmu_best_level(cmu_svs: Path) -> None:
    slide = open_slide(cmu_svs)
    assert slide.best_level(0.25) == 0  # finer than the scan: level 0
    assert slide.best_level(0.5) == 0
    assert slide.best_level(1.0) == 1  # 0.499 * 2.0003 counts as 1.0 µm/px
    assert slide.best_level(2.5) == 2
    assert slide.level_mpp(1) == pytest.approx(0.998, abs=1e-3)
    with pytest.raises(SigmmaError):
        slide.best_level(0)


def test_cmu_tissue_mask(cmu_svs: Path) -> None:
    slide = open_slide(cmu_svs)
    mask, ds = tissue_mask(slide)
    assert mask.dtype == bool
    assert ds == pytest.approx(slide.downsamples[slide.thumbnail_level()])
    assert mask.shape == slide.levels[slide.thumbnail_level()].shape[:2]
    # the tissue strip covers roughly a third of this crop; the top-left is glass (with a
    # speck of dust that the clean-up removes), the bottom middle is tissue
    h, w = mask.shape
    assert 0.2 < mask.mean() < 0.5
    assert not mask[: h // 5, : w * 3 // 10].any()
    assert mask[h * 8 // 10 :, w * 4 // 10 : w * 6 // 10].mean() > 0.9
    # tissue pixels are darker / more coloured than the rest
    thumb = np.asarray(slide.levels[slide.thumbnail_level()])
    assert thumb[mask].mean() < thumb[~mask].mean() - 40


def test_cmu_mpp_override(cmu_svs: Path) -> None:
    slide = open_slide(cmu_svs, mpp=0.25)
    assert slide.mpp == 0.25 and slide.mpp_source == "argument"


def test_read_slide_sdata_multiscale_in_um(cmu_svs: Path) -> None:
    from spatialdata.transformations import get_transformation

    sdata = read_slide_sdata(cmu_svs)
    tree = sdata.images["he_image"]
    assert list(tree.keys())[:2] == ["scale0", "scale1"]
    arr = tree["scale0"]["image"]
    assert arr.dims == ("c", "y", "x") and arr.shape == (3, *CMU_SHAPE)
    assert list(arr.coords["c"].values) == ["r", "g", "b"]
    m = get_transformation(tree, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(m, np.diag([CMU_MPP, CMU_MPP, 1.0]))
    assert sdata.attrs["sigmma"]["he_mpp"] == pytest.approx(CMU_MPP)
    # lazy: dask, and the values are the slide's
    truth = tifffile.imread(cmu_svs, series=0)
    np.testing.assert_array_equal(
        np.moveaxis(arr.data[:, 10:20, 30:40].compute(), 0, -1), truth[10:20, 30:40]
    )


# ----------------------------------------------------------------------------- generated TIFFs


def test_pyramidal_tiff_with_resolution(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "pyr.tif"
    levels = write_subifd_pyramid(path, image, mpp=0.25)
    slide = open_slide(path)
    assert slide.vendor == "tiff" and slide.mpp_source == "tiff"
    assert slide.mpp == pytest.approx(0.25)
    assert slide.computed_levels == 0
    assert [lv.shape[:2] for lv in slide.levels] == [lv.shape[:2] for lv in levels]
    assert slide.downsamples == pytest.approx([1.0, 2.0, 4.0])
    for k, lvl in enumerate(levels):
        np.testing.assert_array_equal(
            slide.read_region(37, 51, 300, 120, level=k), lvl[51:171, 37:337]
        )
        np.testing.assert_array_equal(np.asarray(slide.levels[k]), lvl)
    assert slide.best_level(1.0) == 2 and slide.best_level(0.6) == 1


def test_short_pyramid_is_continued(tmp_path: Path) -> None:
    img = he_like(1800, 1300, seed=2)
    path = tmp_path / "short.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), subifds=1, photometric="rgb", compression="zlib")
        tw.write(img[::2, ::2].copy(), tile=(256, 256), subfiletype=1, photometric="rgb")
    slide = open_slide(path, mpp=0.5)
    assert [lv.shape[:2] for lv in slide.levels] == [(1800, 1300), (900, 650), (450, 325)]
    assert slide.computed_levels == 1
    expect = reduce2(img[::2, ::2])
    assert np.abs(np.asarray(slide.levels[2]).astype(float) - expect).max() <= 0.5 + 1e-9


def test_page_pyramid_needs_mpp(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "pages.tiff"
    write_page_pyramid(path, image)
    with pytest.raises(SigmmaError, match="mpp") as err:
        open_slide(path)
    assert str(path) in str(err.value)
    slide = open_slide(path, mpp=0.2738)
    assert len(slide.levels) == 3 and slide.mpp == 0.2738
    np.testing.assert_array_equal(
        slide.read_region(0, 0, 50, 50, level=1), image[::2, ::2][:50, :50]
    )


def test_ome_tiff_physical_size_with_unit(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "slide.ome.tif"
    meta = {
        "axes": "YXS",
        "PhysicalSizeX": 263.0,
        "PhysicalSizeXUnit": "nm",
        "PhysicalSizeY": 263.0,
        "PhysicalSizeYUnit": "nm",
    }
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(image, tile=(256, 256), subifds=1, photometric="rgb", metadata=meta)
        tw.write(image[::2, ::2].copy(), tile=(256, 256), subfiletype=1, photometric="rgb")
    slide = open_slide(path)
    assert slide.vendor == "ome" and slide.mpp_source == "ome"
    assert slide.mpp == pytest.approx(0.263)
    assert len(slide.levels) - slide.computed_levels == 2  # stored; then 350 px computed
    assert slide.levels[-1].shape[:2] == (250, 350)
    np.testing.assert_array_equal(slide.read_region(500, 400, 64, 64), image[400:464, 500:564])


def test_ome_tiff_planar_channels(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "planar.ome.tif"
    tifffile.imwrite(
        path,
        np.moveaxis(image, -1, 0),
        photometric="rgb",
        planarconfig="separate",
        tile=(256, 256),
        metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
    )
    slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.5)  # no unit: µm
    assert slide.levels[0].shape == (*image.shape[:2], 3)
    np.testing.assert_array_equal(slide.read_region(10, 20, 30, 40), image[20:60, 10:40])


def test_project_ome_writer_output(tmp_path: Path, image: np.ndarray) -> None:
    from napari_sigmma.samples.tiffwrite import write_pyramidal_ome_tiff

    path = write_pyramidal_ome_tiff(
        tmp_path / "w.ome.tif", image, mpp=0.3, tile=256, compression="zlib"
    )
    slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.3)
    assert len(slide.levels) >= 3 and slide.computed_levels == 0
    np.testing.assert_array_equal(np.asarray(slide.levels[0]), image)


def test_single_level_tiff_gets_lazy_pyramid(tmp_path: Path) -> None:
    img = he_like(1500, 1100, seed=3)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(
        path,
        img,
        photometric="rgb",
        rowsperstrip=64,
        resolution=(25400 / 0.5, 25400 / 0.5),
        resolutionunit="INCH",
    )
    slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.5)
    assert slide.computed_levels == len(slide.levels) - 1 == 2  # 1500 -> 750 -> 375
    assert [lv.shape[:2] for lv in slide.levels] == [(1500, 1100), (750, 550), (375, 275)]
    lvl1 = np.asarray(slide.levels[1])
    assert np.abs(lvl1.astype(float) - reduce2(img)).max() <= 0.5 + 1e-9
    lvl2 = np.asarray(slide.levels[2])
    assert np.abs(lvl2.astype(float) - reduce2(reduce2(img))).max() <= 1.0
    mask, ds = tissue_mask(slide)
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]] * ds
    truth = ((yy - 750) / (1500 * 0.35)) ** 2 + ((xx - 550) / (1100 * 0.3)) ** 2 < 1
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95


def test_huge_single_strip_is_memory_mapped(tmp_path: Path) -> None:
    """An uncompressed image stored as one strip is mapped, not decoded whole per read."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 255, (4700, 4800, 3), dtype=np.uint8)  # 68 MB in one strip
    path = tmp_path / "onestrip.tif"
    tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=img.shape[0])
    slide = open_slide(path, mpp=0.5)
    assert isinstance(slide._sources[0][0], np.memmap)
    assert max(slide.levels[0].chunks[0]) <= 1024
    np.testing.assert_array_equal(
        slide.read_region(4750, 10, 100, 20),
        np.pad(img[10:30, 4750:4800], ((0, 0), (0, 50), (0, 0)), constant_values=255),
    )
    assert slide.levels[-1].shape[0] <= 512


def test_screen_dpi_is_not_a_pixel_size(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "photo.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(SigmmaError, match="pass it explicitly"):
        open_slide(path)


def test_blank_slide_has_empty_tissue_mask(tmp_path: Path) -> None:
    path = tmp_path / "blank.tif"
    tifffile.imwrite(path, np.full((600, 800, 3), 245, np.uint8), photometric="rgb")
    mask, _ = tissue_mask(open_slide(path, mpp=1.0))
    assert not mask.any()


def test_region_reads_only_the_tiles_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening reads no pixel data; a small region decodes a few tiles, not the level."""
    import tifffile.tifffile as tt

    img = he_like(2048, 2048, seed=1)
    path = tmp_path / "big.tif"
    write_subifd_pyramid(path, img, mpp=0.5)
    reads: list[int] = []
    original = tt.FileCache.read

    def counting_read(self, filehandle, offset, bytecount, whence=0):  # type: ignore[no-untyped-def]
        reads.append(bytecount)
        return original(self, filehandle, offset, bytecount, whence)

    monkeypatch.setattr(tt.FileCache, "read", counting_read)
    slide = open_slide(path)
    assert reads == []
    region = slide.read_region(300, 300, 100, 100)  # inside one 256-px tile row/col pair
    np.testing.assert_array_equal(region, img[300:400, 300:400])
    assert 1 <= len(reads) <= 4
    assert sum(reads) < path.stat().st_size / 10


# ----------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SigmmaError, match="not found") as err:
        open_slide(tmp_path / "nope.svs")
    assert "nope.svs" in str(err.value)


def test_wrong_extension(tmp_path: Path) -> None:
    path = tmp_path / "slide.png"
    path.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(SigmmaError, match="not a slide file") as err:
        open_slide(path)
    assert str(path) in str(err.value)


def test_not_a_tiff(tmp_path: Path) -> None:
    path = tmp_path / "fake.svs"
    path.write_text("this is not a TIFF")
    with pytest.raises(SigmmaError, match="not a readable TIFF") as err:
        open_slide(path)
    assert str(path) in str(err.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    with pytest.raises(SigmmaError, match="empty"):
        open_slide(path)


def test_truncated_tiff(tmp_path: Path, image: np.ndarray) -> None:
    full = tmp_path / "full.tif"
    write_subifd_pyramid(full, image, mpp=0.5)
    cut = tmp_path / "cut.tif"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(SigmmaError, match="truncated") as err:
        open_slide(cut)
    assert str(cut) in str(err.value)


def test_truncated_svs(tmp_path: Path, cmu_svs: Path) -> None:
    cut = tmp_path / "cut.svs"
    with open(cmu_svs, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(cmu_svs.stat().st_size // 2))
    with pytest.raises(SigmmaError, match="truncated") as err:
        open_slide(cut)
    assert str(cut) in str(err.value)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), "abc"])
def test_bad_mpp(tmp_path: Path, cmu_svs: Path, bad: object) -> None:
    with pytest.raises(SigmmaError, match="mpp") as err:
        open_slide(cmu_svs, mpp=bad)  # type: ignore[arg-type]
    assert str(cmu_svs) in str(err.value)


def test_zero_size_slide(tmp_path: Path) -> None:
    path = tmp_path / "zero.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(path, np.zeros((0, 0), np.uint8))
    with pytest.raises(SigmmaError, match="no pixels") as err:
        open_slide(path, mpp=0.5)
    assert str(path) in str(err.value)


def test_folder_is_not_a_slide(tmp_path: Path) -> None:
    folder = tmp_path / "x.tif"
    folder.mkdir()
    with pytest.raises(SigmmaError, match="folder"):
        open_slide(folder)


def test_multichannel_fluorescence_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "if.ome.tif"
    tifffile.imwrite(path, np.zeros((5, 64, 64), np.uint16), metadata={"axes": "CYX"})
    with pytest.raises(SigmmaError, match="RGB"):
        open_slide(path, mpp=0.5)


def test_copied_slide_keeps_working(tmp_path: Path, cmu_svs: Path) -> None:
    """A slide opened from a copy reads the same pixels (no hidden state tied to a path)."""
    copy = tmp_path / "copy.svs"
    shutil.copy(cmu_svs, copy)
    a = open_slide(copy).read_region(0, 0, 64, 64)
    b = open_slide(cmu_svs).read_region(0, 0, 64, 64)
    np.testing.assert_array_equal(a, b)
