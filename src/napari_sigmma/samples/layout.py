"""A synthetic benchmark where the spatial layout of the cells matters.

The default synthetic sample (:mod:`.synthetic`) writes the arrangement of its cells into
their expression (neighbourhood-dependent programmes), so a tile's summed expression
already tells what its H&E shows and a cell graph cannot add anything. Here it cannot:

* the slide is cut into **composition groups** of ``group_side`` × ``group_side`` tiles
  (256 px at 0.5 µm/px, the trainer's default tile, aligned with its grid; a group covers
  whole blocks of the spatially blocked split when ``split_block`` is a multiple of
  ``group_side``, so a group lies in one split);
* every tile of a group holds **the same number of cells of each type** (its composition
  is drawn once per group) and every cell expresses the fixed programme of its type: mean
  counts = a library size drawn independently of position × the type's programme, negative
  binomial noise; no neighbourhood-dependent programme, no spill-over, no gradients and no
  dependence on cell size. So the *expected* summed expression of composition-matched
  tiles is identical;
* the tiles of a group differ in their **layout**, which the H&E shows (the structural
  cell type has its own nuclear look): ``clustered`` (the structural cells in one blob),
  ``dispersed`` (types shuffled over the sites), ``glands`` (the structural cells on the
  rims of two rings around empty lumens) and ``stripes`` (parallel bands). Each layout
  appears ``group_side² / 4`` times per group, with its own random centres, radii,
  angles and site jitter.

Cells sit on a jittered lattice (about 10.5 µm) at least 4 µm inside their tile, so the
reader assigns each cell to the tile it was placed in. The H&E is rendered by
:class:`~napari_sigmma.samples.synthetic.SyntheticTissue`'s exact renderer with stroma
everywhere (collagen background, no vessels, no fat) and the benchmark's cells.

Ground truth: ``sigmma_ground_truth.parquet`` (per cell, as the synthetic sample, plus
``tile_id``, ``layout``, ``group``) and ``sigmma_layout_tiles.parquet`` (per tile: ``tile_id``
``r{row}_c{col}``, ``row``, ``col``, ``group``, ``layout``, ``n_cells`` and one
``n_<type>`` column per cell type).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from napari_sigmma.errors import SigmmaError
from napari_sigmma.samples import simulate as sim
from napari_sigmma.samples import synthetic as syn

LAYOUTS: tuple[str, ...] = ("clustered", "dispersed", "glands", "stripes")
LAYOUT_TILES_FILE = "sigmma_layout_tiles.parquet"
TILE_PX = 256
MPP = 0.5
TILE_UM = TILE_PX * MPP
#: lattice of candidate sites per tile: 12 × 12 sites from 6 to 122 µm, jitter ± 2 µm
_SITES = 12
_SITE_LO, _SITE_HI, _JITTER = 6.0, 122.0, 2.0
#: structural types (with their own nuclear look) and the types that fill the rest
_STRUCTURAL = ("tumour_a", "epithelial")
_FILLERS = ("fibroblast", "t_cell", "macrophage", "neutrophil")
_LIB_LOG_MEAN, _LIB_LOG_SD = math.log(160.0), 0.4
_S_LAYOUT = 40  # hash stream of the layout draws


class LayoutTissue(syn.SyntheticTissue):
    """Stroma everywhere (no vessels, fat or other domains) and the given cells."""

    def __init__(self, size: int, cells: syn.CellSet, *, seed: int = 0) -> None:
        super().__init__(size, seed=seed, mpp=MPP)
        self._all = cells

    def domain_of(self, f: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        d = np.full(np.shape(f["tumour"]), syn._D["stroma"], np.int8)
        return d, np.zeros(d.shape, bool)

    def vessels(self, x0: float, y0: float, x1: float, y1: float) -> dict[str, np.ndarray]:
        z = np.zeros(0)
        return {"x": z, "y": z, "r": z, "i": z.astype(np.int64), "j": z.astype(np.int64)}

    def cells(self, x0: float, y0: float, x1: float, y1: float) -> syn.CellSet:
        c = self._all
        sel = (c.x >= x0) & (c.x < x1) & (c.y >= y0) & (c.y < y1)
        return c.take(np.flatnonzero(sel))


def group_compositions(n_groups: int, rng: np.random.Generator) -> list[dict[str, int]]:
    """Cell counts per type of each composition group (one structural type, 2-3 fillers)."""
    out = []
    for _ in range(n_groups):
        n = int(rng.integers(70, 111))
        a = _STRUCTURAL[int(rng.integers(len(_STRUCTURAL)))]
        n_a = round(n * rng.uniform(0.30, 0.55))
        k = int(rng.integers(2, 4))
        fill = list(rng.choice(_FILLERS, size=k, replace=False))
        w = rng.dirichlet(np.full(k, 2.0))
        rest = n - n_a
        cnt = np.floor(w * rest).astype(int)
        cnt[: rest - cnt.sum()] += 1
        comp = {a: n_a}
        comp.update({str(t): int(c) for t, c in zip(fill, cnt, strict=True) if c > 0})
        out.append(comp)
    return out


def _sites(seed: int, tile: int) -> np.ndarray:
    """``(144, 2)`` jittered lattice sites (tile-local µm) of one tile."""
    g = np.linspace(_SITE_LO, _SITE_HI, _SITES)
    xx, yy = np.meshgrid(g, g)
    k = np.arange(xx.size)
    jx = (sim.hash_uniform(seed, _S_LAYOUT, tile, k, 0) - 0.5) * 2 * _JITTER
    jy = (sim.hash_uniform(seed, _S_LAYOUT, tile, k, 1) - 0.5) * 2 * _JITTER
    return np.column_stack([xx.ravel() + jx, yy.ravel() + jy])


def arrange_tile(
    layout: str, comp: dict[str, int], rng: np.random.Generator, sites: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (tile-local µm) and type names of one tile's cells.

    The first entry of ``comp`` is the structural type: the layout decides which sites it
    takes (lowest "distance to the structure"); the other types fill the remaining chosen
    sites at random. Every layout places exactly ``comp``'s counts.
    """
    n = sum(comp.values())
    names = list(comp)
    n_a = comp[names[0]]
    avail = np.ones(len(sites), bool)
    c = TILE_UM / 2
    if layout == "glands":
        # two lumens, far enough apart; no cell inside a lumen
        r = rng.uniform(18.0, 24.0)
        for _ in range(100):
            cen = rng.uniform(r + 8.0, TILE_UM - r - 8.0, size=(2, 2))
            if np.linalg.norm(cen[0] - cen[1]) > 2 * r + 10.0:
                break
        d = np.linalg.norm(sites[:, None, :] - cen[None], axis=2)
        avail &= (d > r - 6.0).all(axis=1)
        score = np.abs(d - r).min(axis=1)
    elif layout == "clustered":
        cen = rng.uniform(c - 30.0, c + 30.0, size=2)
        score = np.linalg.norm(sites - cen, axis=1)
    elif layout == "stripes":
        th = rng.uniform(0, np.pi)
        period = TILE_UM / 2
        u = sites @ np.array([np.cos(th), np.sin(th)]) + rng.uniform(0, period)
        score = np.abs(np.mod(u, period) - period / 2)
    elif layout == "dispersed":
        score = rng.random(len(sites))
    else:
        raise SigmmaError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    idx = np.flatnonzero(avail)
    if idx.size < n:
        raise SigmmaError(f"{n} cells do not fit on the {idx.size} free sites of a tile")
    chosen = rng.choice(idx, size=n, replace=False)
    order = chosen[np.argsort(score[chosen] + 1e-6 * rng.random(n), kind="stable")]
    types = np.empty(n, dtype=object)
    types[:n_a] = names[0]
    rest = np.repeat(names[1:], [comp[t] for t in names[1:]])
    types[n_a:] = rng.permutation(rest)
    return sites[order], types


