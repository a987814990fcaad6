"""Paired tiles as a torch ``Dataset``: an H&E tile image and its cell graph.

Per slide, :func:`prepare_slide` builds the grid and the per-tile cells/graphs once;
:meth:`SlideTiles.load_images` pre-extracts every tile image into memory (and an optional
``.npy`` cache keyed by the slide's content hash and the grid), so epochs never re-read
the slide; :meth:`SlideTiles.set_features` computes node features with a fitted
:class:`~napari_sigmma.tiles.features.NodeFeaturizer`.

:class:`PairedTileDataset` serves ``(image uint8 (3, S, S), TileData)`` pairs — or
``(crop features (21, C), TileData)`` when a frozen backbone's features were cached — and
:func:`collate_paired` batches them to ``(images (B, 3, S, S), Batch, tile indices (B,))``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.errors import SigmmaError
from napari_sigmma.files import atomic_save_npy

if TYPE_CHECKING:
    import torch

    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.graphs import TileCells
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide


@dataclass
class GraphSettings:
    """How tile cell graphs are built (see :func:`napari_sigmma.tiles.graphs.tile_cell_graph`).

    ``micro_blocks``: G_micro is built inside each micro block (default, the paper's), or
    over the whole tile and filtered to the blocks by the encoder (runs made before).
    """

    method: str = "delaunay"
    k: int = 6
    radius_um: float = 30.0
    max_dist_um: float | None = None
    min_cells: int = 3
    micro_blocks: bool = True

    def edges(self, pos: np.ndarray, tile_um: float) -> np.ndarray:
        """G_micro ``(2, E)`` of one tile's cells at tile-local ``pos`` with these settings
        (:func:`~napari_sigmma.tiles.graphs.tile_cell_graph`)."""
        from napari_sigmma.tiles.graphs import tile_cell_graph

        return tile_cell_graph(
            pos,
            tile_um,
            method=self.method,
            k=self.k,
            radius_um=self.radius_um,
            max_dist_um=self.max_dist_um,
            micro_blocks=self.micro_blocks,
        )

    def build(
        self,
        paired: PairedSlide,
        grid: TileGrid,
        *,
        indices: np.ndarray | None = None,
        per_tile: list[np.ndarray] | None = None,
    ) -> list[TileCells]:
        """:func:`~napari_sigmma.tiles.graphs.build_tile_cells` with these settings."""
        from napari_sigmma.tiles.graphs import build_tile_cells

        return build_tile_cells(
            paired,
            grid,
            method=self.method,
            k=self.k,
            radius_um=self.radius_um,
            max_dist_um=self.max_dist_um,
            min_cells=self.min_cells,
            indices=indices,
            per_tile=per_tile,
            micro_blocks=self.micro_blocks,
        )


def tile_data(cells: TileCells, node_x: np.ndarray, genevec: np.ndarray, *, index: int) -> Any:
    """The PyG ``TileData`` of one tile: node features of its cells, its proximity graph,
    positions, patch indices and ``(1, G)`` gene vector; ``tile_index`` is ``index``."""
    import torch

    from napari_sigmma.tiles.tiledata import TileData

    return TileData(
        x=torch.from_numpy(np.ascontiguousarray(node_x[cells.cells], dtype=np.float32)),
        edge_index=torch.from_numpy(np.ascontiguousarray(cells.edge_index, dtype=np.int64)),
        pos=torch.from_numpy(np.ascontiguousarray(cells.pos, dtype=np.float32)),
        micro=torch.from_numpy(np.ascontiguousarray(cells.micro, dtype=np.int64)),
        meso=torch.from_numpy(np.ascontiguousarray(cells.meso, dtype=np.int64)),
        genevec=torch.from_numpy(np.ascontiguousarray(genevec, dtype=np.float32).reshape(1, -1)),
        tile_index=torch.tensor([index], dtype=torch.long),
        num_nodes=int(cells.cells.size),
    )


@dataclass
class SlideTiles:
    """One slide, tiled: grid, per-tile cells and graphs, and (once loaded) images/features.

    Attributes
    ----------
    paired
        The source slide.
    grid
        Tissue tiles of the slide.
    cells
        Per tile: :class:`~napari_sigmma.tiles.graphs.TileCells`.
    images
        ``(T, S, S, 3)`` uint8 after :meth:`load_images`.
    node_x
        ``(N_cells, F)`` float32 node features after :meth:`set_features`.
    genevec
        ``(T, G)`` float32 tile gene vectors after :meth:`set_features`.
    """

    paired: PairedSlide
    grid: TileGrid
    cells: list[TileCells]
    settings: GraphSettings = field(default_factory=GraphSettings)
    images: np.ndarray | None = None
    node_x: np.ndarray | None = None
    genevec: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.paired.name

    @property
    def valid(self) -> np.ndarray:
        """``(T,)`` bool: tiles with at least ``min_cells`` cells."""
        return np.array([c.valid for c in self.cells], dtype=bool)

    def grid_key(self) -> str:
        """Hash of the slide content and the grid geometry (cache key for tile data)."""
        h = hashlib.sha1()
        h.update(self.paired.content_hash().encode())
        g = self.grid
        h.update(json.dumps([g.tile_px, round(g.target_mpp, 6), round(g.slide_mpp, 6)]).encode())
        h.update(g.rows.tobytes())
        h.update(g.cols.tobytes())
        return h.hexdigest()[:16]

    def load_images(
        self, cache_dir: str | os.PathLike[str] | None = None, *, progress: Any = None
    ) -> np.ndarray:
        """Read every tile once (``(T, S, S, 3)`` uint8), via an ``.npy`` cache if given."""
        from napari_sigmma.tiles.grid import read_tiles

        if self.images is not None:
            return self.images
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"tiles_{self.grid_key()}.npy"
            if path.is_file():
                try:
                    arr = np.load(path, allow_pickle=False)
                    if arr.shape == (len(self.grid), self.grid.tile_px, self.grid.tile_px, 3):
                        self.images = arr
                        return arr
                except (OSError, ValueError):
                    pass  # unreadable cache: rebuild it below
        self.images = read_tiles(self.paired, self.grid, progress=progress)
        if path is not None:
            atomic_save_npy(path, self.images)
        return self.images

    def set_features(
        self,
        featurizer: NodeFeaturizer,
        *,
        node_x: np.ndarray | None = None,
        counts: Any = None,
    ) -> None:
        """Compute node features of all cells and the gene vector of every tile.

        ``node_x`` and ``counts`` (the slide's counts aligned to ``featurizer.genes``, from
        :meth:`aligned_counts`) may be passed in when several grids of one slide share them,
        so a slide embedded chunk by chunk featurises its cells once.
        """
        from napari_sigmma.tiles.features import tile_gene_vectors

        self.node_x = featurizer.features(self.paired) if node_x is None else node_x
        if counts is None:
            counts = self.aligned_counts(featurizer)
        self.genevec = tile_gene_vectors(
            counts, [c.cells for c in self.cells], featurizer.target_sum
        )

    def aligned_counts(self, featurizer: NodeFeaturizer) -> Any:
        """The slide's counts as CSR with the columns of ``featurizer.genes``."""
        from napari_sigmma.tiles.features import align_counts

        if self.paired.n_cells:
            return align_counts(self.paired.counts, self.paired.genes, featurizer.genes)
        import scipy.sparse as sp

        return sp.csr_matrix((0, len(featurizer.genes)), dtype=np.float32)

    def tile_data(self, i: int, *, index: int | None = None) -> Any:
        """The PyG ``TileData`` of tile ``i`` (needs :meth:`set_features` first)."""
        if self.node_x is None or self.genevec is None:
            raise RuntimeError("call set_features() before building tile graphs")
        return tile_data(
            self.cells[i], self.node_x, self.genevec[i], index=i if index is None else index
        )


def prepare_slide(
    paired: PairedSlide,
    *,
    tile_px: int = 256,
    target_mpp: float = 0.5,
    min_tissue: float = 0.25,
    settings: GraphSettings | None = None,
    grid: TileGrid | None = None,
) -> SlideTiles:
    """Grid the slide and build the cells and graph of every tissue tile."""
    from napari_sigmma.tiles.grid import make_tile_grid

    settings = settings or GraphSettings()
    if grid is None:
        grid = make_tile_grid(paired, tile_px=tile_px, target_mpp=target_mpp, min_tissue=min_tissue)
    cells = settings.build(paired, grid)
    return SlideTiles(paired=paired, grid=grid, cells=cells, settings=settings)


class PairedTileDataset:
    """Torch ``Dataset`` of paired tiles drawn from one or more :class:`SlideTiles`.

    Parameters
    ----------
    slides
        Prepared slides (images loaded unless ``crop_features`` is given, features set).
    entries
        ``(slide index, tile index)`` pairs, one per dataset item.
    crop_features
        Optional per-slide ``(T, 21, C)`` arrays of cached frozen-backbone crop features;
        when given, items carry these instead of images.

    Items are ``(image, data)``: ``image`` uint8 ``(3, S, S)`` (or float32 ``(21, C)``
    features) and ``data`` a PyG ``TileData`` whose ``tile_index`` is the item index.
    """

    def __init__(
        self,
        slides: list[SlideTiles],
        entries: list[tuple[int, int]] | np.ndarray,
        *,
        crop_features: list[np.ndarray] | None = None,
    ) -> None:
        self.slides = slides
        self.entries = np.asarray(entries, dtype=np.int64).reshape(-1, 2)
        self.crop_features = crop_features
        for s in slides:
            if s.node_x is None:
                raise SigmmaError(f"slide {s.name!r}: node features not computed")
            if crop_features is None and s.images is None:
                raise SigmmaError(f"slide {s.name!r}: tile images not loaded")
        for si, ti in self.entries:
            if not self.slides[si].cells[ti].valid:
                raise SigmmaError(
                    f"tile {self.slides[si].grid.tile_ids[ti]} of {self.slides[si].name!r} "
                    f"has fewer than {self.slides[si].settings.min_cells} cells"
                )

    def __len__(self) -> int:
        return int(self.entries.shape[0])

    def __getitem__(self, k: int) -> tuple[torch.Tensor, Any]:
        import torch

        si, ti = (int(v) for v in self.entries[k])
        slide = self.slides[si]
        if self.crop_features is not None:
            img = torch.from_numpy(np.ascontiguousarray(self.crop_features[si][ti]))
        else:
            img = torch.from_numpy(np.ascontiguousarray(slide.images[ti])).permute(2, 0, 1)  # type: ignore[index]
            img = img.contiguous()
        return img, slide.tile_data(ti, index=int(k))


def collate_paired(batch: list[tuple[Any, Any]]) -> tuple[Any, Any, Any]:
    """Batch items to ``(images (B, 3, S, S) uint8 | features (B, 21, C), Batch, (B,) long)``."""
    import torch
    from torch_geometric.data import Batch

    images = torch.stack([b[0] for b in batch])
    graphs = Batch.from_data_list([b[1] for b in batch])
    idx = torch.cat([b[1].tile_index for b in batch])
    return images, graphs, idx


def make_loader(
    dataset: PairedTileDataset,
    batches: list[list[int]],
    *,
    num_workers: int = 0,
    generator: Any = None,
    pin_memory: bool = False,
) -> Any:
    """A ``DataLoader`` over a precomputed list of index batches (deterministic order).

    ``pin_memory``: batches come in page-locked memory, so copies to a CUDA device with
    ``non_blocking=True`` overlap the compute instead of making the host wait.

    A ``DataLoader`` draws a base seed for its workers from ``generator`` — from torch's
    global RNG when none is given. A fixed private generator is used by default so that
    iterating a loader never shifts the global RNG (exact resume depends on it).
    """
    import torch
    from torch.utils.data import DataLoader

    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(0)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_paired,
        num_workers=int(num_workers),
        persistent_workers=False,
        generator=generator,
        pin_memory=bool(pin_memory),
    )
