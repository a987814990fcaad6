"""Embed a whole slide straight into a SpatialData ``.zarr`` store, batch by batch.

:func:`~napari_sigmma.embed.memory.embed_tiles` keeps every embedding in memory: for a
100k × 100k px slide (~150k tiles, ~300k cells) that is about 1 GB. Here the layout of
the result is fixed before the first forward — which tiles, how many cells each, which
cells get node embeddings, in which rows — from the cell table alone, so the store's
skeleton (tile squares, cell circles, both tables' ``obs``) is written first and every
embedding array is a zarr array inside the tables' ``obsm`` that each batch writes its
rows into. What is held is one chunk of rows per array (``chunk_rows`` × D), not the slide.

The store is written beside the target (``.<name>.partial.zarr``) and moved into place
when complete, so a cancelled or failed run leaves no half store and an existing store
(``overwrite``) is replaced only by a finished one. The result reads back with
:func:`napari_sigmma.io.store.read_sdata` and equals what
:func:`~napari_sigmma.embed.memory.embeddings_to_sdata` makes from
:func:`~napari_sigmma.embed.memory.embed_tiles`.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.constants import SCALES
from napari_sigmma.errors import Cancelled, CancelLike, SigmmaError

if TYPE_CHECKING:
    from napari_sigmma.tiles.dataset import GraphSettings
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide

#: anndata's on-disk encoding of a dense array (what it writes for ``obsm`` entries).
ARRAY_ENCODING = {"encoding-type": "array", "encoding-version": "0.2.0"}


@dataclass
class StreamedEmbedding:
    """What :func:`embed_slide_streaming` wrote.

    Attributes
    ----------
    path
        The SpatialData store.
    n_tiles, n_valid, n_cells
        Tiles embedded, tiles with an ST embedding, cells with node embeddings.
    seconds
        Wall time.
    """

    path: Path
    n_tiles: int
    n_valid: int
    n_cells: int
    seconds: float


class _RowWriter:
    """Writes row blocks, in increasing row order, into one zarr array of ``obsm``.

    Rows are gathered into a chunk-sized buffer and each chunk is written once when full,
    so the array is never read back and memory is one chunk. Rows never written keep the
    fill value (NaN). The array is created on the first block (its width is only known
    then), replacing the zero-width placeholder the skeleton wrote under the same name.
    """

    def __init__(self, group: Any, name: str, n_rows: int, chunk_rows: int) -> None:
        self.group, self.name, self.n_rows = group, name, int(n_rows)
        self.chunk_rows = max(1, int(chunk_rows))
        self.array: Any = None
        self.buf: np.ndarray | None = None
        self.chunk_start = 0
        self.dirty = False
        self.next_row = 0

    def write(self, row0: int, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float32)
        if row0 < self.next_row:
            raise RuntimeError(f"{self.name}: rows must be written in order")
        if self.array is None:
            self._create(block.shape[1])
        assert self.buf is not None
        self.next_row = row0 + block.shape[0]
        while block.shape[0]:
            local = row0 - self.chunk_start
            if local >= self.chunk_rows:
                self._flush()
                self.chunk_start += self.chunk_rows
                continue
            take = min(block.shape[0], self.chunk_rows - local)
            self.buf[local : local + take] = block[:take]
            self.dirty = True
            row0 += take
            block = block[take:]

    def _create(self, width: int) -> None:
        if self.name in self.group:
            del self.group[self.name]
        self.array = self.group.create_array(
            name=self.name,
            shape=(self.n_rows, int(width)),
            chunks=(min(self.chunk_rows, max(self.n_rows, 1)), int(width)),
            dtype="float32",
            fill_value=np.nan,
            attributes=dict(ARRAY_ENCODING),
        )
        self.buf = np.full((self.chunk_rows, int(width)), np.nan, np.float32)

    def _flush(self) -> None:
        if self.dirty and self.buf is not None:
            end = min(self.chunk_start + self.chunk_rows, self.n_rows)
            self.array[self.chunk_start : end] = self.buf[: end - self.chunk_start]
            self.buf.fill(np.nan)
        self.dirty = False

    def close(self) -> bool:
        """Write the last chunk; returns whether the array was created."""
        self._flush()
        return self.array is not None


def embed_slide_streaming(
    model: Any,
    paired: PairedSlide,
    grid: TileGrid,
    out: str | Path,
    *,
    featurizer: NodeFeaturizer | None = None,
    settings: GraphSettings | None = None,
    indices: np.ndarray | None = None,
    batch_size: int = 8,
    device: Any = None,
    cells: bool = True,
    suffix: str = "",
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
    chunk_rows: int = 4096,
    chunk_tiles: int = 512,
    cancel: CancelLike = None,
    progress: Callable[[int, int], None] | None = None,
) -> StreamedEmbedding:
    """Embed tiles of ``grid`` and write them to the SpatialData store ``out`` as they come.

    Parameters
    ----------
    model, paired, grid, featurizer, settings, indices, batch_size, device, cells
        As :func:`~napari_sigmma.embed.memory.iter_embed_batches`.
    out
        Target ``.zarr`` folder.
    suffix, attrs
        As :func:`~napari_sigmma.embed.memory.embeddings_to_sdata`.
    overwrite
        Replace an existing SpatialData store at ``out`` (only once the new one is complete).
    chunk_rows
        Rows per zarr chunk of every embedding array (and per write buffer).
    chunk_tiles
        Tiles whose cell graphs are prepared together.
    cancel
        Event or callable checked between batches.
    progress
        ``progress(done, total)`` after each batch.

    Raises
    ------
    Cancelled
        When cancelled; nothing is written and an existing store is untouched.
    SigmmaError
        Bad target (see :func:`napari_sigmma.io.store.prepare_target`), the slide read
        from inside the target, or a failed write (naming the store).
    """
    from napari_sigmma.embed.memory import iter_embed_batches, tile_indices
    from napari_sigmma.io.store import prepare_target, swap_in
    from napari_sigmma.tiles.dataset import GraphSettings

    t0 = time.perf_counter()
    settings = settings or GraphSettings()
    target, tmp = prepare_target(out, overwrite=overwrite)
    if paired.source and _inside(Path(paired.source), target):
        raise SigmmaError(
            "cannot write the embeddings into the store the slide is read from", path=target
        )
    idx = tile_indices(grid, indices)

    use_st = featurizer is not None and paired.n_cells > 0
    n_cells, valid, cell_index, cell_tile, cell_start = _tile_layout(
        paired, grid, idx, settings.min_cells, use_st=use_st, cells=cells
    )

    sdata = _skeleton_sdata(
        paired, grid, idx, (n_cells, valid, cell_index, cell_tile), suffix=suffix, attrs=attrs
    )
    try:
        sdata.write(tmp)
        del sdata
        writers, cell_writers = _open_writers(tmp, suffix, idx.size, cell_index.size, chunk_rows)
        done = 0
        for b in iter_embed_batches(
            model,
            paired,
            grid,
            featurizer=featurizer,
            settings=settings,
            indices=idx,
            batch_size=batch_size,
            device=device,
            cells=cells,
            cancel=cancel,
            progress=progress,
            chunk_tiles=chunk_tiles,
        ):
            _write_batch(b, writers, cell_writers, (n_cells, valid, cell_index, cell_start))
            done = b.start + b.indices.size
        if done < idx.size:
            raise Cancelled()
        _close_writers([*writers.values(), *cell_writers.values()], tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # cancelled or failed: no half store
        if isinstance(err, OSError):
            from napari_sigmma.train.checkpoint import write_error

            raise write_error(err, target, "the embeddings") from err
        raise
    swap_in(tmp, target)
    return StreamedEmbedding(
        path=target,
        n_tiles=int(idx.size),
        n_valid=int(valid.sum()),
        n_cells=int(cell_index.size),
        seconds=time.perf_counter() - t0,
    )


def _skeleton_sdata(
    paired: PairedSlide,
    grid: TileGrid,
    idx: np.ndarray,
    layout: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    suffix: str,
    attrs: dict[str, Any] | None,
) -> Any:
    """The store's SpatialData with every table and zero-width embedding arrays, written
    first so that the embeddings can be streamed into it row by row."""
    from napari_sigmma.embed.memory import TileEmbeddings, embeddings_to_sdata

    n_cells, valid, cell_index, cell_tile = layout
    zero = np.zeros((idx.size, 0), np.float32)
    skeleton = TileEmbeddings(
        indices=idx,
        tile_ids=[grid.tile_ids[int(i)] for i in idx],
        he={s: zero for s in SCALES},
        st={s: zero for s in SCALES} if valid.any() else {},
        valid=valid,
        n_cells=n_cells,
        cell_index=cell_index,
        cell_tile=cell_tile,
        cell_st={s: np.zeros((cell_index.size, 0), np.float32) for s in SCALES}
        if cell_index.size
        else {},
    )
    attrs = dict(attrs or {})
    source = attrs.get("source") or paired.source
    if source:
        # the H&E is linked, not copied: the store's reader opens it from this path
        attrs["source"] = str(Path(source).resolve())
    return embeddings_to_sdata(skeleton, paired, grid, suffix=suffix, attrs=attrs)


def _write_batch(
    b: Any,
    writers: dict[str, _RowWriter],
    cell_writers: dict[str, _RowWriter],
    layout: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Write one batch's tile and cell embeddings (unit length, as
    :func:`~napari_sigmma.embed.memory.embeddings_to_sdata` stores them), after checking
    that its tiles and cells are those of the precomputed layout."""
    from napari_sigmma.embed.memory import l2_rows

    n_cells, valid, cell_index, cell_start = layout
    rows = slice(b.start, b.start + b.indices.size)
    if not (np.array_equal(b.valid, valid[rows]) and np.array_equal(b.n_cells, n_cells[rows])):
        raise RuntimeError("tile cells differ from the precomputed layout")
    for s, v in b.he.items():
        writers[f"he_{s}"].write(b.start, l2_rows(v))
    for s, v in b.st.items():
        writers[f"st_{s}"].write(b.start, l2_rows(v))
    if b.cell_index.size and cell_writers:
        c0 = int(cell_start[b.start])
        if not np.array_equal(cell_index[c0 : c0 + b.cell_index.size], b.cell_index):
            raise RuntimeError("batch cells differ from the precomputed layout")
        for s, v in b.cell_st.items():
            cell_writers[s].write(c0, l2_rows(v))