def layout_programs(seed: int) -> np.ndarray:
    """``(types, genes)`` expression proportions of the benchmark (rows sum to 1)."""
    rng = np.random.default_rng([seed, 11])
    return sim.program_matrix(
        list(syn.GENES), syn.CELL_TYPES, syn._PROGRAMS, baseline=0.02, rng=rng
    )


def expected_tile_expression(types: np.ndarray, programs: np.ndarray) -> np.ndarray:
    """Expected summed counts of a tile's genes given its cells' type indices."""
    lib = math.exp(_LIB_LOG_MEAN + _LIB_LOG_SD**2 / 2)
    return lib * np.bincount(types, minlength=programs.shape[0]) @ programs


def build_layout_cells(
    n_side: int, *, group_side: int = 4, seed: int = 0
) -> tuple[syn.CellSet, pd.DataFrame, np.ndarray]:
    """Cells of an ``n_side`` × ``n_side``-tile slide (``n_side`` a multiple of
    ``group_side``), the per-tile table and the per-cell tile index."""
    if n_side < group_side or n_side % group_side:
        raise SigmmaError(
            f"the slide side in tiles ({n_side}) must be a multiple of the group side "
            f"({group_side})"
        )
    per_group = group_side * group_side
    if per_group % len(LAYOUTS):
        raise SigmmaError(f"a group of {per_group} tiles cannot hold each layout equally often")
    rng = np.random.default_rng([seed, 7])
    ng = n_side // group_side
    comps = group_compositions(ng * ng, rng)
    xs, ys, ts, tile_of, rows = [], [], [], [], []
    for gr in range(ng):
        for gc in range(ng):
            g = gr * ng + gc
            lays = rng.permutation(np.repeat(np.arange(len(LAYOUTS)), per_group // len(LAYOUTS)))
            for k in range(per_group):
                r, c = gr * group_side + k // group_side, gc * group_side + k % group_side
                t = r * n_side + c
                lay = LAYOUTS[int(lays[k])]
                pos, types = arrange_tile(lay, comps[g], rng, _sites(seed, t))
                xs.append(c * TILE_UM + pos[:, 0])
                ys.append(r * TILE_UM + pos[:, 1])
                ts.append(np.array([syn._T[n] for n in types], np.int64))
                tile_of.append(np.full(len(types), len(rows), np.int64))
                row = {"tile_id": f"r{r}_c{c}", "row": r, "col": c, "group": g, "layout": lay}
                row["n_cells"] = len(types)
                row.update({f"n_{n}": int(comps[g].get(n, 0)) for n in syn.CELL_TYPES})
                rows.append(row)
    x, y, types = np.concatenate(xs), np.concatenate(ys), np.concatenate(ts)
    tiles = np.concatenate(tile_of)
    tissue = syn.SyntheticTissue(n_side * TILE_PX, seed=seed, mpp=MPP)
    f = tissue.fields(x, y)
    dom = np.full(len(x), syn._D["stroma"], np.int8)
    core = np.zeros(len(x), bool)
    i = np.arange(len(x), dtype=np.int64)
    key = sim.hash_u64(seed, _S_LAYOUT, i, 0, 0)
    cells = tissue._dress(key, x, y, types, dom, core, f, seed, 900, i, np.zeros_like(i))
    return cells, pd.DataFrame(rows), tiles


def simulate_layout_expression(
    types: np.ndarray, seed: int
) -> tuple[object, pd.DataFrame, np.ndarray]:
    """Counts (CSR, cells × (genes + controls)), the features table and the programmes:
    each cell's mean = a library size independent of its place × its type's programme."""
    import scipy.sparse as sp

    programs = layout_programs(seed)
    rng = np.random.default_rng([seed, 12])
    n, g = len(types), programs.shape[1]
    library = np.exp(rng.normal(_LIB_LOG_MEAN, _LIB_LOG_SD, n))
    dispersion = np.exp(rng.normal(math.log(4.0), 0.5, g))
    mean = programs[types] * library[:, None]
    counts = sim.sample_counts(mean.astype(np.float32), dispersion, rng)
    controls = sim.control_features()
    ctrl = sim.control_counts(n, len(controls), library, rng)
    counts = sp.hstack([counts, sp.csr_matrix(ctrl)], format="csr").astype(np.int32)
    return counts, sim.make_features(list(syn.GENES), controls), programs


def write_layout_benchmark(
    out: str | os.PathLike[str],
    *,
    n_side: int = 8,
    group_side: int = 4,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    maxworkers: int = 2,
) -> Path:
    """Write the layout benchmark (an ``n_side`` × ``n_side``-tile Xenium bundle) into ``out``.

    Parameters
    ----------
    out
        Output folder (a Xenium bundle; created).
    n_side
        Tiles per slide side (a multiple of ``group_side``); the H&E is ``256 · n_side`` px
        at 0.5 µm/px. 40 gives 1,600 tiles (about 1,100 training tiles with the default
        70/15/15 split).
    group_side
        Composition groups are ``group_side`` × ``group_side`` tiles (16 by default, each
        layout 4 times).
    seed
        Seed of the compositions, layouts, looks and counts.
    progress
        Optional callable receiving short progress messages.
    """
    from napari_sigmma.samples.tiffwrite import write_pyramidal_ome_tiff
    from napari_sigmma.samples.xenium_write import write_xenium_bundle

    say = progress or (lambda _msg: None)
    out = Path(out)
    size = int(n_side) * TILE_PX
    say(f"placing the cells of {n_side * n_side} tiles")
    cs, tiles_df, tile_of = build_layout_cells(int(n_side), group_side=group_side, seed=seed)
    tissue = LayoutTissue(size, cs, seed=seed)
    geo = syn._polygons(cs)
    pixel_size = syn._choose_pixel_size(tissue.side_um)
    a = sim.similarity_affine(MPP / pixel_size, syn.ROTATION_DEG, 0.0, 0.0)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], float) @ a.T
    a[0, 2] = syn.FRAME_MARGIN - corners[:, 0].min()
    a[1, 2] = syn.FRAME_MARGIN - corners[:, 1].min()

    def to_xenium(xy_slide_um: np.ndarray) -> np.ndarray:
        px = xy_slide_um / MPP
        return (px @ a[:2, :2].T + a[:2, 2]) * pixel_size

    n = len(cs)
    cell_xy = to_xenium(geo.cell_centroid)
    say(f"simulating expression of {n} cells")
    counts, features, _ = simulate_layout_expression(cs.type, seed)
    table, nuc_um, cell_um = syn.xenium_cells(cs, geo, cell_xy, to_xenium)
    out.mkdir(parents=True, exist_ok=True)
    he_path = out / "he_image.ome.tif"
    rows = math.ceil(size / syn.FAST_TILE)
    say(f"rendering the {size} x {size} px H&E")

    def source(y: int, x: int, h: int, w: int) -> np.ndarray:
        if x == 0 and rows >= 8:
            say(f"H&E tile row {y // syn.FAST_TILE + 1}/{rows}")
        return tissue.render(y, x, h, w)

    write_pyramidal_ome_tiff(
        he_path,
        source,
        shape=(size, size, 3),
        mpp=MPP,
        tile=syn.FAST_TILE,
        compression="jpeg",
        maxworkers=maxworkers,
    )
    say("writing the Xenium bundle")
    path = write_xenium_bundle(
        out,
        he_image=he_path,
        he_to_morph=a,
        pixel_size=pixel_size,
        cells=table,
        counts=counts,
        features=features,
        cell_polygons=list(cell_um),
        nucleus_polygons=list(nuc_um),
        seed=seed,
    )
    truth = table[["cell_id", "cell_type"]].copy()
    truth["domain"] = np.asarray(syn.DOMAINS)[cs.domain]
    truth["he_x"] = geo.cell_centroid[:, 0] / MPP
    truth["he_y"] = geo.cell_centroid[:, 1] / MPP
    truth["nucleus_he_x"] = cs.nx / MPP
    truth["nucleus_he_y"] = cs.ny / MPP
    truth["tile_id"] = tiles_df["tile_id"].to_numpy()[tile_of]
    truth["layout"] = tiles_df["layout"].to_numpy()[tile_of]
    truth["group"] = tiles_df["group"].to_numpy()[tile_of]
    truth.to_parquet(Path(path) / syn.GROUND_TRUTH_FILE, index=False)
    tiles_df.to_parquet(Path(path) / LAYOUT_TILES_FILE, index=False)
    return Path(path)


def read_layout_tiles(bundle: str | os.PathLike[str]) -> pd.DataFrame | None:
    """The per-tile table of a layout benchmark bundle (``None`` for other data)."""
    p = Path(bundle) / LAYOUT_TILES_FILE
    return pd.read_parquet(p) if p.is_file() else None
