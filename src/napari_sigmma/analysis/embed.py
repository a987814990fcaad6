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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.errors import CancelLike, SigmmaError, is_cancelled

if TYPE_CHECKING:
    from napari_sigmma.tiles.dataset import GraphSettings
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide

SCALES = ("micro", "meso", "macro")


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
    """Encode tiles of ``grid`` with both encoders of ``model``.

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
        Tiles to encode (default: all).
    batch_size
        Tiles per forward.
    device
        Torch device or name (default: the model's device).
    cells
        Also return per-cell node embeddings.
    cancel
        Event or callable checked between batches; the result then has ``complete=False``.
    progress
        ``progress(done, total)`` after each batch.
    """
    import torch
    from torch_geometric.data import Batch

    from napari_sigmma.device import autocast, resolve_device
    from napari_sigmma.io import release_thread_dask_pool
    from napari_sigmma.tiles.dataset import GraphSettings, prepare_slide
    from napari_sigmma.tiles.grid import read_tile

    settings = settings or GraphSettings()
    if device is None:
        device = next(model.parameters()).device
    elif not isinstance(device, torch.device):
        device = resolve_device(str(device))
    idx = np.arange(len(grid)) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(grid)):
        raise SigmmaError(f"tile indices out of range 0..{len(grid) - 1}")
    sub = grid.subset(idx)
    slide = prepare_slide(paired, grid=sub, settings=settings)
    use_st = featurizer is not None and paired.n_cells > 0
    if use_st:
        slide.set_features(featurizer)  # type: ignore[arg-type]

    was_training = model.training
    model.eval()
    he: dict[str, list[np.ndarray]] = {s: [] for s in SCALES}
    dim = int(getattr(model.cfg, "embed_dim", 0))
    st_rows: dict[str, np.ndarray] = {}
    cell_rows: dict[str, list[np.ndarray]] = {s: [] for s in SCALES}
    cell_index: list[np.ndarray] = []
    cell_tile: list[np.ndarray] = []
    done = 0
    complete = True
    level = paired.image.best_level(grid.target_mpp)
    held = level not in paired.image._memory and paired.image.hold_level(level)
    try:
        with torch.no_grad():
            for start in range(0, idx.size, max(1, int(batch_size))):
                if is_cancelled(cancel):
                    complete = False
                    break
                pos = np.arange(start, min(start + batch_size, idx.size))
                imgs = np.stack([read_tile(paired, sub, int(p)) for p in pos])
                x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().to(device)
                with autocast(device):
                    img = model.encode_image(x)
                for s in SCALES:
                    if s in img:
                        he[s].append(img[s].float().cpu().numpy())
                if use_st:
                    vpos = [int(p) for p in pos if slide.cells[int(p)].valid]
                    if vpos:
                        gb = Batch.from_data_list([slide.tile_data(p, index=p) for p in vpos]).to(
                            device
                        )
                        with autocast(device):
                            out = model.encode_graph(gb)
                        for s, v in out.emb.items():
                            arr = st_rows.setdefault(
                                s, np.full((idx.size, v.shape[1]), np.nan, np.float32)
                            )
                            arr[vpos] = v.float().cpu().numpy()
                        if cells and out.nodes:
                            for p in vpos:
                                cell_index.append(slide.cells[p].cells)
                                cell_tile.append(np.full(slide.cells[p].n_cells, p, np.int64))
                            for s, v in out.nodes.items():
                                cell_rows.setdefault(s, []).append(v.float().cpu().numpy())
                done = int(pos[-1]) + 1
                if progress is not None:
                    progress(done, int(idx.size))
    finally:
        if held:
            paired.image.release(level)
        model.train(was_training)
        # tile reads computed dask arrays: free the pool dask keeps for this (worker) thread
        release_thread_dask_pool()

    he_out = {s: np.concatenate(v) if v else np.zeros((0, dim), np.float32) for s, v in he.items()}
    he_out = {s: v for s, v in he_out.items() if v.shape[0] == done}
    st_out = {s: v[:done] for s, v in st_rows.items()}
    valid = np.array([c.valid for c in slide.cells[:done]], dtype=bool)
    if not use_st:
        valid[:] = False
    return TileEmbeddings(
        indices=idx[:done],
        tile_ids=[grid.tile_ids[int(i)] for i in idx[:done]],
        he=he_out,
        st=st_out,
        valid=valid,
        n_cells=np.array([c.n_cells for c in slide.cells[:done]], dtype=np.int64),
        cell_index=np.concatenate(cell_index) if cell_index else np.zeros(0, np.int64),
        cell_tile=np.concatenate(cell_tile) if cell_tile else np.zeros(0, np.int64),
        cell_st={s: np.concatenate(v) for s, v in cell_rows.items() if v},
        complete=complete,
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
    gdf = gpd.GeoDataFrame(
        geometry=[box(x0, y0, x1, y1) for x0, y0, x1, y1 in b], index=pd.Index(ids)
    )
    shapes = {tiles_key: ShapesModel.parse(gdf, transformations={"global": to_global})}
    obs = pd.DataFrame(
        {
            "tile_id": ids,
            "slide": paired.name,
            "row": grid.rows[emb.indices],
            "col": grid.cols[emb.indices],
            "n_cells": emb.n_cells,
            "valid": emb.valid,
            "region": pd.Categorical([tiles_key] * len(ids)),
        },
        index=pd.Index([f"{paired.name}:{t}" for t in ids]),
    )
    table = ad.AnnData(obs=obs)
    for s, v in emb.he.items():
        table.obsm[f"he_{s}"] = np.asarray(v, dtype=np.float32)
    for s, v in emb.st.items():
        table.obsm[f"st_{s}"] = np.asarray(v, dtype=np.float32)
    table.obsm["spatial"] = np.c_[(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2]
    meta = {
        "he_mpp": float(paired.he_mpp),
        "tile_px": int(grid.tile_px),
        "target_mpp": float(grid.target_mpp),
        "coordinates": "H&E level-0 pixels",
        **(attrs or {}),
    }
    table.uns["sigmma"] = meta
    tables = {
        f"tile_embeddings{suffix}": TableModel.parse(
            table, region=tiles_key, region_key="region", instance_key="tile_id"
        )
    }
    if emb.cell_index.size and emb.cell_st:
        xy = paired.cells_px[emb.cell_index]
        cids = [str(c) for c in np.asarray(paired.cell_ids)[emb.cell_index]]
        radius = 5.0 / paired.he_mpp  # ~ a cell (5 µm) in H&E pixels
        shapes[cells_key] = ShapesModel.parse(
            xy,
            geometry=0,
            radius=np.full(len(cids), radius),
            index=pd.Index(cids),
            transformations={"global": to_global},
        )
        cobs = pd.DataFrame(
            {
                "cell_id": cids,
                "tile_id": [ids[int(t)] for t in emb.cell_tile],
                "region": pd.Categorical([cells_key] * len(cids)),
            },
            index=pd.Index([f"{paired.name}:{c}" for c in cids]),
        )
        if "cell_type" in paired.obs:
            cobs["cell_type"] = np.asarray(paired.obs["cell_type"].astype(str))[emb.cell_index]
        ctab = ad.AnnData(obs=cobs)
        for s, v in emb.cell_st.items():
            ctab.obsm[f"st_{s}"] = np.asarray(v, dtype=np.float32)
        ctab.obsm["spatial"] = xy
        ctab.uns["sigmma"] = dict(meta)
        tables[f"cell_embeddings{suffix}"] = TableModel.parse(
            ctab, region=cells_key, region_key="region", instance_key="cell_id"
        )
    return sd.SpatialData(shapes=shapes, tables=tables)
