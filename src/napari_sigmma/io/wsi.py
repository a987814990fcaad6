"""Whole-slide images (SVS, pyramidal TIFF, OME-TIFF, NDPI) as lazy pyramids.

Everything goes through tifffile's zarr store, so opening a slide reads only the TIFF
directories: pixels are decoded tile by tile when a region (or a dask chunk) is asked for.
A slide stored without a pyramid (or with one that stops above 512 px) gets the missing
levels computed lazily (2x2 means with dask).

The pixel size (µm/px of level 0) comes from, in order: the ``mpp`` argument, the Aperio
``MPP`` field of the ImageDescription, the OME ``PhysicalSizeX`` (with its unit), the TIFF
``XResolution`` / ``ResolutionUnit`` tags (only when they give a plausible microscope
pixel size; a "72 dpi" default is not one).
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# slide suffixes: ``.ome.tif`` / ``.ome.tiff`` end in ``.tif`` / ``.tiff``
from napari_sigmma.constants import OPENSLIDE_SUFFIXES, SLIDE_SUFFIXES, TIFF_SLIDE_SUFFIXES
from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    import dask.array
    from spatialdata import SpatialData

__all__ = [
    "Slide",
    "is_slide_file",
    "open_slide",
    "read_slide_sdata",
    "slide_backend",
    "tissue_mask",
]

#: tifffile series that are not the slide itself.
_SKIP_SERIES = ("label", "macro", "thumbnail", "overview")
#: A computed pyramid stops at the first level whose longer side is at most this.
_PYRAMID_MIN_SIDE = 512
#: Chunk edge of computed pyramid levels (even, so 2x2 blocks never straddle chunks).
_PYRAMID_CHUNK = 1024
#: A single TIFF chunk larger than this is memory-mapped instead (uncompressed files).
_MAX_CHUNK_BYTES = 64 * 2**20
#: µm per unit for the OME ``PhysicalSizeXUnit`` values a slide may use.
_OME_UNITS = {
    "m": 1e6,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,  # micro sign
    "μm": 1.0,  # greek mu
    "um": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "Å": 1e-4,
}
#: µm per TIFF ResolutionUnit (2 inch, 3 centimeter, 4 millimeter, 5 micrometer).
_TIFF_UNITS = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}
#: Plausible range of a microscope pixel size, µm.
_MPP_RANGE = (0.01, 100.0)
#: With inch units, anything coarser than this is a screen/print default, not a scan.
_MPP_MAX_FROM_INCH = 25.0


#: OpenSlide vendors of TIFF-based files (``.tif`` / ``.tiff``) that go to OpenSlide: their
#: pyramids or pixel sizes live in vendor metadata tifffile does not interpret.
OPENSLIDE_TIFF_VENDORS = frozenset({"philips", "ventana", "trestle", "leica", "huron", "argos"})
#: The backends :func:`open_slide` can use.
BACKENDS = ("tifffile", "openslide")


def slide_backend(path: str | os.PathLike[str]) -> str:
    """Which backend :func:`open_slide` uses for ``path``: ``"tifffile"`` or ``"openslide"``.

    By suffix (:data:`~napari_sigmma.constants.OPENSLIDE_SUFFIXES` → OpenSlide,
    :data:`~napari_sigmma.constants.TIFF_SLIDE_SUFFIXES` → tifffile), except that an existing
    ``.tif`` / ``.tiff`` which OpenSlide identifies as one of
    :data:`OPENSLIDE_TIFF_VENDORS` (Philips TIFF, Ventana, …) goes to OpenSlide. Aperio SVS,
    OME-TIFF and generic pyramidal TIFF stay with tifffile (read as zarr, chunk-aligned).

    Raises
    ------
    SigmmaError
        Not a slide file name.
    """
    name = str(path).lower()
    if name.endswith(OPENSLIDE_SUFFIXES):
        return "openslide"
    if not name.endswith(TIFF_SLIDE_SUFFIXES):
        raise SigmmaError(
            f"not a slide file: expected one of {', '.join(SLIDE_SUFFIXES)} (or .ome.tif)",
            path=path,
        )
    if name.endswith((".tif", ".tiff")) and os.path.isfile(path):
        try:
            import openslide

            vendor = openslide.OpenSlide.detect_format(os.fspath(path))
        except Exception:  # not readable by OpenSlide, or no OpenSlide: tifffile decides
            vendor = None
        if vendor in OPENSLIDE_TIFF_VENDORS:
            return "openslide"
    return "tifffile"


def is_slide_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has a slide file name ending (the file is not opened)."""
    return str(path).lower().endswith(SLIDE_SUFFIXES)


