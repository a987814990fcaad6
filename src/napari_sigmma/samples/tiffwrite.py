"""Pyramidal, tiled OME-TIFF writing that stays memory-bounded for whole-slide sizes.

The image is given either as an array or as a callable ``tile_source(y, x, h, w)`` that
returns the level-0 region ``[y:y+h, x:x+w]``; a 100k x 100k slide can then be written tile
by tile. Level 0 is streamed straight into the file while the lower levels are built by a
cascade of 2x2 mean reductions fed tile by tile, one tile row of buffer per level
(``tile x width`` pixels of the image's dtype, so about 150 MB for a 100k px wide RGB slide
with 512 px tiles). The reduced tiles are spooled (lz4-compressed) to a temporary file
until tifffile asks for them, because TIFF writes level 0 completely before the first
sub-resolution.

Where the levels live: OME-TIFF (Bio-Formats, QuPath, tifffile) keeps sub-resolutions in
the SubIFDs of the full-resolution IFD, which OpenSlide and other libtiff-based tilers
never look at (they walk the main IFD chain, and OpenSlide's generic-TIFF driver takes
every tiled directory there marked "reduced resolution" as a level). By default
(``openslide_levels=True``) each sub-resolution IFD is therefore also linked into the main
chain, as a second directory pointing at the *same* tile bytes (:func:`chain_subifds`): no
pixel is stored twice (a few hundred bytes per level), OpenSlide reports every level, and
the OME-XML still names IFD 0 alone (``TiffData IFD="0" PlaneCount="1"``), so OME readers
see one image with its SubIFD pyramid as before.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from napari_sigmma.errors import SigmmaError

TileSource = Callable[[int, int, int, int], np.ndarray]

__all__ = ["TileSource", "chain_subifds", "pyramid_shapes", "write_pyramidal_ome_tiff"]


def pyramid_shapes(
    height: int, width: int, *, tile: int = 512, levels: int | None = None
) -> list[tuple[int, int]]:
    """Level shapes ``(H, W)`` of a 2x pyramid.

    Parameters
    ----------
    height, width
        Level-0 size in pixels.
    tile
        Tile size; with ``levels=None`` levels are added until one fits in a single tile.
    levels
        Total number of levels including level 0 (``None``: automatic).

    Returns
    -------
    list of (H, W), level 0 first; each level is ``ceil`` of half the previous one.
    """
    shapes = [(int(height), int(width))]
    while True:
        h, w = shapes[-1]
        if levels is not None:
            if len(shapes) >= levels:
                break
        elif max(h, w) <= tile:
            break
        if h == 1 and w == 1:
            break
        shapes.append((max(1, math.ceil(h / 2)), max(1, math.ceil(w / 2))))
    return shapes


def _reduce2(block: np.ndarray) -> np.ndarray:
    """2x2 mean of an (h, w[, c]) block; odd edges repeat their last row/column.

    Integers are rounded half to even (as ``np.rint``); 8- and 16-bit pixels are summed in
    a wider integer type instead of float, which is faster and needs less memory.
    """
    h, w = block.shape[:2]
    if h % 2 or w % 2:
        pad = [(0, h % 2), (0, w % 2)] + [(0, 0)] * (block.ndim - 2)
        block = np.pad(block, pad, mode="edge")
    if block.dtype.kind in "ui" and block.dtype.itemsize <= 2:
        acc = np.uint16 if block.dtype == np.uint8 else np.int32
        s = block[0::2, 0::2].astype(acc)
        s += block[1::2, 0::2]
        s += block[0::2, 1::2]
        s += block[1::2, 1::2]
        q = s >> 2
        rem = s & 3
        # s / 4 = q + rem / 4: round up above a half, and at a half towards the even value
        q += (rem == 3) | ((rem == 2) & ((q & 1) == 1))
        return q.astype(block.dtype)
    f = block.astype(np.float32)
    out = (f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2]) * 0.25
    if np.issubdtype(block.dtype, np.integer):
        info = np.iinfo(block.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(block.dtype)


class _Spool:
    """Tiles of one reduced level, lz4-compressed in a temporary file, read back in order."""

    def __init__(self, directory: Path, tile_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._fh = tempfile.TemporaryFile(dir=directory, prefix=".sigmma-spool-")
        self._sizes: list[int] = []
        self._tile_shape = tile_shape
        self._dtype = dtype

    def put(self, tile_arr: np.ndarray) -> None:
        import imagecodecs

        data = imagecodecs.lz4_encode(np.ascontiguousarray(tile_arr).tobytes())
        self._fh.write(data)
        self._sizes.append(len(data))

    def tiles(self) -> Iterator[np.ndarray]:
        import imagecodecs

        self._fh.seek(0)
        # the decoded size, given: lz4_decode otherwise allocates a generous guess (~50 MB)
        nbytes = int(np.prod(self._tile_shape)) * np.dtype(self._dtype).itemsize
        for size in self._sizes:
            raw = imagecodecs.lz4_decode(self._fh.read(size), out=nbytes)
            yield np.frombuffer(raw, dtype=self._dtype).reshape(self._tile_shape)
        self._fh.close()

    def close(self) -> None:
        self._fh.close()


class _LevelSink:
    """Builds level k from tile-sized blocks of level k-1 and emits its tiles to a spool.

    The parent feeds its current tile row block by block, left to right (:meth:`feed`), and
    says when that row is done (:meth:`row_done`). Each block is reduced at once into a
    buffer of one tile row of level k (``tile x width_k`` pixels of the image's own dtype),
    so memory is that buffer per level, whatever the width: no full-width copies and no
    float rows.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        tile: int,
        channels: tuple[int, ...],
        dtype: np.dtype,
        spool: _Spool,
        child: _LevelSink | None,
    ) -> None:
        self.shape = shape
        self.tile = tile
        self.channels = channels
        self.dtype = dtype
        self.spool = spool
        self.child = child
        self._buf = np.zeros((min(tile, shape[0]), shape[1], *channels), dtype=dtype)
        self._fill = 0  # rows of the buffer filled by finished parent rows
        self._row_start = 0  # level row of the buffer's first row

    def feed(self, block: np.ndarray, x: int) -> None:
        """A block of the parent's current tile row, starting at parent column ``x`` (even)."""
        reduced = _reduce2(block)
        r0 = self._fill
        h = min(reduced.shape[0], self._buf.shape[0] - r0, self.shape[0] - self._row_start - r0)
        c0 = x // 2
        w = min(reduced.shape[1], self.shape[1] - c0)
        if h > 0 and w > 0:
            self._buf[r0 : r0 + h, c0 : c0 + w] = reduced[:h, :w]

    def row_done(self, parent_rows: int) -> None:
        """The parent finished a tile row of ``parent_rows`` rows."""
        self._fill = min(
            self._fill + (parent_rows + 1) // 2,
            self._buf.shape[0],
            self.shape[0] - self._row_start,
        )
        if self._fill == self._buf.shape[0] or self._row_start + self._fill >= self.shape[0]:
            self._emit()

    def _emit(self) -> None:
        if not self._fill:
            return
        t, n = self.tile, self._fill
        for x in range(0, self.shape[1], t):
            block = self._buf[:n, x : x + t]
            if self.child is not None:
                self.child.feed(block, x)
            if block.shape[0] != t or block.shape[1] != t:
                full = np.zeros((t, t, *self.channels), dtype=self.dtype)
                full[: block.shape[0], : block.shape[1]] = block
                block = full
            self.spool.put(block)
        if self.child is not None:
            self.child.row_done(n)
        self._row_start += n
        self._fill = 0

    def finish(self) -> None:
        self._emit()
        if self.child is not None:
            self.child.finish()