def _tile_layout(
    paired: PairedSlide,
    grid: TileGrid,
    idx: np.ndarray,
    min_cells: int,
    *,
    use_st: bool,
    cells: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The store's layout from the cell table alone, with the tile graphs' own ``valid``
    rule: cells per tile, valid tiles, the stored cells' table rows and tile, and each
    tile's first cell row."""
    from napari_sigmma.tiles.graphs import cells_per_tile, has_graph

    per_tile = cells_per_tile(paired.cells_px, grid)
    members = [per_tile[int(i)] for i in idx]
    del per_tile
    n_cells = np.array([m.size for m in members], dtype=np.int64)
    valid = has_graph(n_cells, min_cells) & use_st
    stored = valid & bool(cells)  # tiles whose cells get node embeddings
    cell_index = (
        np.concatenate([m for m, ok in zip(members, stored, strict=True) if ok]).astype(np.int64)
        if stored.any()
        else np.zeros(0, np.int64)
    )
    per_tile_rows = np.where(stored, n_cells, 0)
    cell_tile = np.repeat(np.arange(idx.size, dtype=np.int64), per_tile_rows)
    cell_start = np.concatenate([[0], np.cumsum(per_tile_rows)])  # first cell row per tile
    return n_cells, valid, cell_index, cell_tile, cell_start


def _open_writers(
    tmp: Path, suffix: str, n_tiles: int, n_cell_rows: int, chunk_rows: int
) -> tuple[dict[str, _RowWriter], dict[str, _RowWriter]]:
    """Row writers of the tile embeddings (``he_<scale>``, ``st_<scale>``) and of the cell
    embeddings (by scale; none without stored cells) in the skeleton store ``tmp``."""
    import zarr

    root = zarr.open_group(str(tmp), mode="r+", use_consolidated=False)
    tile_obsm = root[f"tables/tile_embeddings{suffix}/obsm"]
    writers = {f"he_{s}": _RowWriter(tile_obsm, f"he_{s}", n_tiles, chunk_rows) for s in SCALES}
    writers |= {f"st_{s}": _RowWriter(tile_obsm, f"st_{s}", n_tiles, chunk_rows) for s in SCALES}
    cell_writers: dict[str, _RowWriter] = {}
    if n_cell_rows:
        cell_obsm = root[f"tables/cell_embeddings{suffix}/obsm"]
        cell_writers = {
            s: _RowWriter(cell_obsm, f"st_{s}", n_cell_rows, chunk_rows) for s in SCALES
        }
    return writers, cell_writers


def _close_writers(writers: list[_RowWriter], tmp: Path) -> None:
    """Flush every writer, drop arrays never produced, and consolidate the store's metadata."""
    import zarr

    for w in writers:
        if not w.close() and w.name in w.group:
            # never produced (e.g. no tile had enough cells): no placeholder either
            del w.group[w.name]
    with warnings.catch_warnings():
        # spatialdata reads the v3 store through consolidated metadata, as it wrote it
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        zarr.consolidate_metadata(str(tmp))


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True