def coarsest_level(level_shapes: list[tuple[int, int]], min_side: int) -> int:
    """Index of the coarsest level (of ``(H, W)`` shapes, finest first) whose longer side
    is still at least ``min_side`` pixels (or the whole level 0 when it is smaller)."""
    want = min(min_side, max(level_shapes[0]))
    best = 0
    for k, shape in enumerate(level_shapes):
        if max(shape) >= want:
            best = k
    return best


@dataclass(eq=False)
class Slide:
    """A whole-slide image opened lazily.

    Attributes
    ----------
    path
        The slide file.
    levels
        One dask array ``(H, W, 3)`` uint8 per pyramid level, level 0 first.
    mpp
        µm per pixel of level 0.
    downsamples
        Level-0 pixels per level pixel, one per level (1.0 first).
    shape
        ``(H, W)`` of level 0.
    vendor
        ``"aperio"``, ``"ndpi"``, ``"ome"`` or ``"tiff"``.
    mpp_source
        Where ``mpp`` came from: ``"argument"``, ``"aperio"``, ``"ome"`` or ``"tiff"``.
    computed_levels
        How many of the levels are computed (not stored in the file).
    """

    path: Path
    levels: list[dask.array.Array]
    mpp: float
    vendor: str = "tiff"
    mpp_source: str = "argument"
    computed_levels: int = 0
    downsamples: list[float] = field(init=False)
    shape: tuple[int, int] = field(init=False)
    # per level: (array with numpy slicing, its axes) for direct reads, or None (dask only)
    _sources: list[tuple[Any, str] | None] = field(default_factory=list, repr=False)
    _tif: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        h0, w0 = (int(s) for s in self.levels[0].shape[:2])
        self.shape = (h0, w0)
        self.downsamples = [
            float((h0 / lvl.shape[0] + w0 / lvl.shape[1]) / 2) for lvl in self.levels
        ]
        if len(self._sources) < len(self.levels):
            self._sources = self._sources + [None] * (len(self.levels) - len(self._sources))

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.levels)

    def level_shape(self, level: int) -> tuple[int, int]:
        """``(H, W)`` of a level."""
        arr = self.levels[self._check_level(level)]
        return int(arr.shape[0]), int(arr.shape[1])

    def level_mpp(self, level: int) -> float:
        """µm per pixel of a level."""
        return self.mpp * self.downsamples[self._check_level(level)]

    def best_level(self, target_mpp: float) -> int:
        """The coarsest level that is still at least as fine as ``target_mpp``.

        Reading at that level and resizing down to ``target_mpp`` never upsamples; a
        target finer than level 0 gives level 0.
        """
        if not target_mpp or target_mpp <= 0 or not math.isfinite(target_mpp):
            raise SigmmaError(f"target µm/px must be positive, got {target_mpp}", path=self.path)
        best = 0
        for k in range(len(self.levels)):
            # a hair of tolerance: 0.4990 * 2.0007 still counts as "1.0 µm/px"
            if self.level_mpp(k) <= target_mpp * (1 + 1e-3):
                best = k
        return best

    def read_region(self, x: int, y: int, w: int, h: int, *, level: int = 0) -> np.ndarray:
        """Read ``h`` rows and ``w`` columns at ``(x, y)`` of a level.

        Parameters
        ----------
        x, y
            Top-left corner in that level's pixels; may lie outside the slide.
        w, h
            Size in pixels (positive).
        level
            Pyramid level.

        Returns
        -------
        ``(h, w, 3)`` uint8; parts outside the slide are white (255).
        """
        level = self._check_level(level)
        x, y, w, h = int(x), int(y), int(w), int(h)
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got w={w}, h={h}")
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        lh, lw = self.level_shape(level)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        source = self._sources[level]
        if source is not None:
            arr, axes = source
            index, kept = _index_for(axes, slice(y0, y1), slice(x0, x1))
            part = _to_rgb(np.asarray(arr[index]), kept, self.path)
        else:
            part = np.asarray(self.levels[level][y0:y1, x0:x1].compute())
        out[y0 - y : y1 - y, x0 - x : x1 - x] = part
        return out

    def thumbnail_level(self, min_side: int = 1024) -> int:
        """The coarsest level whose longer side is still at least ``min_side`` pixels."""
        return coarsest_level([self.level_shape(k) for k in range(len(self.levels))], min_side)

    def close(self) -> None:
        """Close the file (the dask levels stop working)."""
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, shape={self.shape}, mpp={self.mpp:.4g}, "
            f"levels={len(self.levels)}, vendor={self.vendor!r})"
        )

    def _check_level(self, level: int) -> int:
        if not 0 <= int(level) < len(self.levels):
            raise ValueError(f"level {level} out of range 0..{len(self.levels) - 1}")
        return int(level)