def write_pyramidal_ome_tiff(
    path: str | os.PathLike[str],
    image_or_tile_source: np.ndarray | TileSource,
    *,
    mpp: float,
    tile: int = 512,
    compression: Literal["jpeg", "zlib", "none"] = "jpeg",
    levels: int | None = None,
    shape: tuple[int, ...] | None = None,
    dtype: Any = None,
    quality: int = 90,
    channel_names: list[str] | None = None,
    maxworkers: int = 2,
    openslide_levels: bool = True,
) -> Path:
    """Write a tiled, pyramidal OME-TIFF (BigTIFF, sub-resolutions in SubIFDs).

    Over 120 lines because of its parameter documentation; what remains is one
    ``TiffWriter`` session (level 0, then the spooled levels) that must clean up together.

    Parameters
    ----------
    path
        Output file (``.ome.tif``).
    image_or_tile_source
        ``(H, W, C)`` or ``(H, W)`` array, or a callable ``tile_source(y, x, h, w)``
        returning the level-0 region ``[y:y+h, x:x+w]`` (then ``shape`` is required).
        Regions are requested one tile row after another, left to right.
    mpp
        Level-0 pixel size in µm (written as OME ``PhysicalSizeX/Y`` and TIFF resolution).
    tile
        Tile edge in pixels (multiple of 16).
    compression
        ``"jpeg"`` (uint8 only; RGB or grey), ``"zlib"`` or ``"none"``.
    levels
        Total number of levels including level 0; ``None`` adds 2x levels until the
        smallest fits in one tile.
    shape
        ``(H, W)`` or ``(H, W, C)`` of level 0; required with a tile source.
    dtype
        Pixel type for a tile source (default uint8).
    quality
        JPEG quality.
    channel_names
        OME channel names for a single-sample (grey) image.
    maxworkers
        Threads tifffile may use to encode tiles.
    openslide_levels
        Also link the sub-resolution IFDs into the main IFD chain (sharing their tiles, see
        :func:`chain_subifds`) so that OpenSlide reads the pyramid; ``False`` writes the
        plain SubIFD layout (OpenSlide then sees level 0 only).

    Returns
    -------
    Path of the written file.
    """
    import tifffile

    path = Path(path)
    if tile <= 0 or tile % 16:
        raise SigmmaError(f"tile size must be a positive multiple of 16, got {tile}", path=path)
    if not mpp or mpp <= 0 or not np.isfinite(mpp):
        raise SigmmaError(f"pixel size (mpp) must be positive, got {mpp}", path=path)

    source, full_shape, np_dtype = _tile_source(image_or_tile_source, shape, dtype, path)
    height, width = full_shape[:2]
    channels: tuple[int, ...] = tuple(full_shape[2:])
    if height <= 0 or width <= 0:
        raise SigmmaError(f"empty image of shape {full_shape}", path=path)
    if channels and channels[0] not in (1, 3, 4):
        raise SigmmaError(f"expected 1, 3 or 4 samples per pixel, got {channels[0]}", path=path)
    rgb = bool(channels) and channels[0] in (3, 4)

    comp, compressionargs = _compression_args(compression, quality, np_dtype, path)

    shapes = pyramid_shapes(height, width, tile=tile, levels=levels)
    tile_shape = (tile, tile, *channels)
    path.parent.mkdir(parents=True, exist_ok=True)

    spools = [_Spool(path.parent, tile_shape, np_dtype) for _ in shapes[1:]]
    sink: _LevelSink | None = None
    for lvl in range(len(shapes) - 1, 0, -1):
        sink = _LevelSink(shapes[lvl], tile, channels, np_dtype, spools[lvl - 1], sink)

    photometric, metadata = _ome_metadata(mpp, channels, rgb, channel_names)
    options: dict[str, Any] = {
        "tile": (tile, tile),
        "dtype": np_dtype,
        "photometric": photometric,
        "compression": comp,
        "compressionargs": compressionargs,
        "resolutionunit": "CENTIMETER",
        "maxworkers": maxworkers,
        # bytes of tiles tifffile gathers per threaded encoding batch (its default, 512 MB,
        # would hold ~680 RGB tiles of 512 px)
        "buffersize": 8 * max(1, maxworkers) * math.prod(tile_shape) * np_dtype.itemsize,
    }
    if len(channels) and channels[0] == 4:
        options["extrasamples"] = ["unassalpha"]
    try:
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
            tif.write(
                _level0_tiles(source, (height, width), tile, channels, np_dtype, sink, path),
                shape=(height, width, *channels),
                subifds=len(shapes) - 1,
                resolution=(1e4 / mpp, 1e4 / mpp),
                metadata=metadata,
                **options,
            )
            for lvl, spool in enumerate(spools, start=1):
                h, w = shapes[lvl]
                scale = (height / h + width / w) / 2
                tif.write(
                    spool.tiles(),
                    shape=(h, w, *channels),
                    subfiletype=1,
                    resolution=(1e4 / (mpp * scale), 1e4 / (mpp * scale)),
                    metadata=None,
                    **options,
                )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        for spool in spools:
            spool.close()
    if openslide_levels and len(shapes) > 1:
        try:
            chain_subifds(path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return path


def _tile_source(
    image_or_tile_source: np.ndarray | TileSource,
    shape: tuple[int, ...] | None,
    dtype: Any,
    path: Path,
) -> tuple[TileSource, tuple[int, ...], np.dtype]:
    """A tile source, the full image shape and the pixel dtype, from an array or a source."""
    if callable(image_or_tile_source):
        if shape is None:
            raise SigmmaError("a tile source needs shape=(H, W[, C])", path=path)
        source: TileSource = image_or_tile_source
        full_shape = tuple(int(s) for s in shape)
        np_dtype = np.dtype(dtype or np.uint8)
    else:
        arr = np.asarray(image_or_tile_source)
        if arr.ndim not in (2, 3):
            raise SigmmaError(f"image must be (H, W) or (H, W, C), got {arr.shape}", path=path)
        full_shape = arr.shape
        np_dtype = arr.dtype

        def source(y: int, x: int, h: int, w: int) -> np.ndarray:
            return arr[y : y + h, x : x + w]

    return source, full_shape, np_dtype


def _compression_args(
    compression: str, quality: int, np_dtype: np.dtype, path: Path
) -> tuple[str | None, dict[str, Any] | None]:
    """tifffile's ``compression`` and ``compressionargs`` for ``compression``."""
    comp: str | None = None if compression == "none" else compression
    compressionargs: dict[str, Any] | None = None
    if comp == "jpeg":
        if np_dtype != np.uint8:
            raise SigmmaError("JPEG compression needs uint8 pixels; use zlib", path=path)
        compressionargs = {"level": int(quality)}
    elif comp == "zlib":
        compressionargs = {"level": 6}
    elif comp is not None:
        raise SigmmaError(f"unknown compression {compression!r}", path=path)
    return comp, compressionargs


def _level0_tiles(
    source: TileSource,
    size: tuple[int, int],
    tile: int,
    channels: tuple[int, ...],
    np_dtype: np.dtype,
    sink: _LevelSink | None,
    path: Path,
) -> Iterator[np.ndarray]:
    """Full-resolution tiles in row-major order (edge tiles zero-padded), each also fed to
    the reduction cascade ``sink`` that builds the lower levels."""
    height, width = size
    # tiles go to the reduction cascade one by one; tifffile stops pulling after the
    # last tile, so a row is closed (and the cascade finished) before its last tile is
    # yielded
    for y in range(0, height, tile):
        h = min(tile, height - y)
        for x in range(0, width, tile):
            w = min(tile, width - x)
            region = np.asarray(source(y, x, h, w))
            if region.shape[:2] != (h, w) or region.shape[2:] != channels:
                raise SigmmaError(
                    f"tile source returned {region.shape} for region y={y} x={x} "
                    f"h={h} w={w}, expected {(h, w, *channels)}",
                    path=path,
                )
            region = region.astype(np_dtype, copy=False)
            if sink is not None:
                sink.feed(region, x)
                if x + tile >= width:
                    sink.row_done(h)
                    if y + tile >= height:
                        sink.finish()
            if (h, w) != (tile, tile):
                full = np.zeros((tile, tile, *channels), dtype=np_dtype)
                full[:h, :w] = region
                region = full
            yield region


def _ome_metadata(
    mpp: float, channels: tuple[int, ...], rgb: bool, channel_names: list[str] | None
) -> tuple[str, dict[str, Any]]:
    """The photometric interpretation and the OME metadata of level 0."""
    if rgb:
        axes, photometric = "YXS", "rgb"
    elif channels:
        axes, photometric = "YXS", "minisblack"
    else:
        axes, photometric = "YX", "minisblack"
    metadata: dict[str, Any] = {
        "axes": axes,
        "PhysicalSizeX": float(mpp),
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": float(mpp),
        "PhysicalSizeYUnit": "µm",
    }
    if channel_names and not rgb:
        metadata["Channel"] = {"Name": list(channel_names)}
    return photometric, metadata


def chain_subifds(path: str | os.PathLike[str]) -> int:
    """Link the SubIFDs of a TIFF's first IFD into its main IFD chain, sharing their data.

    Each SubIFD is copied, entry for entry, to the end of the file and the copies are
    appended to the main chain. Entries whose values do not fit inline point to absolute
    file offsets, so a verbatim copy references the same tile offsets, byte counts and
    tile bytes: the file grows by the directories alone. The copies keep
    ``NewSubfileType = 1`` (reduced resolution), which is what OpenSlide's generic-TIFF
    driver and other libtiff tilers take as a pyramid level.

    Returns
    -------
    int
        The number of directories linked (0 when the first IFD has no SubIFDs or the main
        chain already has more than one directory).
    """
    import tifffile

    path = Path(path)
    with tifffile.TiffFile(path) as tif:
        order = tif.byteorder
        big = tif.tiff.offsetsize == 8
        if len(tif.pages) != 1:
            return 0
        first = tif.pages[0]
        subifds = [int(o) for o in (first.subifds or ())]
        last = int(first.offset)
    if not subifds:
        return 0
    count_fmt, entry_size, offset_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    count_size, offset_size = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
    with open(path, "r+b") as fh:

        def entries(offset: int) -> bytes:
            fh.seek(offset)
            (n,) = struct.unpack(order + count_fmt, fh.read(count_size))
            fh.seek(offset)
            return fh.read(count_size + n * entry_size)

        blobs = [entries(o) for o in subifds]
        end = fh.seek(0, os.SEEK_END)
        end += end % 2  # directories start on a word boundary
        starts = []
        for blob in blobs:
            starts.append(end)
            end += len(blob) + offset_size
            end += end % 2
        if not big and end >= 2**32:
            raise SigmmaError("the TIFF would exceed 4 GB; write BigTIFF", path=path)
        for k, blob in enumerate(blobs):
            fh.seek(starts[k])
            nxt = starts[k + 1] if k + 1 < len(blobs) else 0
            fh.write(blob + struct.pack(order + offset_fmt, nxt))
        fh.truncate(end)  # pads an odd length with a zero byte
        # the first IFD's "next IFD" field: after its count and entries
        head = entries(last)
        fh.seek(last + len(head))
        fh.write(struct.pack(order + offset_fmt, starts[0]))
    return len(blobs)
