"""The `napari-sigmma embed` store in the tools its users already have (issue 17).

One store is written once through the real CLI (a tiny model trained one epoch on the
embedded sample, then ``napari-sigmma embed``). It must open in the plugin's own reader in a
real viewer (tiles and cells over the linked H&E, coloured by cluster / cell type), in
napari-spatialdata exactly as the README says (``python -m napari_spatialdata view``), in
scanpy + squidpy (Leiden on the stored embeddings, spatial neighbourhood enrichment) and in
spatialdata-plot; its layout is what docs/INTERFACES.md promises (integer shape index,
categorical obs, unit-length embeddings, the source recorded).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from _embed_data import tiny_embedded_run


@pytest.fixture(scope="module")
def store(embedded_bundle, sigmma_cache, tmp_path_factory):
    from napari_sigmma.cli import main

    _, ckpt = tiny_embedded_run(embedded_bundle, sigmma_cache)  # shared, trained once
    out = tmp_path_factory.mktemp("ecosystem") / "emb.zarr"
    code = main(["embed", "--data", str(embedded_bundle), "--checkpoint", str(ckpt),
                 "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert code == 0
    return SimpleNamespace(path=out, bundle=embedded_bundle)


def test_store_layout_as_documented(store):
    import pandas as pd

    from napari_sigmma.io.store import is_embed_sdata, read_sdata

    sdata = read_sdata(store.path)
    assert is_embed_sdata(sdata)
    tiles = sdata.shapes["tiles"]
    tab = sdata.tables["tile_embeddings"]
    # integer index 0..n-1 (napari-spatialdata calls int() on it), the tile id a column
    assert pd.api.types.is_integer_dtype(tiles.index.dtype)
    assert list(tiles.index) == list(range(len(tiles)))
    assert tiles["tile_id"].tolist() == tab.obs["tile_id"].tolist()
    attrs = tab.uns["spatialdata_attrs"]
    assert attrs["instance_key"] == "instance_id" and attrs["region"] == "tiles"
    assert tab.obs["instance_id"].tolist() == list(tiles.index)
    assert isinstance(tab.obs["slide"].dtype, pd.CategoricalDtype)
    cells = sdata.tables["cell_embeddings"]
    assert isinstance(cells.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert len(cells.obs["cell_type"].cat.categories) > 1
    assert cells.obs["instance_id"].tolist() == list(sdata.shapes["cells"].index)
    assert sdata.shapes["cells"]["cell_id"].tolist() == cells.obs["cell_id"].tolist()
    # stored embeddings are unit length (NaN rows: tiles without an ST graph)
    assert tab.uns["sigmma"]["embedding_norm"] == "l2"
    for t, keys in ((tab, ("he_micro", "he_macro", "st_macro")), (cells, ("st_macro",))):
        for key in keys:
            x = np.asarray(t.obsm[key])
            ok = np.isfinite(x).all(axis=1)
            assert ok.sum() > 5
            np.testing.assert_allclose(np.linalg.norm(x[ok], axis=1), 1.0, atol=1e-5)
    # the H&E is linked: the source data path, absolute
    assert Path(tab.uns["sigmma"]["source"]) == Path(store.bundle).resolve()


def test_plugin_reader_opens_its_own_store(store, make_napari_viewer):
    from napari_sigmma.io.wsi import open_slide
    from napari_sigmma.io.xenium_format import HE_IMAGE_SUFFIX

    viewer = make_napari_viewer()
    layers = viewer.open(str(store.path), plugin="napari-sigmma")
    kinds = {layer.name: type(layer).__name__ for layer in layers}
    he = next(layer for layer in layers if type(layer).__name__ == "Image")
    tiles = next(layer for layer in layers if layer.name.endswith("tiles"))
    cells = next(layer for layer in layers if layer.name.endswith("cells"))
    assert he.rgb, kinds
    # the H&E shown is the bundle's own, at its pixel size
    with open_slide(next(Path(store.bundle).glob(f"*{HE_IMAGE_SUFFIX}"))) as slide:
        assert tuple(he.data[0].shape[:2]) == slide.shape
        np.testing.assert_allclose(he.scale, (slide.mpp, slide.mpp), rtol=1e-6)
    n_tiles = len(store_table(store, "tile_embeddings"))
    assert len(tiles.data) == n_tiles and tiles.features["cluster"].nunique() > 1
    np.testing.assert_allclose(tiles.scale, he.scale)
    # tiles lie on the slide, in its pixels
    h, w = he.data[0].shape[:2]
    assert (tiles.data[:, 0] > 0).all() and (tiles.data[:, 0] < h).all()
    assert (tiles.data[:, 1] > 0).all() and (tiles.data[:, 1] < w).all()
    # coloured by cluster: as many face colours as clusters
    assert (
        len({tuple(c) for c in np.round(tiles.face_color, 3)})
        == tiles.features["cluster"].nunique()
    )
    # cells coloured by the stored cell type; any other stored column is one assignment away
    assert len(cells.data) == len(store_table(store, "cell_embeddings"))
    n_types = cells.features["cell_type"].nunique()
    assert len({tuple(c) for c in np.round(cells.face_color, 3)}) == n_types > 1
    tiles.face_color = "n_cells"
    assert len({tuple(c) for c in np.round(tiles.face_color, 3)}) > 1


def store_table(store, key):
    from napari_sigmma.io.store import read_sdata

    return read_sdata(store.path).tables[key].obs


def test_napari_spatialdata_shows_the_tiles(store, make_napari_viewer, qtbot):
    """The README's command, ``python -m napari_spatialdata view STORE`` (headless here),
    then the tiles and cells added as napari-spatialdata adds them when clicked."""
    import spatialdata as sd
    from click.testing import CliRunner
    from napari_spatialdata import Interactive
    from napari_spatialdata.__main__ import cli

    viewer = make_napari_viewer()  # the current viewer: the command docks its widget here
    result = CliRunner().invoke(cli, ["view", str(store.path), "--headless"])
    assert result.exit_code == 0, result.output
    assert result.exception is None

    app = Interactive(sd.read_zarr(store.path), headless=True)
    loader = app._sdata_widget.worker_thread  # napari-spatialdata reads elements in a QThread
    for name in ("tiles", "cells"):
        app.add_element(name, "global")
        qtbot.waitUntil(
            lambda n=name: n in viewer.layers and not loader.isRunning(), timeout=120_000
        )
    tiles = viewer.layers["tiles"]
    assert type(tiles).__name__ == "Shapes"
    n = len(store_table(store, "tile_embeddings"))
    assert len(tiles.data) == n and list(tiles.metadata["indices"]) == list(range(n))
    assert tiles.metadata["adata"] is not None  # the table annotating the tiles was found
    assert len(viewer.layers["cells"].data) == len(store_table(store, "cell_embeddings"))


def test_scanpy_leiden_and_squidpy_on_the_stored_embeddings(store):
    """README: ``sc.pp.neighbors(t, use_rep="he_macro"); sc.tl.leiden(t)``; squidpy's
    spatial neighbours and neighbourhood enrichment on the same table."""
    import scanpy as sc
    import spatialdata as sd
    import squidpy as sq

    t = sd.read_zarr(store.path).tables["tile_embeddings"]
    sc.pp.neighbors(t, use_rep="he_macro", n_neighbors=8, random_state=0)
    sc.tl.leiden(t, flavor="igraph", n_iterations=2, random_state=0)
    assert t.obs["leiden"].nunique() > 1
    sq.gr.spatial_neighbors(t, spatial_key="spatial", coord_type="generic", n_neighs=6)
    sq.gr.nhood_enrichment(t, cluster_key="leiden", n_perms=20, seed=0, show_progress_bar=False)
    z = t.uns["leiden_nhood_enrichment"]["zscore"]
    assert z.shape == (t.obs["leiden"].nunique(),) * 2


def test_spatialdata_plot_renders_the_tiles(store, tmp_path):
    """README: ``sdata.pl.render_shapes("tiles", color="n_cells").pl.show()``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata as sd
    import spatialdata_plot  # noqa: F401  (registers .pl)

    sdata = sd.read_zarr(store.path)
    sdata.pl.render_shapes("tiles", color="n_cells").pl.show(coordinate_systems="global")
    fig = plt.gcf()
    fig.savefig(tmp_path / "tiles.png")
    plt.close(fig)
    assert (tmp_path / "tiles.png").stat().st_size > 1000