# ----------------------------------------------------------------------------- opening


def open_slide(
    path: str | os.PathLike[str], *, mpp: float | None = None, backend: str | None = None
) -> Slide:
    """Open a whole-slide image lazily.

    Parameters
    ----------
    path
        ``.svs``, ``.tif`` / ``.tiff`` (pyramidal or not, OME or not) with tifffile; the
        formats of :data:`~napari_sigmma.constants.OPENSLIDE_SUFFIXES` (NDPI, MIRAX, SCN,
        BIF, VMS, VMU, DICOM, …) and Philips / Ventana TIFF with OpenSlide
        (:func:`slide_backend`, :mod:`napari_sigmma.io.wsi_openslide`).
    mpp
        µm per pixel of level 0; overrides the file's metadata. Needed when the file
        has none.
    backend
        ``"tifffile"`` or ``"openslide"`` to force one; ``None`` chooses by format.

    Returns
    -------
    Slide
        Levels are dask arrays; only the TIFF directories have been read.

    Raises
    ------
    SigmmaError
        Missing file, not a slide file name, not a (complete) TIFF, an empty image, no
        µm/px in the metadata and no ``mpp`` given, or ``mpp <= 0``.
    """
    import tifffile

    p = Path(path)
    if mpp is not None:
        mpp = _check_mpp(mpp, p)
    if not p.exists():
        raise SigmmaError("file not found", path=p)
    if p.is_dir():
        raise SigmmaError("is a folder, not a slide file", path=p)
    if not is_slide_file(p):
        raise SigmmaError(
            f"not a slide file: expected one of {', '.join(SLIDE_SUFFIXES)} (or .ome.tif)",
            path=p,
        )
    if p.stat().st_size == 0:
        raise SigmmaError("the file is empty (0 bytes)", path=p)
    if backend is not None and backend not in BACKENDS:
        raise SigmmaError(f"unknown slide backend {backend!r} (one of {BACKENDS})", path=p)
    if (backend or slide_backend(p)) == "openslide":
        from napari_sigmma.io.wsi_openslide import open_openslide

        levels, sources, mpp_read, vendor, mpp_source, handle = open_openslide(p, mpp)
        try:
            return _make_slide(p, levels, sources, mpp_read, vendor, mpp_source, handle)
        except BaseException:
            handle.close()
            raise
    try:
        tif = tifffile.TiffFile(p)
    except Exception as err:
        raise SigmmaError(f"not a readable TIFF file ({err})", path=p) from err
    try:
        return _open_tiff(tif, p, mpp)
    except BaseException:
        tif.close()
        raise


def _check_mpp(mpp: float, path: Path) -> float:
    try:
        value = float(mpp)
    except (TypeError, ValueError) as err:
        raise SigmmaError(f"mpp must be a number of µm per pixel, got {mpp!r}", path=path) from err
    if not math.isfinite(value) or value <= 0:
        raise SigmmaError(f"mpp (µm per pixel) must be positive, got {mpp}", path=path)
    return value


