"""Node features (PCA, obsm), gene vectors, pre-extracted tiles, the paired-tile dataset."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from _tiles_data import make_sdata
from napari_sigmma.errors import SigmmaError
from napari_sigmma.tiles.dataset import (
    GraphSettings,
    PairedTileDataset,
    collate_paired,
    make_loader,
    prepare_slide,
)
from napari_sigmma.tiles.features import (
    NodeFeaturizer,
    align_counts,
    normalize_log1p,
    tile_gene_vectors,
)
from napari_sigmma.tiles.paired import PairedSlide


@pytest.fixture(scope="module")
def slide():
    # 0.25 µm/px, 1024 × 1536: 2 × 3 tiles of 512 level-0 px (256 px at 0.5 µm/px).
    rng = np.random.default_rng(4)
    pts = np.c_[rng.uniform(0, 1536, 500), rng.uniform(0, 1024, 500)]
    pts = pts[~((pts[:, 0] > 1024) & (pts[:, 1] > 512))]  # tile (1, 2) is left empty
    sdata, _, _ = make_sdata(h=1024, w=1536, he_mpp=0.25, cells_px=pts, seed=4)
    return PairedSlide.from_sdata(sdata, name="s", node_obsm="my_latent")


def test_pca_features_match_a_reference_and_round_trip(slide, tmp_path):
    from sklearn.decomposition import PCA

    train = np.arange(slide.n_cells // 2)
    f = NodeFeaturizer.fit_pca(slide.counts[train], slide.genes, n_components=64)
    assert f.n_features == 12  # capped at min(n_cells - 1, n_genes)
    totals = np.asarray(slide.counts[train].sum(axis=1)).ravel()
    assert f.target_sum == pytest.approx(np.median(totals))
    L = normalize_log1p(slide.counts, f.target_sum)
    np.testing.assert_allclose(np.expm1(L.toarray()).sum(axis=1), f.target_sum, rtol=1e-6)
    ref = PCA(n_components=5, svd_solver="full").fit(L[train].toarray())
    ours = f.transform_counts(slide.counts)
    want = ref.transform(L.toarray())
    # Same subspace up to each component's sign.
    for k in range(5):
        c = np.corrcoef(ours[:, k], want[:, k])[0, 1]
        assert abs(c) > 0.999
    f.save(tmp_path / "feat.npz")
    back = NodeFeaturizer.load(tmp_path / "feat.npz")
    np.testing.assert_array_equal(back.transform_counts(slide.counts), ours)
    arrays = f.to_arrays()
    assert set(arrays) >= {"mean", "components", "genes", "target_sum"}
    np.testing.assert_array_equal(NodeFeaturizer.from_arrays(arrays).components, f.components)
    # Another slide with the genes in another order gives the same features.
    perm = np.random.default_rng(0).permutation(len(slide.genes))
    shuffled = sp.csr_matrix(slide.counts)[:, perm]
    np.testing.assert_allclose(
        f.transform_counts(shuffled, [slide.genes[j] for j in perm]), ours, atol=1e-5
    )


def test_align_counts_fills_missing_genes_with_zero():
    X = sp.csr_matrix(np.array([[1.0, 2.0, 3.0]]))
    out = align_counts(X, ["a", "b", "c"], ["c", "x", "a"])
    np.testing.assert_array_equal(out.toarray(), [[3.0, 0.0, 1.0]])


def test_obsm_features_are_taken_as_given(slide):
    f = NodeFeaturizer.from_obsm("my_latent", 5, slide.genes)
    np.testing.assert_array_equal(f.features(slide), slide.node_features)
    bad = NodeFeaturizer.from_obsm("my_latent", 7, slide.genes)
    with pytest.raises(SigmmaError, match="7"):
        bad.features(slide)


def test_tile_gene_vectors():
    X = sp.csr_matrix(np.array([[1.0, 3.0], [2.0, 2.0], [0.0, 0.0]]))
    gv = tile_gene_vectors(X, [np.array([0, 1]), np.array([], dtype=np.int64)], 4.0)
    np.testing.assert_allclose(gv[0], np.log1p([(1 + 2) / 2, (3 + 2) / 2]), rtol=1e-6)
    np.testing.assert_array_equal(gv[1], [0, 0])


def test_dataset_items_and_collate(slide, tmp_path):
    st = prepare_slide(slide, min_tissue=0, settings=GraphSettings(min_cells=3))
    assert len(st.grid) == 6
    valid = st.valid
    assert valid.sum() == 5 and not valid[st.grid.index_of(1, 2)]
    imgs = st.load_images(tmp_path)
    assert imgs.shape == (6, 256, 256, 3) and imgs.dtype == np.uint8
    cached = list(tmp_path.glob("tiles_*.npy"))
    assert len(cached) == 1
    # A second slide object re-reads from the cache, not the pyramid.
    st2 = prepare_slide(slide, min_tissue=0)
    np.testing.assert_array_equal(st2.load_images(tmp_path), imgs)

    f = NodeFeaturizer.fit_pca(slide.counts, slide.genes, n_components=8)
    st.set_features(f)
    entries = [(0, int(t)) for t in np.flatnonzero(valid)]
    ds = PairedTileDataset([st], entries)
    assert len(ds) == 5
    img, data = ds[2]
    assert img.shape == (3, 256, 256) and str(img.dtype) == "torch.uint8"
    t = entries[2][1]
    n = st.cells[t].n_cells
    assert data.x.shape == (n, 8) and data.pos.shape == (n, 2)
    assert float(data.pos.min()) >= 0 and float(data.pos.max()) < 1
    assert int(data.micro.max()) < 16 and int(data.meso.max()) < 4
    assert data.genevec.shape == (1, len(slide.genes))
    assert int(data.edge_index.max()) < n
    assert int(data.tile_index) == 2
    # The image really is that tile (channels first).
    np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), imgs[t])

    images, batch, idx = collate_paired([ds[0], ds[1], ds[3]])
    assert images.shape == (3, 3, 256, 256)
    assert idx.tolist() == [0, 1, 3]
    assert batch.tile_index.tolist() == [0, 1, 3]  # ids, not offset by node counts
    assert batch.num_graphs == 3 and batch.genevec.shape == (3, len(slide.genes))
    sizes = [ds[k][1].num_nodes for k in (0, 1, 3)]
    assert batch.x.shape[0] == sum(sizes)
    assert int(batch.edge_index.max()) < sum(sizes)

    for workers in (0, 1):
        loader = make_loader(ds, [[4, 0], [1, 2, 3]], num_workers=workers)
        got = [b[2].tolist() for b in loader]
        assert got == [[4, 0], [1, 2, 3]]

    with pytest.raises(SigmmaError, match="fewer than 3 cells"):
        PairedTileDataset([st], [(0, st.grid.index_of(1, 2))])

    feats = [np.random.default_rng(0).random((6, 21, 16)).astype(np.float32)]
    fds = PairedTileDataset([st], entries, crop_features=feats)
    x, _ = fds[1]
    assert tuple(x.shape) == (21, 16)
    fx, _, _ = collate_paired([fds[0], fds[1]])
    assert tuple(fx.shape) == (2, 21, 16)
