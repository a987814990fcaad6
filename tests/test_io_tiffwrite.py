"""The pyramidal OME-TIFF writer: exact 2x2 means at every level, bounded memory when wide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _reference_pyramid(img: np.ndarray, levels: int) -> list[np.ndarray]:
    # independent of the writer: float64 means of edge-padded 2x2 blocks, rounded half to even
    out = [img]
    for _ in range(levels - 1):
        a = out[-1].astype(np.float64)
        pad = [(0, a.shape[0] % 2), (0, a.shape[1] % 2)] + [(0, 0)] * (a.ndim - 2)
        a = np.pad(a, pad, mode="edge")
        m = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4
        out.append(np.rint(m).astype(img.dtype))
    return out


@pytest.mark.parametrize(
    ("shape", "dtype", "tile"),
    [((517, 1301, 3), np.uint8, 128), ((333, 250), np.uint16, 64), ((64, 900, 3), np.uint8, 64)],
)
def test_levels_are_exact_2x2_means(tmp_path: Path, shape, dtype, tile) -> None:  # type: ignore[no-untyped-def]
    import tifffile

    from napari_sigmma.samples.tiffwrite import pyramid_shapes, write_pyramidal_ome_tiff

    rng = np.random.default_rng(7)
    img = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    # a tile source (as for a slide) rather than the array, to exercise the streaming path
    path = write_pyramidal_ome_tiff(
        tmp_path / "p.ome.tif",
        lambda y, x, h, w: img[y : y + h, x : x + w],
        shape=shape,
        dtype=dtype,
        mpp=0.5,
        tile=tile,
        compression="zlib",
    )
    shapes = pyramid_shapes(*shape[:2], tile=tile)
    want = _reference_pyramid(img, len(shapes))
    with tifffile.TiffFile(path) as tf:
        got = [lvl.asarray() for lvl in tf.series[0].levels]
    assert [g.shape[:2] for g in got] == shapes
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(g, w, err_msg=f"level {k}")


def test_wide_strip_memory_is_one_tile_row_per_level(tmp_path: Path) -> None:
    """A 40k px wide strip: the writer's traced peak stays within ~1.5 tile rows of RGB
    (the per-level buffers sum to one), not several full-width copies of it."""
    import tracemalloc

    import tifffile

    from napari_sigmma.samples.tiffwrite import write_pyramidal_ome_tiff

    width, height, tile = 40_000, 1024, 256
    rng = np.random.default_rng(0)
    bank = rng.integers(0, 256, (4, tile, tile, 3), dtype=np.uint8)

    def source(y: int, x: int, h: int, w: int) -> np.ndarray:
        return bank[(y // tile + x // tile) % 4, :h, :w]

    row_bytes = tile * width * 3
    tracemalloc.start()
    try:
        path = write_pyramidal_ome_tiff(
            tmp_path / "wide.ome.tif",
            source,
            shape=(height, width, 3),
            mpp=0.5,
            tile=tile,
            compression="zlib",
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * row_bytes + 16e6, (peak / 1e6, row_bytes / 1e6)
    with tifffile.TiffFile(path) as tf:
        levels = tf.series[0].levels
        assert levels[0].shape == (height, width, 3)
        region = levels[1].asarray()[128:256, 12_800:13_056]
    # level 1 of a uniform tile bank: the 2x2 mean of the source there
    src = np.concatenate([source(256, x, 256, 256) for x in (25_600, 25_856)], axis=1)
    src = src.astype(np.float64)
    want = np.rint((src[0::2, 0::2] + src[1::2, 0::2] + src[0::2, 1::2] + src[1::2, 1::2]) / 4)
    np.testing.assert_array_equal(region, want.astype(np.uint8))


def _he_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    # smooth-ish colour fields with texture: JPEG-realistic, not white noise
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = np.stack([200 + 40 * np.sin(xx / 37.0), 150 + 50 * np.cos(yy / 23.0),
                     190 + 30 * np.sin((xx + yy) / 51.0)], axis=-1)  # fmt: skip
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_openslide_reads_every_level_pixel_equal_and_ome_is_kept(tmp_path: Path, compression):  # type: ignore[no-untyped-def]
    """Issue 17: OpenSlide ignores SubIFDs; the writer links the levels into the main IFD
    chain (sharing their tiles), so OpenSlide sees the pyramid with tifffile's pixels, and
    the file stays one OME image with a SubIFD pyramid."""
    import openslide
    import tifffile
    from ome_types import from_xml

    from napari_sigmma.samples.tiffwrite import pyramid_shapes, write_pyramidal_ome_tiff

    img = _he_like(1100, 1500)
    path = write_pyramidal_ome_tiff(
        tmp_path / "p.ome.tif", img, mpp=0.25, tile=256, compression=compression
    )
    plain = write_pyramidal_ome_tiff(
        tmp_path / "plain.ome.tif", img, mpp=0.25, tile=256, compression=compression,
        openslide_levels=False,
    )  # fmt: skip
    shapes = pyramid_shapes(1100, 1500, tile=256)
    assert len(shapes) == 4
    # the levels' tiles are shared, not copied: the file grows by the directories alone
    assert 0 < path.stat().st_size - plain.stat().st_size < 2048

    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome and len(tf.series) == 1
        series = tf.series[0]
        assert [lvl.shape[:2] for lvl in series.levels] == shapes
        assert len(tf.pages[0].subifds) == 3  # the OME pyramid is still in SubIFDs
        ome = from_xml(tf.ome_metadata)  # schema-valid OME-XML
        assert len(ome.images) == 1
        assert ome.images[0].pixels.tiff_data_blocks[0].plane_count == 1
        assert ome.images[0].pixels.physical_size_x == pytest.approx(0.25)
        want = [lvl.asarray() for lvl in series.levels]

    with openslide.OpenSlide(str(plain)) as s:
        assert s.level_count == 1  # why the option exists
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_count == len(shapes)
        assert [d[::-1] for d in s.level_dimensions] == shapes
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        for k, (w, h) in enumerate(s.level_dimensions):
            got = np.asarray(s.read_region((0, 0), k, (w, h)))
            assert (got[..., 3] == 255).all()
            np.testing.assert_array_equal(got[..., :3], want[k], err_msg=f"level {k}")
