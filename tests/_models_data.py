"""Small synthetic cell-graph tiles for the models tests (real PyG objects, no mocks)."""

from __future__ import annotations


def make_tile(n: int, *, n_features: int = 8, n_genes: int = 12, k: int = 4, seed: int = 0):
    """A tile with ``n`` random cells: kNN proximity edges (both directions), tile-local
    ``pos`` in [0, 1), ``micro`` / ``meso`` labels as the tiles layer defines them. Node
    features are noise around a tile-specific mean (tiles differ in composition, as real
    ones do; i.i.d. tiles would pool to nearly the same vector)."""
    import torch
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 2, generator=g) * 0.999
    d = torch.cdist(pos, pos)
    d.fill_diagonal_(float("inf"))
    nb = d.topk(min(k, n - 1), largest=False).indices
    src = torch.arange(n).repeat_interleave(nb.shape[1])
    ei = torch.stack([src, nb.reshape(-1)])
    ei = torch.unique(torch.cat([ei, ei.flip(0)], dim=1), dim=1)
    micro = 4 * torch.floor(4 * pos[:, 1]).long() + torch.floor(4 * pos[:, 0]).long()
    meso = 2 * torch.floor(2 * pos[:, 1]).long() + torch.floor(2 * pos[:, 0]).long()
    return Data(
        x=torch.randn(n, n_features, generator=g) + 1.5 * torch.randn(1, n_features, generator=g),
        edge_index=ei,
        pos=pos,
        micro=micro,
        meso=meso,
        genevec=torch.rand(1, n_genes, generator=g),
        tile_index=seed,
    )


def make_batch(sizes=(40, 25, 60), **kw):
    from torch_geometric.data import Batch

    return Batch.from_data_list([make_tile(n, seed=i, **kw) for i, n in enumerate(sizes)])


def one_thread():
    """Generator for a module-scoped fixture: run with one intra-op thread, then restore.

    The graph ops are tiny; on a shared 2-core machine a second thread only adds spin-waits
    (measured: 22 ms vs 170 ms per graph-encoder step)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