def _open_tiff(tif: Any, path: Path, mpp: float | None) -> Slide:
    import dask.array as da
    import zarr

    series_index = _main_series(tif, path)
    series = tif.series[series_index]
    shape0 = tuple(int(s) for s in series.levels[0].shape)
    if len(shape0) < 2 or 0 in shape0:
        raise SigmmaError(f"the slide image has no pixels (shape {shape0})", path=path)
    _check_complete(tif, series, path)
    _check_rgb8(series, path)

    if tif.is_svs:
        vendor = "aperio"
    elif tif.is_ndpi:
        vendor = "ndpi"
    elif tif.is_ome:
        vendor = "ome"
    else:
        vendor = "tiff"

    if mpp is not None:
        source_name = "argument"
    else:
        mpp, source_name = _mpp_from_metadata(tif, series, path)
        if mpp is None:
            raise SigmmaError(
                "no pixel size (µm/px) in the file's metadata (no Aperio MPP, OME "
                "PhysicalSizeX or TIFF resolution in µm); pass it explicitly, e.g. "
                "open_slide(path, mpp=0.5)",
                path=path,
            )

    store = series.aszarr(multiscales=True)
    group = zarr.open_group(store, mode="r")
    levels: list[Any] = []
    sources: list[tuple[Any, str] | None] = []
    for k in range(len(series.levels)):
        z = group[str(k)]
        axes = "".join(str(a)[0] for a in z.attrs["_ARRAY_DIMENSIONS"])
        arr: Any = z
        chunk_bytes = int(np.prod(z.chunks)) * z.dtype.itemsize
        if chunk_bytes > _MAX_CHUNK_BYTES and _memmappable(series.levels[k]):
            # one huge uncompressed strip: map it rather than decode it whole per read
            import tifffile

            arr = tifffile.memmap(path, series=series_index, level=k, mode="r")
            axes = series.levels[k].axes
            if arr.ndim != len(axes):
                arr = arr.reshape(series.levels[k].get_shape(False))
                axes = series.levels[k].get_axes(False)
        _check_pixels(arr, axes, path)
        index, kept = _index_for(axes, slice(None), slice(None))
        if isinstance(arr, np.ndarray):
            lazy = da.from_array(arr, chunks=_memmap_chunks(arr.shape, axes), asarray=True)
        else:
            lazy = da.from_zarr(arr)
        levels.append(_to_rgb(lazy[index], kept, path))
        sources.append((arr, axes))

    return _make_slide(path, levels, sources, mpp, vendor, source_name, tif)


def _make_slide(
    path: Path,
    levels: list[Any],
    sources: list[Any],
    mpp: float,
    vendor: str,
    mpp_source: str,
    handle: Any,
) -> Slide:
    """The :class:`Slide` of a backend's stored levels (and their direct-read sources), with
    the pyramid continued lazily by 2x2 means where it stops early or is missing."""
    levels, sources = list(levels), list(sources)
    computed = 0
    while max(levels[-1].shape[:2]) > _PYRAMID_MIN_SIDE:
        levels.append(_half(levels[-1]))
        sources.append(None)
        computed += 1
    return Slide(
        path=path,
        levels=levels,
        mpp=float(mpp),
        vendor=vendor,
        mpp_source=mpp_source,
        computed_levels=computed,
        _sources=sources,
        _tif=handle,
    )


def _main_series(tif: Any, path: Path) -> int:
    """Index of the largest series that is not a label, macro or thumbnail image."""
    if len(tif.pages) == 0 or not len(tif.series):
        raise SigmmaError(
            "no readable image in the TIFF: the file is truncated (its image directories "
            "lie past the end) or damaged",
            path=path,
        )
    best, best_size = -1, -1
    for i, s in enumerate(tif.series):
        name = (s.name or "").strip().lower()
        if any(name.startswith(skip) for skip in _SKIP_SERIES):
            continue
        size = int(np.prod(s.shape)) if len(s.shape) else 0
        if size > best_size:
            best, best_size = i, size
    if best < 0:
        raise SigmmaError("the TIFF holds no slide image (only label/macro/thumbnail)", path=path)
    return best


