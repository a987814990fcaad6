"""In-memory data and models for ``bench --gpu``: no files, no SpatialData, no dask.

The H&E comes from :class:`napari_sigmma.samples.synthetic.SyntheticTissue` rendered into
a numpy array, the cells and their counts from the same generator
(:func:`~napari_sigmma.samples.synthetic.simulate_expression`), and the slide is wrapped
by :meth:`napari_sigmma.tiles.paired.PairedSlide.from_arrays`. Everything the GPU bench
exercises therefore runs on a machine with only a stock GPU Python image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_sigmma.tiles.dataset import SlideTiles
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.paired import PairedSlide

# cells are drawn as nuclei; their cell area (for library sizes) grows each semi-axis by this
_CYTOPLASM_UM = 2.5


def synthetic_paired(
    size: int = 1024, *, seed: int = 0, mpp: float = 0.5, name: str = "synthetic"
) -> PairedSlide:
    """A synthetic paired slide of ``size`` × ``size`` px held in memory.

    The H&E is rendered exactly (about 0.25 s of CPU per 512 px block); cells, types and
    counts are those of the generator (seeded by ``seed``).
    """
    from napari_sigmma.samples.synthetic import SyntheticTissue, simulate_expression
    from napari_sigmma.tiles.paired import PairedSlide

    tissue = SyntheticTissue(int(size), seed=int(seed), mpp=float(mpp))
    img = np.empty((size, size, 3), dtype=np.uint8)
    block = 512
    for y in range(0, size, block):
        for x in range(0, size, block):
            h, w = min(block, size - y), min(block, size - x)
            img[y : y + h, x : x + w] = tissue.render(y, x, h, w)
    cells = tissue.all_cells()
    xy_um = np.column_stack([cells.x, cells.y])
    area = math.pi * (cells.a + _CYTOPLASM_UM) * (cells.b + _CYTOPLASM_UM)
    rng = np.random.default_rng([int(seed), 1])
    counts, features = simulate_expression(cells, xy_um, area, tissue.side_um, rng)
    return PairedSlide.from_arrays(
        img,
        float(mpp),
        xy_um / float(mpp),
        counts,
        [str(g) for g in features["name"]],
        name=name,
    )


@dataclass
class BenchData:
    """One prepared synthetic slide: tiles, graphs, node features, tile images."""

    slide: SlideTiles
    featurizer: NodeFeaturizer
    valid: np.ndarray  # grid indices of the tiles with a cell graph

    @property
    def paired(self) -> PairedSlide:
        return self.slide.paired

    @property
    def grid(self) -> Any:
        return self.slide.grid

    def images(self, indices: Any) -> np.ndarray:
        """``(n, S, S, 3)`` uint8 tiles."""
        return self.slide.images[np.asarray(indices, dtype=np.int64)]

    def graphs(self, indices: Any) -> Any:
        """PyG ``Batch`` of the tiles' cell graphs (node features set)."""
        from torch_geometric.data import Batch

        return Batch.from_data_list(
            [self.slide.tile_data(int(i), index=k) for k, i in enumerate(indices)]
        )

    def tiles(self, n: int) -> np.ndarray:
        """``n`` valid tile indices (cycling when there are fewer)."""
        return np.resize(self.valid, int(n))


def bench_data(size: int = 1024, *, seed: int = 0, n_features: int = 32) -> BenchData:
    """The synthetic slide tiled at 256 px / 0.5 µm/px with graphs and PCA node features."""
    from napari_sigmma.tiles.dataset import prepare_slide
    from napari_sigmma.tiles.features import NodeFeaturizer, align_counts

    paired = synthetic_paired(size, seed=seed)
    st = prepare_slide(paired, tile_px=256, target_mpp=0.5, min_tissue=0.0)
    valid = np.flatnonzero(st.valid)
    if valid.size < 2:
        from napari_sigmma.errors import SigmmaError

        raise SigmmaError(f"the {size} px synthetic slide has {valid.size} tiles with graphs")
    from napari_sigmma.constants import is_control

    genes = [g for g in paired.genes if not is_control(g)]
    feat = NodeFeaturizer.fit_pca(
        align_counts(paired.counts, paired.genes, genes), genes, n_components=n_features
    )
    st.set_features(feat)
    st.load_images()
    return BenchData(slide=st, featurizer=feat, valid=valid)
