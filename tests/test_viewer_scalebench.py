"""A big-slide walk in a real, shown viewer, small: an 8k px pyramidal OME-TIFF opened through
the plugin's reader, 30 camera moves; the layer stays lazy and multiscale, zoomed-in views
show level 0 and overviews a coarse level, the pixels handed to the canvas are the file's
pixels of the level shown, and RSS stays bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_sigmma.bench.scale import camera_walk
from napari_sigmma.bench.scale_qt import (
    PLUGIN,
    DrawWatch,
    rss_mb,
    shown_region,
    wait_until_drawn,
    walk_viewer,
)
from napari_sigmma.io.wsi import open_slide
from napari_sigmma.samples.tiffwrite import write_pyramidal_ome_tiff
from napari_sigmma.viewer.hooks import DASK_CACHE_MAX_BYTES

SIDE = 8192
MPP = 0.5


_BASE = np.random.default_rng(1).integers(0, 200, size=(1024, 1024, 3), dtype=np.uint8)


def _source(y: int, x: int, h: int, w: int) -> np.ndarray:
    """Pixels that differ from place to place and from level to level: a random texture
    shifted per tile (its 2x2 means, the next level, are not it) plus slow gradients."""
    oy, ox = (y * 7 + x * 3) % 512, (x * 5 + y) % 512
    out = _BASE[oy : oy + h, ox : ox + w].copy()
    out[..., 0] += (np.arange(y, y + h) * 55 // SIDE).astype(np.uint8)[:, None]
    out[..., 2] += (np.arange(x, x + w) * 55 // SIDE).astype(np.uint8)[None, :]
    return out


@pytest.fixture(scope="module")
def slide_8k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scale") / "slide8k.ome.tif"
    write_pyramidal_ome_tiff(
        path, _source, mpp=MPP, tile=512, compression="jpeg", shape=(SIDE, SIDE, 3)
    )
    return path


def _check_pixels(layer, slide) -> int:  # type: ignore[no-untyped-def]
    level, (y0, x0), pixels = shown_region(layer)
    h, w = pixels.shape[:2]
    assert pixels.shape[2] == 3 and pixels.dtype == np.uint8
    expected = slide.read_region(x0, y0, w, h, level=level)
    np.testing.assert_array_equal(pixels, expected, err_msg=f"level {level} at {(y0, x0)}")
    return level


def test_walk_a_slide_in_the_viewer(make_napari_viewer, slide_8k: Path) -> None:  # type: ignore[no-untyped-def]
    import dask.array as da
    from napari.utils._dask_utils import _DASK_CACHE

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1000, 700)
    (layer,) = viewer.open(str(slide_8k), plugin=PLUGIN)
    assert layer.multiscale and layer.rgb
    assert len(layer.data) == 5 and all(isinstance(a, da.Array) for a in layer.data)
    assert layer.data[0].shape == (SIDE, SIDE, 3)
    # the reader bounded napari's opportunistic dask cache (default: 25 % of the RAM)
    assert 0 < _DASK_CACHE.cache.available_bytes <= DASK_CACHE_MAX_BYTES

    watch = DrawWatch(viewer, layer)
    watch.canvas.update()
    assert wait_until_drawn(watch, 0)
    watch.close()
    rss_open = rss_mb()
    slide = open_slide(slide_8k)
    width, height = (int(v) for v in viewer.canvas.size[::-1])

    # a zoomed-in view far from the middle shows level 0, the whole slide fitted to the
    # canvas a coarse level; each time the pixels are the file's at that level
    cy, cx = 0.9 * SIDE, 0.1 * SIDE
    fit = 0.9 * min(width, height) / (SIDE * MPP)
    fixed = [
        {"center": (cy * MPP, cx * MPP), "zoom": 1.0 / MPP},
        {"center": (SIDE * MPP / 2, SIDE * MPP / 2), "zoom": fit},
    ]
    shown: list[tuple] = []
    walk = walk_viewer(
        viewer, layer, fixed, on_event=lambda i, rec: shown.append(shown_region(layer))
    )
    assert walk["timeouts"] == 0 and walk["levels"][0] == 0 and walk["levels"][1] >= 3
    for level, (y0, x0), pixels in shown:
        expected = slide.read_region(x0, y0, pixels.shape[1], pixels.shape[0], level=level)
        np.testing.assert_array_equal(pixels, expected)
    # the level-0 block covers the camera centre; the overview block the whole level
    (_, (y0, x0), zoomed), (level, _, overview) = shown
    assert y0 <= cy < y0 + zoomed.shape[0] and x0 <= cx < x0 + zoomed.shape[1]
    assert overview.shape[:2] == slide.level_shape(level)

    # and on screen: at 1 screen px per level-0 px, the middle of the canvas is exactly the
    # file's level-0 pixels around the camera centre (up to a pixel of alignment)
    rows, cols = height // 2 * 2, width // 2 * 2
    cy, cx = 0.3 * SIDE + 0.5, 0.6 * SIDE + 0.5  # canvas pixel centres on data pixel centres
    walk_viewer(viewer, layer, [{"center": (cy * MPP, cx * MPP), "zoom": 1.0 / MPP}])
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3]
    assert shot.shape[:2] in ((height, width), (rows, cols)), shot.shape
    mid = shot[shot.shape[0] // 2 - 100 : shot.shape[0] // 2 + 100,
               shot.shape[1] // 2 - 100 : shot.shape[1] // 2 + 100]  # fmt: skip
    diffs = {}
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            ref = slide.read_region(int(cx) - 100 + dx, int(cy) - 100 + dy, 200, 200, level=0)
            diffs[dy, dx] = np.abs(ref.astype(int) - mid.astype(int)).max()
    best = min(diffs, key=diffs.get)
    assert diffs[best] == 0, (best, diffs)
    assert sorted(diffs.values())[1] > 50  # the texture is not flat: one shift matches
    assert max(abs(v) for v in best) <= 1, best

    # a seeded random walk; after every move the pixels shown are the file's
    seen: list[int] = []
    events = camera_walk((SIDE, SIDE), MPP, (width, height), 30, seed=3)
    walk = walk_viewer(
        viewer, layer, events, on_event=lambda i, rec: seen.append(_check_pixels(layer, slide))
    )
    assert walk["timeouts"] == 0 and len(walk["ms"]) == 30
    assert seen == walk["levels"]
    assert 0 in seen and max(seen) >= 3
    # memory: the walk holds a few views and the (bounded) cache, not the slide
    # (level 0 alone is 192 MB raw)
    assert max(walk["rss_mb"]) - rss_open < 600
    slide.close()