def _check_complete(tif: Any, series: Any, path: Path) -> None:
    """Fail early when tiles or strips point past the end of the file (a cut download)."""
    size = int(tif.filehandle.size)
    for level in series.levels:
        for page in level.pages:
            if page is None:
                raise SigmmaError("the TIFF is truncated: an image directory is missing", path=path)
            offsets = getattr(page, "dataoffsets", ())
            counts = getattr(page, "databytecounts", ())
            end = max((o + c for o, c in zip(offsets, counts, strict=False) if c), default=0)
            if end > size:
                raise SigmmaError(
                    f"the TIFF is truncated: image data runs to byte {end} but the file "
                    f"has {size} bytes",
                    path=path,
                )


def _memmappable(level: Any) -> bool:
    try:
        return all(bool(p.is_memmappable) for p in level.pages if p is not None)
    except AttributeError:
        return False


def _memmap_chunks(shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    return tuple(
        _PYRAMID_CHUNK if a in "YX" else (n if a in "SC" else 1)
        for a, n in zip(axes, shape, strict=True)
    )


def _check_rgb8(series: Any, path: Path) -> None:
    """An H&E image is 3-channel 8-bit RGB: refuse other channel counts and pixel types
    (a fluorescence or label image, 12/16-bit data) naming the file; an RGBA image (RGB
    with one extra sample) is read as RGB with a note that the alpha channel is dropped."""
    import warnings

    axes, shape = str(series.axes), tuple(int(n) for n in series.shape)
    # S/C: samples, channels; Q/I: planes of unknown meaning (a stack of channels)
    channels = [n for a, n in zip(axes, shape, strict=False) if a in "SCQI" and n > 1]
    n = channels[0] if len(channels) == 1 else (1 if not channels else -1)
    dtype = np.dtype(series.dtype)
    kf = series.keyframe
    if dtype != np.uint8:
        raise SigmmaError(
            f"not an 8-bit RGB H&E image: {max(n, 1)} channel(s) of {dtype} pixels (an H&E "
            "scan is 8-bit RGB; is this a fluorescence image?)",
            path=path,
        )
    if n == 3:
        return
    rgb = int(getattr(kf, "photometric", -1)) == 2  # PHOTOMETRIC.RGB
    if n == 4 and rgb and len(getattr(kf, "extrasamples", ()) or ()) == 1:
        warnings.warn(
            f"{path}: RGBA image: the alpha channel is dropped and the RGB channels are used",
            UserWarning,
            stacklevel=4,
        )
        return
    what = "channels" if n != 1 else "channel (grayscale)"
    raise SigmmaError(
        f"not an RGB H&E image: {n if n > 0 else channels} {what} (axes {axes!r}, shape "
        f"{shape}); an H&E scan has 3 channels (RGB)",
        path=path,
    )


def _check_pixels(arr: Any, axes: str, path: Path) -> None:
    """Reject what cannot become an RGB uint8 H&E image (checked before any pixel is read)."""
    if "Y" not in axes or "X" not in axes:
        raise SigmmaError(f"the image has no Y/X axes (axes {axes!r})", path=path)
    channels = [n for a, n in zip(axes, arr.shape, strict=True) if a in "SC" and n > 1]
    if len(channels) > 1 or (channels and channels[0] not in (3, 4)):
        raise SigmmaError(
            f"not an RGB (H&E) image: {channels} channels (axes {axes!r}, shape {arr.shape})",
            path=path,
        )
    if np.dtype(arr.dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(bool)):
        raise SigmmaError(f"unsupported pixel type {arr.dtype} (expected uint8 RGB)", path=path)


def _index_for(axes: str, ys: slice, xs: slice) -> tuple[tuple[Any, ...], str]:
    """Index selecting rows/columns (and every channel, first plane of other axes)."""
    index: list[Any] = []
    kept = ""
    for a in axes:
        if a == "Y":
            index.append(ys)
            kept += "Y"
        elif a == "X":
            index.append(xs)
            kept += "X"
        elif a in "SC":
            index.append(slice(None))
            kept += "C"
        else:
            index.append(0)
    return tuple(index), kept


def _to_rgb(arr: Any, axes: str, path: Path) -> Any:
    """``(H, W, 3)`` uint8 from an array (numpy or dask) with axes made of Y, X and C."""
    import dask.array as da

    xp: Any = da if isinstance(arr, da.Array) else np
    # several channel axes: keep the one that is not a singleton
    while axes.count("C") > 1:
        pos = [i for i, a in enumerate(axes) if a == "C"]
        drop = next((i for i in pos if arr.shape[i] == 1), pos[0])
        arr = arr[(slice(None),) * drop + (0,)]
        axes = axes[:drop] + axes[drop + 1 :]
    order = [axes.index("Y"), axes.index("X")]
    if "C" in axes:
        order.append(axes.index("C"))
        arr = arr.transpose(order)
    else:
        arr = arr.transpose(order)[..., None]
    n = arr.shape[-1]
    if n == 1:
        arr = xp.concatenate([arr, arr, arr], axis=-1)
    elif n == 4:
        arr = arr[..., :3]
    elif n != 3:
        raise SigmmaError(f"not an RGB image ({n} channels)", path=path)
    if arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return arr


def _half(level: Any) -> Any:
    """A 2x smaller level: 2x2 means, lazily (odd last row/column dropped)."""
    h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2

    def aligned(chunk: int, size: int) -> int:
        # a whole number of source chunks (cheap to rechunk), even, about _PYRAMID_CHUNK
        n = chunk * max(1, round(_PYRAMID_CHUNK / chunk)) if chunk < size else size
        return min(n + n % 2, size)

    x = level[:h, :w]
    x = x.rechunk((aligned(x.chunks[0][0], h), aligned(x.chunks[1][0], w), 3))

    def reduce(block: np.ndarray) -> np.ndarray:
        b = block.astype(np.uint16)
        s = b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
        return ((s + 2) // 4).astype(np.uint8)

    chunks = (
        tuple(c // 2 for c in x.chunks[0]),
        tuple(c // 2 for c in x.chunks[1]),
        x.chunks[2],
    )
    return x.map_blocks(reduce, chunks=chunks, dtype=np.uint8)


# ----------------------------------------------------------------------------- metadata


def _mpp_from_metadata(tif: Any, series: Any, path: Path) -> tuple[float | None, str]:
    """µm/px from Aperio, OME or TIFF resolution metadata, ``(None, "")`` if none is usable."""
    page = series.levels[0].keyframe
    description = getattr(tif.pages[0], "description", "") or ""
    if tif.is_svs or description.startswith("Aperio"):
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
        if m:
            value = _plausible(float(m.group(1)))
            if value is not None:
                return value, "aperio"
    if tif.is_ome and tif.ome_metadata:
        value = _ome_mpp(tif.ome_metadata, series.levels[0].shape)
        if value is not None:
            return value, "ome"
    value = _tiff_resolution_mpp(page)
    if value is not None:
        return value, "tiff"
    return None, ""


def _plausible(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return value if _MPP_RANGE[0] <= value <= _MPP_RANGE[1] else None


def _ome_mpp(xml: str, shape: tuple[int, ...]) -> float | None:
    """PhysicalSizeX (in µm) of the OME image whose size matches the series, else the first."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    candidates: list[tuple[bool, float]] = []
    for pixels in root.iter():
        if not pixels.tag.endswith("Pixels"):
            continue
        size = pixels.get("PhysicalSizeX")
        if size is None:
            continue
        unit = pixels.get("PhysicalSizeXUnit", "µm").strip()
        factor = _OME_UNITS.get(unit)
        try:
            value = float(size) * factor if factor is not None else None
        except ValueError:
            value = None
        value = _plausible(value)
        if value is None:
            continue
        matches = str(pixels.get("SizeX")) in {str(s) for s in shape} and str(
            pixels.get("SizeY")
        ) in {str(s) for s in shape}
        candidates.append((matches, value))
    if not candidates:
        return None
    return next((v for m, v in candidates if m), candidates[0][1])


def _tiff_resolution_mpp(page: Any) -> float | None:
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    unit = int(tags["ResolutionUnit"].value)
    if unit not in _TIFF_UNITS:
        return None
    num, den = tags["XResolution"].value
    if not num or not den:
        return None
    pixels_per_unit = num / den
    value = _plausible(_TIFF_UNITS[unit] / pixels_per_unit)
    if value is not None and unit == 2 and value > _MPP_MAX_FROM_INCH:
        return None
    return value


# ----------------------------------------------------------------------------- tissue


def tissue_mask(slide: Slide, *, min_side: int = 1024) -> tuple[np.ndarray, float]:
    """Foreground (tissue) mask on a thumbnail level.

    Tissue is coloured (saturated) and absorbs light (optical density); glass is neither.
    Otsu thresholds on both, kept within bounds so that a slide that is all tissue or all
    glass is not split in half, then specks and holes smaller than 0.005 mm² go.

    Parameters
    ----------
    slide
        The slide.
    min_side
        The thumbnail is the coarsest level whose longer side is at least this.

    Returns
    -------
    mask
        ``(h, w)`` bool, True on tissue.
    downsample
        Level-0 pixels per mask pixel.
    """
    from scipy import ndimage
    from skimage import morphology
    from skimage.filters import threshold_otsu

    level = slide.thumbnail_level(min_side)
    thumb = np.asarray(slide.levels[level].compute())
    rgb = thumb.astype(np.float32)
    cmax, cmin = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.where(cmax > 0, (cmax - cmin) / np.maximum(cmax, 1), 0.0)
    od = -np.log((rgb + 1.0) / 256.0).mean(axis=-1)

    def bounded_otsu(values: np.ndarray, lo: float, hi: float) -> float:
        if float(values.max() - values.min()) < 1e-6:
            return hi
        return float(np.clip(threshold_otsu(values), lo, hi))

    t_sat = bounded_otsu(sat, 0.05, 0.15)
    t_od = bounded_otsu(od, 0.15, 0.35)
    mask = (sat > t_sat) | (od > t_od)

    downsample = slide.downsamples[level]
    px_um = slide.mpp * downsample
    min_px = max(4, round(5000.0 / (px_um * px_um)))  # 0.005 mm²
    mask = ndimage.binary_opening(mask, structure=morphology.disk(1).astype(bool))
    mask = morphology.remove_small_objects(mask, max_size=min_px)
    mask = morphology.remove_small_holes(mask, max_size=min_px)
    return mask.astype(bool), float(downsample)


# ----------------------------------------------------------------------------- SpatialData


def slide_image_element(slide: Slide, transformation: Any) -> Any:
    """The slide's pyramid as a SpatialData multiscale image ``(c, y, x)``.

    Parameters
    ----------
    slide
        An open slide (its levels stay lazy).
    transformation
        The level-0 pixels → ``"global"`` transformation.

    Returns
    -------
    xarray.DataTree with ``scale0``, ``scale1``, … (the image variable is ``"image"``).
    """
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import set_transformation
    from spatialdata.transformations._utils import compute_coordinates
    from xarray import DataArray, Dataset, DataTree

    scales = {}
    for k, level in enumerate(slide.levels):
        arr = DataArray(
            level.transpose(2, 0, 1),
            dims=("c", "y", "x"),
            coords={"c": ["r", "g", "b"]},
            name="image",
        )
        scales[f"scale{k}"] = Dataset({"image": arr})
    tree = DataTree.from_dict(scales)
    set_transformation(tree, {"global": transformation}, set_all=True)
    tree = compute_coordinates(tree)
    Image2DModel().validate(tree)
    return tree


def read_slide_sdata(path: str | os.PathLike[str], mpp: float | None = None) -> SpatialData:
    """A slide alone as SpatialData: ``images["he_image"]``, ``global`` in µm.

    Parameters
    ----------
    path
        Slide file (see :func:`open_slide`).
    mpp
        µm/px override.

    Returns
    -------
    SpatialData
        ``he_image`` is a lazy multiscale RGB image whose transformation to ``"global"``
        is ``Scale(mpp)``: global coordinates are µm from the slide's top-left corner.
        ``sdata.attrs["sigmma"]`` holds ``{"he_mpp", "source_path"}``.
    """
    from spatialdata import SpatialData
    from spatialdata.transformations import Scale

    slide = open_slide(path, mpp=mpp)
    image = slide_image_element(slide, Scale([slide.mpp, slide.mpp], axes=("y", "x")))
    sdata = SpatialData(images={"he_image": image})
    sdata.attrs["sigmma"] = {"he_mpp": slide.mpp, "source_path": str(slide.path)}
    return sdata
