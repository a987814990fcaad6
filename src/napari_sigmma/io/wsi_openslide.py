"""The OpenSlide backend of :func:`napari_sigmma.io.wsi.open_slide`.

OpenSlide (the ``openslide-python`` binding over the ``openslide-bin`` library wheel) reads
the vendor formats tifffile does not read, or not well: MIRAX, Hamamatsu NDPI / VMS / VMU,
Leica SCN, Ventana BIF, Philips TIFF, Sakura, DICOM WSI, Zeiss CZI. Each stored level
becomes a lazy dask array whose chunks are ``read_region`` calls; the pixel size comes
from OpenSlide's ``openslide.mpp-x`` / ``openslide.mpp-y`` properties (each vendor's own
metadata, read by OpenSlide). The result is the same :class:`~napari_sigmma.io.wsi.Slide`
as the tifffile backend's, so nothing downstream knows which backend read it.

OpenSlide returns premultiplied RGBA; regions the scanner never imaged (MIRAX, DICOM
sparse tiles) are transparent and come back white here, as outside the slide.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from napari_sigmma.errors import SigmmaError

__all__ = ["OpenSlideLevel", "open_openslide"]

#: dask chunk edge of an OpenSlide level (one ``read_region`` per chunk).
CHUNK = 1024


class OpenSlideLevel:
    """One level of an OpenSlide slide as an array-like ``(H, W, 3)`` uint8 (for dask).

    Indexing with slices (step 1) reads that region with ``read_region``; the alpha of
    OpenSlide's premultiplied RGBA is composited over white.
    """

    def __init__(self, handle: Any, level: int) -> None:
        self.handle = handle
        self.level = int(level)
        w, h = handle.level_dimensions[self.level]
        self.shape = (int(h), int(w), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.downsample = float(handle.level_downsamples[self.level])

    def __getitem__(self, index: Any) -> np.ndarray:
        if not isinstance(index, tuple):
            index = (index,)
        index = index + (slice(None),) * (3 - len(index))
        ys, xs, cs = index
        y0, y1 = _bounds(ys, self.shape[0])
        x0, x1 = _bounds(xs, self.shape[1])
        out = np.full((max(y1 - y0, 0), max(x1 - x0, 0), 3), 255, np.uint8)
        if out.size:
            # read_region takes the top-left corner in level-0 pixels
            loc = (round(x0 * self.downsample), round(y0 * self.downsample))
            rgba = np.asarray(self.handle.read_region(loc, self.level, (x1 - x0, y1 - y0)))
            alpha = rgba[..., 3:4].astype(np.uint16)
            out = np.minimum(rgba[..., :3].astype(np.uint16) + (255 - alpha), 255).astype(np.uint8)
        return out[:, :, cs]


def _bounds(s: Any, n: int) -> tuple[int, int]:
    if isinstance(s, slice):
        start, stop, step = s.indices(n)
        if step != 1:
            raise IndexError("OpenSlide levels are read with step-1 slices only")
        return start, max(start, stop)
    k = int(s)
    k = k + n if k < 0 else k
    return k, k + 1


def open_openslide(path: Path, mpp: float | None) -> tuple[Any, ...]:
    """Open ``path`` with OpenSlide, lazily: ``(levels, sources, mpp, vendor, mpp_source,
    handle)``, the stored levels as dask arrays and their direct-read sources, from which
    :func:`napari_sigmma.io.wsi.open_slide` makes the :class:`~napari_sigmma.io.wsi.Slide`
    (this module does not import that one: ``open_slide`` dispatches here).

    Raises
    ------
    SigmmaError
        OpenSlide cannot read the file, or it has no µm/px and none was given.
    """
    import dask.array as da
    import openslide

    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as err:
        raise SigmmaError("not a slide format OpenSlide can read", path=path) from err
    except openslide.OpenSlideError as err:
        raise SigmmaError(f"OpenSlide could not read the slide ({err})", path=path) from err
    try:
        props = handle.properties
        vendor = str(props.get(openslide.PROPERTY_NAME_VENDOR) or "openslide")
        source = "argument"
        if mpp is None:
            mpp = _mpp_from_properties(props)
            source = "openslide"
            if mpp is None:
                raise SigmmaError(
                    f"no pixel size (µm/px) in the slide's metadata (OpenSlide, vendor "
                    f"{vendor!r}, reports no openslide.mpp-x); pass it explicitly, e.g. "
                    "open_slide(path, mpp=0.5)",
                    path=path,
                )
        w0, h0 = handle.dimensions
        if w0 <= 0 or h0 <= 0:
            raise SigmmaError(f"the slide image has no pixels ({w0} x {h0})", path=path)
        levels: list[Any] = []
        sources: list[tuple[Any, str] | None] = []
        for k in range(handle.level_count):
            arr = OpenSlideLevel(handle, k)
            chunks = (min(CHUNK, arr.shape[0]), min(CHUNK, arr.shape[1]), 3)
            levels.append(da.from_array(arr, chunks=chunks, asarray=False, fancy=False))
            sources.append((arr, "YXS"))
        return levels, sources, float(mpp), vendor, source, handle
    except BaseException:
        handle.close()
        raise


def _mpp_from_properties(props: Any) -> float | None:
    """``openslide.mpp-x`` / ``-y`` (their mean when both), when plausible."""
    import openslide

    values = []
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            v = float(props.get(key, "nan"))
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and 0.01 <= v <= 100.0:
            values.append(v)
    return float(np.mean(values)) if values else None
