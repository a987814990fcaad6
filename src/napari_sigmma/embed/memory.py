"""Embed the tiles of a slide with a trained SIGMMA model, and store the result as SpatialData.

:func:`embed_tiles` runs both encoders over (some of) the tiles of a grid: every tile gets
HE embeddings at the three scales; tiles with at least ``min_cells`` cells also get ST
embeddings (others: NaN) and their cells get node embeddings per scale. The CLI
(``napari-sigmma embed``) and the viewer use the same function.

:func:`embeddings_to_sdata` turns the result into SpatialData elements that
napari-spatialdata, squidpy and scanpy open directly: shapes ``"tiles"`` (square polygons)
annotated by the table ``"tile_embeddings"`` (obsm ``he_micro``, ``he_meso``, ``he_macro``,
``st_micro``, …), and circles ``"cells"`` annotated by ``"cell_embeddings"`` (obsm
``st_micro``, …). Geometry is in H&E level-0 pixels with the slide's transformation to
``global``, so the elements overlay the original data.

As written (the store layout, docs/INTERFACES.md "Embedding store"): shapes have an integer
index ``0..n-1`` (napari-spatialdata turns it into layer indices with ``int()``) and keep
the tile / cell id as a column; the tables' ``instance_id`` column matches that index;
text columns with few values (``slide``, ``cell_type``) are pandas categoricals; every
stored embedding row is L2-normalised (:data:`EMBEDDING_NORM`; NaN rows stay NaN).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.constants import SCALES
from napari_sigmma.errors import CancelLike, SigmmaError, is_cancelled

#: How stored embeddings are normalised (recorded in ``uns["sigmma"]["embedding_norm"]``): the
#: model compares embeddings by cosine similarity, so their length carries nothing it was
#: trained on (raw H&E norms are ~6, ST ~0.7); unit rows make Euclidean tools (scanpy
#: neighbours, k-means, faiss L2) rank as the model does.
EMBEDDING_NORM = "l2"
#: Name of the integer column of the embedding tables that matches the shapes' index.
INSTANCE_KEY = "instance_id"

if TYPE_CHECKING:
    from napari_sigmma.tiles.dataset import GraphSettings, SlideTiles
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide


@dataclass
class TileEmbeddings:
    """Embeddings of some tiles of one slide.

    Attributes
    ----------
    indices
        ``(n,)`` tile indices into the grid.
    tile_ids
        Their ids.
    he, st
        ``{scale: (n, D)}`` float32; ``st`` rows are NaN for tiles without enough cells.
    valid
        ``(n,)`` bool: the tile has an ST embedding.
    n_cells
        ``(n,)`` cells per tile.
    cell_index
        ``(m,)`` indices into the slide's cells (cells of valid tiles).
    cell_tile
        ``(m,)`` position in ``indices`` of each cell's tile.
    cell_st
        ``{scale: (m, D)}`` node embeddings of those cells after each graph stage.
    complete
        False when cancelled before every tile was done (only the done tiles are present).
    """

    indices: np.ndarray
    tile_ids: list[str]
    he: dict[str, np.ndarray]
    st: dict[str, np.ndarray]
    valid: np.ndarray
    n_cells: np.ndarray
    cell_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cell_tile: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cell_st: dict[str, np.ndarray] = field(default_factory=dict)
    complete: bool = True


@dataclass
class EmbedBatch:
    """One forward's worth of :func:`iter_embed_batches` output.

    Attributes
    ----------
    start
        Position of the batch's first tile in the run's ``indices``.
    indices
        ``(b,)`` grid indices of the batch's tiles.
    he
        ``{scale: (b, D)}`` HE embeddings.
    st
        ``{scale: (b, D)}`` ST embeddings, NaN rows for tiles without enough cells; empty
        when no tile of the batch has an ST embedding.
    valid, n_cells
        ``(b,)`` per tile.
    cell_index
        ``(m,)`` slide cell indices of the valid tiles' cells, tile by tile.
    cell_tile
        ``(m,)`` position in the run's ``indices`` of each cell's tile.
    cell_st
        ``{scale: (m, D)}`` node embeddings of those cells.
    """

    start: int
    indices: np.ndarray
    he: dict[str, np.ndarray]
    st: dict[str, np.ndarray]
    valid: np.ndarray
    n_cells: np.ndarray
    cell_index: np.ndarray
    cell_tile: np.ndarray
    cell_st: dict[str, np.ndarray]


def tile_indices(grid: TileGrid, indices: np.ndarray | None) -> np.ndarray:
    """The tiles of a run as int64 grid indices (default: all), checked against the grid.

    Raises
    ------
    SigmmaError
        An index outside ``0 .. len(grid) - 1``.
    """
    idx = np.arange(len(grid)) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(grid)):
        raise SigmmaError(f"tile indices out of range 0..{len(grid) - 1}")
    return idx


def embed_tiles(
    model: Any,
    paired: PairedSlide,
    grid: TileGrid,
    *,
    featurizer: NodeFeaturizer | None = None,
    settings: GraphSettings | None = None,
    indices: np.ndarray | None = None,
    batch_size: int = 8,
    device: Any = None,
    cells: bool = True,
    cancel: CancelLike = None,
    progress: Callable[[int, int], None] | None = None,
) -> TileEmbeddings:
    """Encode tiles of ``grid`` with both encoders of ``model``, all results in memory.

    For a whole large slide use
    :func:`~napari_sigmma.embed.stream.embed_slide_streaming`, which writes each
    batch to a ``.zarr`` store instead. Parameters as :func:`iter_embed_batches`; a
    cancelled run returns the tiles done so far with ``complete=False``.
    """
    idx = tile_indices(grid, indices)
    batches = list(
        iter_embed_batches(
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
        )
    )
    done = sum(b.indices.size for b in batches)
    dim = int(getattr(model.cfg, "embed_dim", 0))
    he = {
        s: np.concatenate([b.he[s] for b in batches])
        for s in SCALES
        if batches and all(s in b.he for b in batches)
    }
    if not batches:
        he = {s: np.zeros((0, dim), np.float32) for s in SCALES}
    st: dict[str, np.ndarray] = {}
    for b in batches:
        for s, v in b.st.items():
            arr = st.setdefault(s, np.full((done, v.shape[1]), np.nan, np.float32))
            arr[b.start : b.start + v.shape[0]] = v
    cell_st: dict[str, list[np.ndarray]] = {}
    for b in batches:
        for s, v in b.cell_st.items():
            cell_st.setdefault(s, []).append(v)

    def cat(name: str, dtype: type) -> np.ndarray:
        parts = [getattr(b, name) for b in batches]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return TileEmbeddings(
        indices=idx[:done],
        tile_ids=[grid.tile_ids[int(i)] for i in idx[:done]],
        he=he,
        st=st,
        valid=cat("valid", bool),
        n_cells=cat("n_cells", np.int64),
        cell_index=cat("cell_index", np.int64),
        cell_tile=cat("cell_tile", np.int64),
        cell_st={s: np.concatenate(v) for s, v in cell_st.items()},
        complete=done == idx.size,
    )


def iter_embed_batches(
    model: Any,
    paired: PairedSlide,
    grid: TileGrid,
    *,
    featurizer: NodeFeaturizer | None = None,
    settings: GraphSettings | None = None,
    indices: np.ndarray | None = None,
    batch_size: int = 8,
    device: Any = None,
    cells: bool = True,
    cancel: CancelLike = None,
    progress: Callable[[int, int], None] | None = None,
    chunk_tiles: int = 512,
) -> Iterator[EmbedBatch]:
    """Encode tiles of ``grid`` with both encoders of ``model``, one batch at a time.

    Every tile gets HE embeddings at the three scales; tiles with at least ``min_cells``
    cells also get ST embeddings and their cells node embeddings per scale. Cell graphs
    are built ``chunk_tiles`` tiles at a time and node features once, so what is held
    grows with the slide's cells, not with its area.

    Parameters
    ----------
    model
        A :class:`~napari_sigmma.models.sigmma.SigmmaModel`.
    paired, grid
        The slide and its tile grid.
    featurizer
        Node-feature transform saved with the model; ``None`` skips the ST side.
    settings
        Cell-graph settings (as in training; default
        :class:`~napari_sigmma.tiles.dataset.GraphSettings`).
    indices
        Tiles to encode, in this order (default: all).
    batch_size
        Tiles per forward.
    device
        Torch device or name (default: the model's device).
    cells
        Also return per-cell node embeddings.
    cancel
        Event or callable checked between batches; the generator then stops early.
    progress
        ``progress(done, total)`` after each batch.
    chunk_tiles
        Tiles whose cell graphs are prepared together.
    """
    import torch

    from napari_sigmma.device import resolve_device
    from napari_sigmma.io import release_thread_dask_pool
    from napari_sigmma.tiles.dataset import GraphSettings, prepare_slide

    settings = settings or GraphSettings()
    if device is None:
        device = next(model.parameters()).device
    elif not isinstance(device, torch.device):
        device = resolve_device(str(device))
    idx = tile_indices(grid, indices)
    batch_size = max(1, int(batch_size))
    chunk = max(batch_size, int(chunk_tiles) // batch_size * batch_size)
    use_st = featurizer is not None and paired.n_cells > 0
    node_x = counts = None

    was_training = model.training
    model.eval()
    level = paired.image.best_level(grid.target_mpp)
    held = level not in paired.image._memory and paired.image.hold_level(level)
    try:
        with torch.no_grad():
            for c0 in range(0, idx.size, chunk):
                sub = grid.subset(idx[c0 : c0 + chunk])
                slide = prepare_slide(paired, grid=sub, settings=settings)
                if use_st:
                    if node_x is None:
                        node_x = featurizer.features(paired)  # type: ignore[union-attr]
                        counts = slide.aligned_counts(featurizer)  # type: ignore[arg-type]
                    slide.set_features(featurizer, node_x=node_x, counts=counts)  # type: ignore[arg-type]
                for b0 in range(0, len(sub), batch_size):
                    if is_cancelled(cancel):
                        return
                    pos = np.arange(b0, min(b0 + batch_size, len(sub)))
                    yield _embed_one_batch(
                        model, slide, pos, idx[c0 : c0 + chunk], c0, device, use_st, cells
                    )
                    if progress is not None:
                        progress(c0 + int(pos[-1]) + 1, int(idx.size))
    finally:
        if held:
            paired.image.release(level)
        model.train(was_training)
        # tile reads computed dask arrays: free the pool dask keeps for this (worker) thread
        release_thread_dask_pool()


def _embed_one_batch(
    model: Any,
    slide: SlideTiles,
    pos: np.ndarray,
    chunk_indices: np.ndarray,
    offset: int,
    device: Any,
    use_st: bool,
    cells: bool,
) -> EmbedBatch:
    """Both encoders on the tiles ``pos`` of the chunk ``slide`` (run positions ``offset + pos``;
    grid indices ``chunk_indices[pos]``)."""
    import torch
    from torch_geometric.data import Batch

    from napari_sigmma.device import autocast
    from napari_sigmma.tiles.grid import read_tile

    imgs = np.stack([read_tile(slide.paired, slide.grid, int(p)) for p in pos])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().to(device)
    with autocast(device):
        img = model.encode_image(x)
    he = {s: img[s].float().cpu().numpy() for s in SCALES if s in img}
    tc = [slide.cells[int(p)] for p in pos]
    valid = np.array([c.valid for c in tc], dtype=bool) & use_st
    st: dict[str, np.ndarray] = {}
    cell_st: dict[str, np.ndarray] = {}
    cell_index = np.zeros(0, np.int64)
    cell_tile = np.zeros(0, np.int64)
    vpos = [int(p) for p, ok in zip(pos, valid, strict=True) if ok]
    if vpos:
        gb = Batch.from_data_list([slide.tile_data(p, index=p) for p in vpos]).to(device)
        with autocast(device):
            out = model.encode_graph(gb)
        rows = np.flatnonzero(valid)
        for s, v in out.emb.items():
            block = np.full((pos.size, v.shape[1]), np.nan, np.float32)
            block[rows] = v.float().cpu().numpy()
            st[s] = block
        if cells and out.nodes:
            cell_index = np.concatenate([slide.cells[p].cells for p in vpos]).astype(np.int64)
            cell_tile = np.concatenate(
                [np.full(slide.cells[p].n_cells, offset + p, np.int64) for p in vpos]
            )
            cell_st = {s: v.float().cpu().numpy() for s, v in out.nodes.items()}
    return EmbedBatch(
        start=offset + int(pos[0]),
        indices=np.asarray(chunk_indices[pos], dtype=np.int64),
        he=he,
        st=st,
        valid=valid,
        n_cells=np.array([c.n_cells for c in tc], dtype=np.int64),
        cell_index=cell_index,
        cell_tile=cell_tile,
        cell_st=cell_st,
    )


def embeddings_to_sdata(
    emb: TileEmbeddings,
    paired: PairedSlide,
    grid: TileGrid,
    *,
    suffix: str = "",
    attrs: dict[str, Any] | None = None,
) -> Any:
    """SpatialData with tile squares + ``tile_embeddings`` and cell circles + ``cell_embeddings``.

    Parameters
    ----------
    suffix
        Appended to element names (``"tiles" + suffix``) when several slides share a store.
    attrs
        Provenance stored in ``uns["sigmma"]`` of both tables (checkpoint, config, …).
    """
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import spatialdata as sd
    from shapely.geometry import box
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Affine

    to_global = Affine(paired.he_to_global, input_axes=("x", "y"), output_axes=("x", "y"))
    tiles_key, cells_key = f"tiles{suffix}", f"cells{suffix}"
    b = grid.bounds[emb.indices]
    ids = list(emb.tile_ids)
    n = len(ids)
    # integer index (napari-spatialdata needs it), the tile id kept as a column
    gdf = gpd.GeoDataFrame(
        {"tile_id": ids},
        geometry=[box(x0, y0, x1, y1) for x0, y0, x1, y1 in b],
        index=pd.RangeIndex(n),
    )
    shapes = {tiles_key: ShapesModel.parse(gdf, transformations={"global": to_global})}
    obs = pd.DataFrame(
        {
            INSTANCE_KEY: np.arange(n, dtype=np.int64),
            "tile_id": ids,
            "slide": pd.Categorical([paired.name] * n),
            "row": grid.rows[emb.indices],
            "col": grid.cols[emb.indices],
            "n_cells": emb.n_cells,
            "valid": emb.valid,
            "region": pd.Categorical([tiles_key] * n),
        },
        index=pd.Index([f"{paired.name}:{t}" for t in ids]),
    )
    table = ad.AnnData(obs=obs)
    for s, v in emb.he.items():
        table.obsm[f"he_{s}"] = l2_rows(v)
    for s, v in emb.st.items():
        table.obsm[f"st_{s}"] = l2_rows(v)
    table.obsm["spatial"] = np.c_[(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2]
    meta = {
        "he_mpp": float(paired.he_mpp),
        "tile_px": int(grid.tile_px),
        "target_mpp": float(grid.target_mpp),
        "coordinates": "H&E level-0 pixels",
        "embedding_norm": EMBEDDING_NORM,
        "he_to_global": np.asarray(paired.he_to_global, dtype=np.float64).tolist(),
        **(attrs or {}),
    }
    if "source" not in meta and paired.source:
        meta["source"] = str(paired.source)
    table.uns["sigmma"] = meta
    tables = {
        f"tile_embeddings{suffix}": TableModel.parse(
            table, region=tiles_key, region_key="region", instance_key=INSTANCE_KEY
        )
    }
    if emb.cell_index.size and emb.cell_st:
        xy = paired.cells_px[emb.cell_index]
        cids = [str(c) for c in np.asarray(paired.cell_ids)[emb.cell_index]]
        m = len(cids)
        radius = 5.0 / paired.he_mpp  # ~ a cell (5 µm) in H&E pixels
        circles = ShapesModel.parse(
            xy,
            geometry=0,
            radius=np.full(m, radius),
            index=pd.RangeIndex(m),
            transformations={"global": to_global},
        )
        circles["cell_id"] = cids
        shapes[cells_key] = circles
        cobs = pd.DataFrame(
            {
                INSTANCE_KEY: np.arange(m, dtype=np.int64),
                "cell_id": cids,
                "tile_id": [ids[int(t)] for t in emb.cell_tile],
                "region": pd.Categorical([cells_key] * m),
            },
            index=pd.Index([f"{paired.name}:{c}" for c in cids]),
        )
        if "cell_type" in paired.obs:
            cobs["cell_type"] = pd.Categorical(
                np.asarray(paired.obs["cell_type"].astype(str))[emb.cell_index]
            )
        ctab = ad.AnnData(obs=cobs)
        for s, v in emb.cell_st.items():
            ctab.obsm[f"st_{s}"] = l2_rows(v)
        ctab.obsm["spatial"] = xy
        ctab.uns["sigmma"] = dict(meta)
        tables[f"cell_embeddings{suffix}"] = TableModel.parse(
            ctab, region=cells_key, region_key="region", instance_key=INSTANCE_KEY
        )
    return sd.SpatialData(shapes=shapes, tables=tables)


def l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32 (NaN rows stay NaN, zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        return x
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32, copy=False)
