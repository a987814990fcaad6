"""Topology controls: what a trained graph model retrieves when its graphs are changed at
evaluation, without retraining.

- ``shuffled``: within each test tile the cells' positions are permuted among its cells
  (each cell keeps its expression, its node features and its tile; it gets another cell's
  place), then the micro / meso blocks and the proximity graph are rebuilt with the run's
  graph settings. The tile's gene vector (and its summed expression) is unchanged, only the
  layout is destroyed. If recall does not drop, the graph encoder reads the tile as a bag
  of cells: a pseudo-bulk.
- ``no_added_edges`` / ``all_candidates`` / ``random_candidates``: the edge sampler's
  evaluation mode (:func:`napari_sigmma.models.edges.set_edge_mode`) set to ``none``,
  ``all`` and ``random`` — the last keeps each candidate with the acceptance rate training
  would have on these tiles (the mean score of each stage's candidates).

The HE side is untouched by every control, so Task 1 does not move; each control reports
Task 2 (Recall@5 %, both directions) and, on the layout benchmark, the recall among
composition-matched candidates, as per-tile hits for the paired bootstrap of
:mod:`.stats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

CONTROLS: tuple[str, ...] = ("shuffled", "no_added_edges", "all_candidates", "random_candidates")
_EDGE_MODE_OF = {"no_added_edges": "none", "all_candidates": "all", "random_candidates": "random"}


def shuffle_positions(slide: Any, tiles: Sequence[int], *, seed: int = 0) -> Any:
    """A copy of ``slide`` (a :class:`~napari_sigmma.tiles.dataset.SlideTiles`) whose
    ``tiles`` have their cells' positions permuted within the tile and their blocks and
    proximity graph rebuilt; cells, node features, gene vectors and images are shared."""
    from napari_sigmma.tiles.graphs import TileCells, patch_indices, tile_graph

    rng = np.random.default_rng(seed)
    st = slide.settings
    tile_um = slide.grid.tile_um
    cells = list(slide.cells)
    for ti in sorted({int(t) for t in tiles}):
        c = cells[ti]
        n = c.n_cells
        if n < 2:
            continue
        pos = np.asarray(c.pos, np.float64)[rng.permutation(n)]
        micro, meso = patch_indices(pos)
        ei = tile_graph(
            pos * tile_um,
            method=st.method,
            k=st.k,
            radius=st.radius_um,
            max_dist=st.max_dist_um,
        )
        cells[ti] = TileCells(
            tile=c.tile,
            cells=c.cells,
            pos=pos.astype(np.float32),
            micro=micro,
            meso=meso,
            edge_index=ei,
            valid=c.valid,
        )
    return dataclasses.replace(slide, cells=cells)


def _encode(model: Any, slides: list[Any], entries: list[tuple[int, int]], feats, device):
    from napari_sigmma.tiles.dataset import PairedTileDataset
    from napari_sigmma.train.validation import encode_entries

    ds = PairedTileDataset(slides, entries, crop_features=feats)
    return encode_entries(model, ds, device=device, batch_size=16)


def control_hits(he: np.ndarray, st: np.ndarray, groups: Sequence[Any] | None) -> dict[str, Any]:
    """Per-tile Task 2 hits (R@5 %) and, with ``groups``, composition-matched hits."""
    from napari_sigmma.evaluation.stats import group_hits, retrieval_hits

    out: dict[str, Any] = {"r5": retrieval_hits(he, st, 0.05)}
    if groups is not None:
        out["group"] = group_hits(he, st, groups)
    return out


def run_controls(
    model: Any,
    rd: Any,
    *,
    feats: list[np.ndarray],
    device: Any,
    groups: Sequence[Any] | None = None,
    controls: Sequence[str] = CONTROLS,
    sparsify: bool = True,
    seed: int = 0,
    embedding: str = "macro",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per-tile hits of the normal evaluation and of every control on the test tiles.

    Parameters
    ----------
    model
        The trained model (eval mode; its edge mode is restored afterwards).
    rd
        The run data (:class:`~napari_sigmma.train.data.RunData`), features set.
    feats
        Per-slide crop features of the test tiles (``evaluation.run.crop_features``).
    groups
        Composition group of each test tile (layout benchmark), in ``rd.entries["test"]``
        order; None elsewhere.
    sparsify
        Whether the model was trained with the edge sampler (``random_candidates`` is
        skipped otherwise: there is no acceptance rate to copy).

    Returns
    -------
    dict
        ``{"normal": hits, control: hits | {"skipped": reason}}`` with the hits of
        :func:`control_hits` (numpy arrays, for :mod:`.stats`).
    """
    from napari_sigmma.models.edges import edge_mode, get_edge_mode

    test = [tuple(e) for e in rd.entries["test"]]
    he, st = _encode(model, rd.slides, test, feats, device)
    out: dict[str, Any] = {"normal": control_hits(he[embedding], st[embedding], groups)}
    has_graph = get_edge_mode(model) is not None
    for name in controls:
        if not has_graph:
            out[name] = {"skipped": "the model has no cell graph"}
            continue
        if name == "random_candidates" and not sparsify:
            out[name] = {"skipped": "trained without sparsification: no acceptance rate"}
            continue
        if log:
            log(f"  control {name}")
        if name == "shuffled":
            by_slide: dict[int, list[int]] = {}
            for si, ti in test:
                by_slide.setdefault(si, []).append(ti)
            slides = [
                shuffle_positions(s, by_slide.get(si, []), seed=seed + si)
                for si, s in enumerate(rd.slides)
            ]
            _, st_c = _encode(model, slides, test, feats, device)
        else:
            with edge_mode(model, _EDGE_MODE_OF[name], seed=seed):
                _, st_c = _encode(model, rd.slides, test, feats, device)
        out[name] = control_hits(he[embedding], st_c[embedding], groups)
    return out
