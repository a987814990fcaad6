"""Small in-memory SpatialData objects in the canonical layout, for the tile-layer tests.

The H&E image is a real multiscale ``Image2DModel`` (dask pyramid) with a known affine to
``global``; cells are a real ``TableModel`` table and ``cell_circles`` shapes with
``Scale(1/pixel_size)``, exactly as spatialdata-io builds them. Cell positions are chosen in
H&E pixels and converted to µm through the transforms, so tests know the truth.
"""

from __future__ import annotations

import numpy as np

PIXEL_SIZE = 0.2125  # µm per morphology ("global") pixel, as on Xenium


def he_to_global_affine(he_mpp: float, angle_deg: float = 0.0, t=(0.0, 0.0)) -> np.ndarray:
    """Similarity H&E px → global (morphology px) giving ``he_mpp`` µm per H&E px."""
    s = he_mpp / PIXEL_SIZE
    a = np.deg2rad(angle_deg)
    return np.array(
        [
            [s * np.cos(a), -s * np.sin(a), t[0]],
            [s * np.sin(a), s * np.cos(a), t[1]],
            [0.0, 0.0, 1.0],
        ]
    )


def make_image(h: int, w: int, tissue: tuple[int, int, int, int] | None, seed: int = 0):
    """White glass with a pink, textured tissue rectangle (x0, y0, x1, y1) in level-0 px."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 242, dtype=np.uint8)
    img += rng.integers(0, 6, (h, w, 1), dtype=np.uint8)
    if tissue is not None:
        x0, y0, x1, y1 = tissue
        hh, ww = y1 - y0, x1 - x0
        base = np.array([214, 120, 178], dtype=np.int16)
        noise = rng.integers(-25, 25, (hh, ww, 1), dtype=np.int16)
        img[y0:y1, x0:x1] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return img


def make_sdata(
    *,
    h: int = 700,
    w: int = 900,
    he_mpp: float = 0.25,
    angle_deg: float = 0.0,
    translate=(0.0, 0.0),
    tissue: tuple[int, int, int, int] | None = None,
    cells_px: np.ndarray | None = None,
    n_genes: int = 12,
    seed: int = 0,
    image: np.ndarray | None = None,
    with_uns_matrix: bool = False,
):
    """Build a canonical SpatialData: ``he_image`` (3 scales), ``table``, ``cell_circles``.

    Returns ``(sdata, cells_px, um_to_he)``: the cell centroids in H&E level-0 px that the
    µm positions were made from, and the true µm → H&E px matrix.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Affine, Scale

    rng = np.random.default_rng(seed)
    if tissue is None:
        tissue = (0, 0, w, h)
    if image is None:
        image = make_image(h, w, tissue, seed)
    A = he_to_global_affine(he_mpp, angle_deg, translate)
    img_el = Image2DModel.parse(
        image.transpose(2, 0, 1),
        dims=("c", "y", "x"),
        scale_factors=[2, 2],
        chunks=(3, 256, 256),
        transformations={"global": Affine(A, input_axes=("x", "y"), output_axes=("x", "y"))},
    )
    if cells_px is None:
        x0, y0, x1, y1 = tissue
        n = 300
        cells_px = np.c_[rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)]
    cells_px = np.asarray(cells_px, dtype=np.float64)
    n = cells_px.shape[0]
    um_to_global = np.diag([1 / PIXEL_SIZE, 1 / PIXEL_SIZE, 1.0])
    um_to_he = np.linalg.inv(A) @ um_to_global
    he_to_um = np.linalg.inv(um_to_he)
    xy_um = (np.c_[cells_px, np.ones(n)] @ he_to_um.T)[:, :2]
    ids = [f"cell{i}" for i in range(n)]
    circles = ShapesModel.parse(
        xy_um,
        geometry=0,
        radius=np.full(n, 5.0),
        index=pd.Index(ids),
        transformations={"global": Scale([1 / PIXEL_SIZE, 1 / PIXEL_SIZE], axes=("x", "y"))},
    )
    # Two cell types by position (left / right half of the tissue) with distinct programs.
    ctype = (cells_px[:, 0] > np.median(cells_px[:, 0])).astype(int) if n else np.zeros(0, int)
    rates = np.where(
        ctype[:, None] == 0, np.linspace(5, 0.5, n_genes), np.linspace(0.5, 5, n_genes)
    )
    counts = rng.poisson(rates).astype(np.float32) if n else np.zeros((0, n_genes), np.float32)
    obs = pd.DataFrame(
        {
            "cell_id": ids,
            "region": pd.Categorical(["cell_circles"] * n),
            "cell_type": pd.Categorical(np.array(["A", "B"])[ctype]),
        },
        index=[str(i) for i in range(n)],
    )
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=obs,
        var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]),
    )
    adata.obsm["spatial"] = xy_um
    adata.obsm["my_latent"] = rng.normal(size=(n, 5)).astype(np.float32)
    if with_uns_matrix:
        adata.uns["sigmma"] = {"um_to_he_px": um_to_he.tolist()}
    table = TableModel.parse(
        adata, region="cell_circles", region_key="region", instance_key="cell_id"
    )
    sdata = sd.SpatialData(
        images={"he_image": img_el}, shapes={"cell_circles": circles}, tables={"table": table}
    )
    return sdata, cells_px, um_to_he
