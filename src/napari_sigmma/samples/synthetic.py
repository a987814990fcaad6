"""A fully synthetic paired sample: procedural H&E tissue with known domains and cell types.

The tissue is defined by smooth random fields (hashed value noise, so any region can be
computed alone and always comes out the same):

* **domains** — tissue vs glass, tumour nests, necrotic cores inside large nests, fat,
  normal epithelial ribbons, immune aggregates (B-cell cores, T-cell rims, more of them
  along tumour margins) and stroma elsewhere; vessels are scattered as objects.
* **cells** — placed on jittered lattices (one per density class: immune 8.5 µm, epithelial
  11 µm, stromal 15 µm, adipocytes 55 µm, vessels 160 µm), thinned per domain; each
  lattice point's fate (kept? type? shape?) comes from a hash of ``(seed, lattice, i, j)``,
  so a cell is the same whichever region asks for it.
* **look** — each type has its own nucleus: size, shape (ellipse with irregular harmonics,
  spindles, three-lobed neutrophils, flat adipocyte and endothelial nuclei), haematoxylin
  strength, chromatin texture, vesicular rim, nucleoli, and cytoplasm; the background has
  oriented collagen fibres with cracks, granular necrosis with nuclear dust, Voronoi fat,
  vessels with red cells. Concentrations are turned into RGB with Beer-Lambert stain
  vectors, blurred and given sensor noise.
* **expression** — each type has its own program over a 159-gene panel plus 60 controls;
  negative binomial counts with library size variation; a hypoxia gradient towards necrotic
  cores and a slide-wide gradient along x; neighbourhood-dependent genes (interferon around
  T cells, CAF genes in fibroblasts touching tumour, invasion genes in tumour cells touching
  stroma, lymphoid chemokines in aggregate cores); ambient spill-over from neighbours.
  Two pairs of types look alike but differ in expression: ``tumour_a`` / ``tumour_b``
  (subclones, spatially clustered by a field) and ``t_cell`` / ``b_cell`` (aggregate rims
  vs cores).

:func:`render_region` is tile-deterministic: the pixels of a region do not depend on how the
slide is cut into tiles. :func:`write_synthetic_sample` streams the H&E through the
tile-source writer (memory bounded for any size) and writes a Xenium bundle.

Limits: cells and their expression are held in memory; above ``MAX_CELL_SIDE`` px (16384,
about 250k cells and 4,000 training tiles of 256 px at 0.5 µm/px) only a centred
``MAX_CELL_SIDE`` window gets cells (``cells="auto"``; ``"all"`` forces the whole slide,
``"window"`` always uses the window; ``cell_window`` changes the side). The H&E itself is
always the full size. The morphology frame keeps its pixel size at 0.2125 µm while it stays
under ~20k px on a side and coarsens beyond (``pixel_size`` in ``experiment.xenium``);
``transcripts.parquet`` is thinned to ``max_transcripts`` rows when there are more counts.

Rendering. The exact rendering (:meth:`SyntheticTissue.render`) costs about 0.25 s of CPU
per 512 px tile, hours for the ~38k tiles of a 100k px slide. So when there is a cell window
(``render="auto"``), only the window (plus ``EXACT_MARGIN_UM``) is rendered exactly, and
outside it the H&E is *composed* (:meth:`SyntheticTissue.render_fast`, ~8 ms per tile): on a
global 512 px grid, each grid cell takes, for each domain, one of a few tiles rendered
exactly with that domain everywhere (flipped / rotated by a hash of the cell), mixed by the
domain map sampled every 16 px. Outside the window, therefore, glass, stroma, tumour,
necrosis, fat, epithelium and immune aggregates are where the tissue's fields put them, with
the right look, but the texture and nuclei are stand-ins repeated from the bank (no cell of
the model is drawn at its place, and the 512 px grid seams show); there are no cells in the
table there either. Both renderings are tile- and seed-deterministic. A 100k px slide
(322k cells in the window, a 4.2 GB JPEG OME-TIFF) took 32 min of wall time and 15 min of
CPU on two shared cores with ``workers=2``; peak memory 2.4 GB, in the Xenium bundle's
writing (1.2 GB while rendering, mostly the window's cells and counts).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from napari_sigmma.errors import SigmmaError
from napari_sigmma.samples import simulate as sim

__all__ = [
    "CELL_TYPES",
    "DOMAINS",
    "GENES",
    "GROUND_TRUTH_FILE",
    "CellSet",
    "SyntheticTissue",
    "render_region",
    "simulate_expression",
    "write_synthetic_sample",
]

GROUND_TRUTH_FILE = "sigmma_ground_truth.parquet"
PIXEL_SIZE = 0.2125
ROTATION_DEG = -1.5
FRAME_MARGIN = 80.0
MAX_CELL_SIDE = 16384
EXPANSION_UM = 5.0
#: Composed ("fast") rendering: grid period and bank tile side (px), tiles per domain in the
#: bank, and the spacing (px) of the domain map the composition follows.
FAST_TILE = 512
FAST_BANK_SIZE = 3
FAST_DOMAIN_STRIDE = 16
#: Around the cell window, this much more (µm) is rendered exactly, so that the nuclei and
#: cytoplasm of the window's border cells are whole.
EXACT_MARGIN_UM = 40.0

DOMAINS: tuple[str, ...] = (
    "background",
    "stroma",
    "tumour",
    "necrosis",
    "fat",
    "epithelium",
    "immune",
)
_D = {name: i for i, name in enumerate(DOMAINS)}

CELL_TYPES: tuple[str, ...] = (
    "tumour_a",
    "tumour_b",
    "fibroblast",
    "t_cell",
    "b_cell",
    "macrophage",
    "endothelial",
    "epithelial",
    "adipocyte",
    "neutrophil",
)
_T = {name: i for i, name in enumerate(CELL_TYPES)}

# --- nuclear appearance per type (µm; stain = haematoxylin concentration) ----------------
# a, b: semi-axes (mean, sd); stain (mean, sd); tex: chromatin texture; rim: vesicular rim;
# nucleolus: probability; irr: shape irregularity; halo: (radius / a, eosin, haematoxylin)
# fmt: off
_LOOK: dict[str, dict[str, Any]] = {
    "tumour": dict(a=(4.7, 0.9), b=(3.7, 0.7), stain=(0.70, 0.12), tex=0.35, rim=0.45,
                   nucleolus=0.6, irr=0.10, halo=(1.55, 0.40, 0.08)),
    "fibroblast": dict(a=(6.5, 1.2), b=(1.5, 0.3), stain=(0.95, 0.10), tex=0.15, rim=0.0,
                       nucleolus=0.0, irr=0.03, halo=(0.0, 0.0, 0.0)),
    "lymphocyte": dict(a=(3.0, 0.3), b=(2.8, 0.3), stain=(1.25, 0.10), tex=0.30, rim=0.0,
                       nucleolus=0.0, irr=0.04, halo=(1.35, 0.15, 0.03)),
    "macrophage": dict(a=(5.0, 0.6), b=(3.6, 0.5), stain=(0.55, 0.08), tex=0.25, rim=0.15,
                       nucleolus=0.1, irr=0.14, halo=(2.3, 0.32, 0.04)),
    "endothelial": dict(a=(5.5, 0.8), b=(1.3, 0.2), stain=(0.95, 0.10), tex=0.15, rim=0.0,
                        nucleolus=0.0, irr=0.03, halo=(0.0, 0.0, 0.0)),
    "epithelial": dict(a=(4.2, 0.5), b=(2.9, 0.4), stain=(0.85, 0.10), tex=0.20, rim=0.15,
                       nucleolus=0.1, irr=0.03, halo=(1.75, 0.32, 0.05)),
    "adipocyte": dict(a=(4.0, 0.5), b=(0.9, 0.15), stain=(0.90, 0.10), tex=0.10, rim=0.0,
                      nucleolus=0.0, irr=0.02, halo=(0.0, 0.0, 0.0)),
    "neutrophil": dict(a=(1.6, 0.15), b=(1.5, 0.15), stain=(1.30, 0.10), tex=0.10, rim=0.0,
                       nucleolus=0.0, irr=0.03, halo=(3.3, 0.30, 0.03)),
}
# fmt: on
_LOOK_OF = {
    "tumour_a": "tumour",
    "tumour_b": "tumour",
    "fibroblast": "fibroblast",
    "t_cell": "lymphocyte",
    "b_cell": "lymphocyte",
    "macrophage": "macrophage",
    "endothelial": "endothelial",
    "epithelial": "epithelial",
    "adipocyte": "adipocyte",
    "neutrophil": "neutrophil",
}


def _look_table(key: str, k: int = 0) -> np.ndarray:
    out = []
    for t in CELL_TYPES:
        v = _LOOK[_LOOK_OF[t]][key]
        out.append(v[k] if isinstance(v, tuple) else v)
    return np.asarray(out, dtype=np.float64)


# --- lattices: (spacing µm, {domain: acceptance}) -----------------------------------------
_LAT_DENSE, _LAT_EPI, _LAT_SPARSE, _LAT_FAT, _LAT_VESSEL = range(5)
_LATTICES: dict[int, tuple[float, dict[int, float]]] = {
    _LAT_DENSE: (8.5, {_D["immune"]: 0.85}),
    _LAT_EPI: (11.0, {_D["tumour"]: 0.88, _D["epithelium"]: 0.95}),
    _LAT_SPARSE: (15.0, {_D["stroma"]: 0.55, _D["necrosis"]: 0.25, _D["fat"]: 0.04}),
    _LAT_FAT: (55.0, {_D["fat"]: 1.0}),
}
_VESSEL_SPACING = 160.0
_VESSEL_P = {_D["stroma"]: 0.45, _D["tumour"]: 0.15, _D["immune"]: 0.30, _D["fat"]: 0.2}
_VESSEL_R = (6.0, 22.0)  # lumen radius range, µm
_ADIPO_R = 26.0  # typical adipocyte radius, µm
_NEUT_STEP = 2.1  # neutrophil lobe spacing, µm
_NEUT_BEND = 0.9  # sideways offset of the middle lobe, µm

# composition of each domain (type probabilities); immune has a core and a rim
_COMPOSITION: dict[str, dict[str, float]] = {
    "stroma": {
        "fibroblast": 0.72,
        "macrophage": 0.10,
        "t_cell": 0.09,
        "b_cell": 0.02,
        "neutrophil": 0.02,
        "endothelial": 0.05,
    },
    "tumour": {"tumour": 0.86, "fibroblast": 0.05, "t_cell": 0.05, "macrophage": 0.04},
    "necrosis": {"neutrophil": 0.55, "macrophage": 0.35, "tumour": 0.10},
    "fat": {"fibroblast": 0.5, "macrophage": 0.3, "endothelial": 0.2},
    "epithelium": {"epithelial": 0.93, "t_cell": 0.04, "macrophage": 0.03},
    "immune_core": {"b_cell": 0.80, "t_cell": 0.15, "macrophage": 0.05},
    "immune_rim": {
        "t_cell": 0.72,
        "b_cell": 0.12,
        "macrophage": 0.10,
        "neutrophil": 0.02,
        "fibroblast": 0.04,
    },
}

# --- stains (optical density per unit concentration, natural log) -------------------------
_H_OD = np.array([0.65, 0.70, 0.29]) * 2.3
_E_OD = np.array([0.05, 0.85, 0.33])
_GLASS_OD = np.array([0.045, 0.06, 0.035])

# --- field streams ------------------------------------------------------------------------
_S_TISSUE, _S_TUMOUR, _S_NECRO, _S_FAT, _S_EPI, _S_IMMUNE, _S_CLONE, _S_FLOW = range(1, 9)
_S_FIBRE, _S_GAP, _S_CHROM, _S_MOTTLE, _S_PIXEL, _S_BANK = range(20, 26)
_S_LAT = 100  # + lattice id


@dataclass
class CellSet:
    """Cells of a region, all geometry in µm (slide frame, x right, y down)."""

    key: np.ndarray  # (N,) uint64 unique id (lattice, i, j, ring slot)
    x: np.ndarray
    y: np.ndarray
    type: np.ndarray  # index into CELL_TYPES
    domain: np.ndarray  # index into DOMAINS
    nx: np.ndarray  # nucleus centre
    ny: np.ndarray
    a: np.ndarray  # nucleus semi-axes
    b: np.ndarray
    theta: np.ndarray
    stain: np.ndarray
    harm: np.ndarray  # (N, 3, 2): amplitude and phase of harmonics 2, 3, 4
    nucleolus: np.ndarray  # (N, 3): present (0/1), dx, dy (µm)
    lobe_angle: np.ndarray  # neutrophils: orientation of the lobe chain
    hypoxia: np.ndarray  # 0..1, graded towards necrotic cores
    core: np.ndarray  # bool: inside an immune aggregate core

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: np.ndarray) -> CellSet:
        return CellSet(**{k: v[idx] for k, v in self.__dict__.items()})

    @staticmethod
    def concat(parts: list[CellSet]) -> CellSet:
        return CellSet(
            **{k: np.concatenate([getattr(p, k) for p in parts]) for k in CellSet.__annotations__}
        )

    def nucleus_radii(self) -> np.ndarray:
        """(N, A) nucleus radii (µm) along :data:`simulate.ANGLES` around (nx, ny)."""
        phi = sim.ANGLES[None, :] - self.theta[:, None]
        c, s = np.cos(phi), np.sin(phi)
        r = 1.0 / np.sqrt((c / self.a[:, None]) ** 2 + (s / self.b[:, None]) ** 2)
        wobble = np.zeros_like(r)
        for k, order in enumerate((2, 3, 4)):
            wobble += self.harm[:, k, 0, None] * np.cos(order * phi + self.harm[:, k, 1, None])
        r = r * (1.0 + wobble)
        neut = self.type == _T["neutrophil"]
        if neut.any():
            # the polygon of a three-lobed nucleus: the ellipse around the lobe chain
            pa = sim.ANGLES[None, :] - self.lobe_angle[neut, None]
            ra, rb = self.a[neut, None] + _NEUT_STEP, self.b[neut, None] + _NEUT_BEND
            r[neut] = 1.0 / np.sqrt((np.cos(pa) / ra) ** 2 + (np.sin(pa) / rb) ** 2)
        return r


class SyntheticTissue:
    """The procedural slide: fields, domains, cells and rendering of any region.

    Parameters
    ----------
    size
        Side of the (square) slide in pixels.
    seed
        Everything random derives from it.
    mpp
        µm per pixel of the H&E.
    """

    def __init__(self, size: int, *, seed: int = 0, mpp: float = 0.5) -> None:
        if size < 64:
            raise SigmmaError(f"synthetic slide size must be at least 64 px, got {size}")
        if not (0.05 <= mpp <= 5.0):
            raise SigmmaError(f"mpp must be within 0.05-5 µm/px, got {mpp}")
        self.size = int(size)
        self.seed = int(seed)
        self.mpp = float(mpp)
        self.side_um = self.size * self.mpp

    # --- fields -----------------------------------------------------------------------
    def fields(
        self, x: np.ndarray, y: np.ndarray, *, skip: tuple[str, ...] = ()
    ) -> dict[str, np.ndarray]:
        """Field values at points ``(x, y)`` in µm (all but the ``skip`` ones)."""
        sd = self.seed
        half = self.side_um / 2.0
        # an irregular tissue piece filling most of the slide
        rx = (x - half) / (0.58 * self.side_um)
        ry = (y - half) / (0.56 * self.side_um)
        shape = np.clip(1.0 - np.sqrt(rx**2 + ry**2), -1.0, 0.3)
        tissue = 0.9 * shape + (sim.fbm(x, y, 1200.0, sd, _S_TISSUE) - 0.5) * 0.7 + 0.08
        # small slides: the falloff and noise would leave too little tissue; keep it mostly full
        tissue = tissue + max(0.0, 0.25 - self.side_um / 8000.0)
        tumour = sim.fbm(x, y, 600.0, sd, _S_TUMOUR)
        out = {"tissue": tissue, "tumour": tumour}
        more: dict[str, Callable[[], np.ndarray]] = {
            "necro": lambda: sim.value_noise(x, y, 200.0, sd, _S_NECRO),
            "fat": lambda: sim.fbm(x, y, 500.0, sd, _S_FAT),
            "epi": lambda: sim.fbm(x, y, 350.0, sd, _S_EPI, octaves=2),
            "immune": lambda: sim.fbm(x, y, 180.0, sd, _S_IMMUNE, octaves=2),
            "clone": lambda: sim.fbm(x, y, 300.0, sd, _S_CLONE, octaves=2),
            "flow": lambda: sim.fbm(x, y, 250.0, sd, _S_FLOW, octaves=2),
        }
        out.update({k: f() for k, f in more.items() if k not in skip})
        return out

    @staticmethod
    def domain_of(f: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Domain index and immune-core flag from field values."""
        tissue = f["tissue"] > 0.0
        t = f["tumour"]
        tumour = t > 0.56
        necrosis = tumour & (t > 0.76) & (f["necro"] > 0.5)
        margin = np.clip(1.0 - np.abs(t - 0.56) / 0.06, 0.0, 1.0)
        fat = ~tumour & (f["fat"] > 0.70)
        immune = (f["immune"] > 0.76 - 0.07 * margin) & ~fat & ~necrosis & (t < 0.60)
        core = immune & (f["immune"] > 0.84 - 0.05 * margin)
        epi = ~tumour & ~fat & ~immune & (np.abs(f["epi"] - 0.5) < 0.03)
        d = np.full(t.shape, _D["stroma"], np.int8)
        d[epi] = _D["epithelium"]
        d[fat] = _D["fat"]
        d[tumour] = _D["tumour"]
        d[immune] = _D["immune"]
        d[necrosis] = _D["necrosis"]
        d[~tissue] = _D["background"]
        return d, core & (d == _D["immune"])

    def _epi_normal_angle(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # nuclei of an epithelial ribbon stand perpendicular to it: along the field gradient
        e = 2.0
        fx = sim.fbm(x + e, y, 350.0, self.seed, _S_EPI, octaves=2) - sim.fbm(
            x - e, y, 350.0, self.seed, _S_EPI, octaves=2
        )
        fy = sim.fbm(x, y + e, 350.0, self.seed, _S_EPI, octaves=2) - sim.fbm(
            x, y - e, 350.0, self.seed, _S_EPI, octaves=2
        )
        return np.arctan2(fy, fx)

    # --- vessels ----------------------------------------------------------------------
    def vessels(self, x0: float, y0: float, x1: float, y1: float) -> dict[str, np.ndarray]:
        """Vessels whose centre lies in the box (µm): centre, lumen radius, lattice index."""
        sp = _VESSEL_SPACING
        i, j = _lattice_indices(x0, y0, x1, y1, sp)
        sd = self.seed
        lat = _S_LAT + 50
        cx = (i + 0.5 + 0.8 * (sim.hash_uniform(sd, lat, i, j, 0) - 0.5)) * sp
        cy = (j + 0.5 + 0.8 * (sim.hash_uniform(sd, lat, i, j, 1) - 0.5)) * sp
        inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
        inside &= (cx >= 0) & (cx < self.side_um) & (cy >= 0) & (cy < self.side_um)
        i, j, cx, cy = i[inside], j[inside], cx[inside], cy[inside]
        dom, _ = self.domain_of(self.fields(cx, cy))
        p = np.zeros(len(cx))
        for d, pv in _VESSEL_P.items():
            p[dom == d] = pv
        keep = sim.hash_uniform(sd, lat, i, j, 2) < p
        i, j, cx, cy = i[keep], j[keep], cx[keep], cy[keep]
        u = sim.hash_uniform(sd, lat, i, j, 3)
        r = _VESSEL_R[0] + (_VESSEL_R[1] - _VESSEL_R[0]) * u**2
        return {"x": cx, "y": cy, "r": r, "i": i, "j": j}

    # --- cells ------------------------------------------------------------------------
    def cells(self, x0: float, y0: float, x1: float, y1: float) -> CellSet:
        """All cells whose centre lies in ``[x0, x1) x [y0, y1)`` (µm), clipped to the slide."""
        x0, y0 = max(x0, 0.0), max(y0, 0.0)
        x1, y1 = min(x1, self.side_um), min(y1, self.side_um)
        parts = [self._lattice_cells(lid, x0, y0, x1, y1) for lid in _LATTICES]
        cells = CellSet.concat([p for p in parts if p is not None] or [_empty()])
        # nothing but the vessel's own endothelium inside a vessel
        m = _VESSEL_R[1] + 3.0
        ves = self.vessels(x0 - m, y0 - m, x1 + m, y1 + m)
        if len(ves["x"]) and len(cells):
            dx = cells.x[:, None] - ves["x"][None]
            dy = cells.y[:, None] - ves["y"][None]
            inside = (dx**2 + dy**2 < (ves["r"][None] + 3.0) ** 2).any(axis=1)
            cells = cells.take(np.flatnonzero(~inside))
        ring = self._vessel_cells(x0, y0, x1, y1)
        if ring is not None:
            cells = CellSet.concat([cells, ring])
        return cells.take(np.argsort(cells.key, kind="stable"))

    def _lattice_cells(
        self, lid: int, x0: float, y0: float, x1: float, y1: float
    ) -> CellSet | None:
        spacing, accept = _LATTICES[lid]
        i, j = _lattice_indices(x0, y0, x1, y1, spacing)
        if not len(i):
            return None
        sd, lat = self.seed, _S_LAT + lid
        x = (i + 0.5 + 0.8 * (sim.hash_uniform(sd, lat, i, j, 0) - 0.5)) * spacing
        y = (j + 0.5 + 0.8 * (sim.hash_uniform(sd, lat, i, j, 1) - 0.5)) * spacing
        inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        i, j, x, y = i[inside], j[inside], x[inside], y[inside]
        f = self.fields(x, y)
        dom, core = self.domain_of(f)
        p = np.zeros(len(x))
        for d, pv in accept.items():
            p[dom == d] = pv
        keep = sim.hash_uniform(sd, lat, i, j, 2) < p
        if not keep.any():
            return None
        i, j, x, y, dom, core = i[keep], j[keep], x[keep], y[keep], dom[keep], core[keep]
        f = {k: v[keep] for k, v in f.items()}
        u = sim.hash_uniform(sd, lat, i, j, 3)
        if lid == _LAT_FAT:
            types = np.full(len(x), _T["adipocyte"])
        else:
            types = self._draw_types(dom, core, f, u)
        key = _cell_key(lid, i, j, 0)
        return self._dress(key, x, y, types, dom, core, f, sd, lat, i, j)

    def _draw_types(
        self, dom: np.ndarray, core: np.ndarray, f: dict[str, np.ndarray], u: np.ndarray
    ) -> np.ndarray:
        types = np.full(len(dom), _T["fibroblast"])
        # tumour subclone b where the clone field is high (a soft boundary)
        p_b = 1.0 / (1.0 + np.exp(-(f["clone"] - 0.5) * 14.0))
        u_clone = np.mod(u * 7919.0, 1.0)
        tumour_type = np.where(u_clone < p_b, _T["tumour_b"], _T["tumour_a"])
        for name, comp in _COMPOSITION.items():
            if name == "immune_core":
                sel = (dom == _D["immune"]) & core
            elif name == "immune_rim":
                sel = (dom == _D["immune"]) & ~core
            else:
                sel = dom == _D[name]
            if not sel.any():
                continue
            names = list(comp)
            cum = np.cumsum([comp[n] for n in names])
            cum /= cum[-1]
            pick = np.searchsorted(cum, u[sel], side="right").clip(0, len(names) - 1)
            chosen = np.array([_T[n] if n != "tumour" else -1 for n in names], dtype=np.int64)[pick]
            chosen = np.where(chosen < 0, tumour_type[sel], chosen)
            types[sel] = chosen
        return types

    def _vessel_cells(self, x0: float, y0: float, x1: float, y1: float) -> CellSet | None:
        m = _VESSEL_R[1] + 4.0
        ves = self.vessels(x0 - m, y0 - m, x1 + m, y1 + m)
        if not len(ves["x"]):
            return None
        sd, lat = self.seed, _S_LAT + 50
        counts = np.maximum(3, np.round(2 * np.pi * ves["r"] / 14.0)).astype(int)
        vid = np.repeat(np.arange(len(counts)), counts)
        slot = np.concatenate([np.arange(c) for c in counts])
        i, j = ves["i"][vid], ves["j"][vid]
        phase = sim.hash_uniform(sd, lat, i, j, 4) * 2 * np.pi
        ang = phase + 2 * np.pi * slot / counts[vid]
        rr = ves["r"][vid] + 1.2
        x = ves["x"][vid] + rr * np.cos(ang)
        y = ves["y"][vid] + rr * np.sin(ang)
        inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        inside &= (x >= 0) & (x < self.side_um) & (y >= 0) & (y < self.side_um)
        if not inside.any():
            return None
        x, y, i, j, slot, ang = (
            x[inside],
            y[inside],
            i[inside],
            j[inside],
            slot[inside],
            ang[inside],
        )
        f = self.fields(x, y)
        dom, core = self.domain_of(f)
        types = np.full(len(x), _T["endothelial"])
        key = _cell_key(50, i, j, slot + 1)
        cells = self._dress(key, x, y, types, dom, core, f, sd, lat + 1000, i * 64 + slot, j)
        cells.theta = ang + np.pi / 2  # flat along the vessel wall
        return cells

    def _dress(
        self,
        key: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        types: np.ndarray,
        dom: np.ndarray,
        core: np.ndarray,
        f: dict[str, np.ndarray],
        sd: int,
        lat: int,
        i: np.ndarray,
        j: np.ndarray,
    ) -> CellSet:
        """Per-cell appearance from the type's look and the cell's own hashed draws."""

        def nrm(k: int) -> np.ndarray:
            return sim.normal_from_uniform(sim.hash_uniform(sd, lat, i, j, 10 + k))

        def uni(k: int) -> np.ndarray:
            return sim.hash_uniform(sd, lat, i, j, 30 + k)

        a = _look_table("a", 0)[types] + _look_table("a", 1)[types] * nrm(0)
        b = _look_table("b", 0)[types] + _look_table("b", 1)[types] * nrm(1)
        a = np.clip(a, 0.8, 12.0)
        b = np.clip(b, 0.6, 10.0)
        a, b = np.maximum(a, b), np.minimum(a, b)
        stain = np.clip(
            _look_table("stain", 0)[types] + _look_table("stain", 1)[types] * nrm(2), 0.2, 2.0
        )
        theta = uni(0) * np.pi
        fib_like = np.isin(types, [_T["fibroblast"]])
        flow = f["flow"] * 2.0 * np.pi
        theta = np.where(fib_like, flow + 0.2 * nrm(3), theta)
        epi_like = types == _T["epithelial"]
        if epi_like.any():
            theta[epi_like] = (
                self._epi_normal_angle(x[epi_like], y[epi_like]) + 0.15 * nrm(4)[epi_like]
            )
        irr = _look_table("irr")[types]
        harm = np.stack(
            [
                np.stack(
                    [irr * np.abs(nrm(5 + k)) * (1.0 if k else 1.4), uni(1 + k) * 2 * np.pi], axis=1
                )
                for k in range(3)
            ],
            axis=1,
        )
        has_nucl = uni(5) < _look_table("nucleolus")[types]
        ang = uni(6) * 2 * np.pi
        off = 0.4 * a * uni(7)
        nucleolus = np.stack([has_nucl.astype(float), off * np.cos(ang), off * np.sin(ang)], 1)
        nx, ny = x.copy(), y.copy()
        adipo = types == _T["adipocyte"]
        if adipo.any():
            # the adipocyte's nucleus is pressed flat against its membrane
            phi = uni(8)[adipo] * 2 * np.pi
            rad = _ADIPO_R * 0.72
            nx[adipo] = x[adipo] + rad * np.cos(phi)
            ny[adipo] = y[adipo] + rad * np.sin(phi)
            theta[adipo] = phi + np.pi / 2
        hyp = np.where(
            np.isin(dom, [_D["tumour"], _D["necrosis"]]),
            np.clip((f["tumour"] - 0.60) / 0.14, 0.0, 1.0),
            0.0,
        )
        return CellSet(
            key=key,
            x=x,
            y=y,
            type=types.astype(np.int64),
            domain=dom.astype(np.int8),
            nx=nx,
            ny=ny,
            a=a,
            b=b,
            theta=theta,
            stain=stain,
            harm=harm,
            nucleolus=nucleolus,
            lobe_angle=uni(9) * np.pi,
            hypoxia=hyp,
            core=core.astype(bool),
        )

    # --- rendering ----------------------------------------------------------------------
    def render(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the slide region starting at pixel ``(y, x)``.

        The region may extend past the slide (it is rendered as glass there). Pixel values
        depend only on absolute positions, never on the region asked for.
        """
        return _Renderer(self, int(y), int(x), int(h), int(w)).run()

    def render_fast(
        self,
        y: int,
        x: int,
        h: int,
        w: int,
        *,
        exact_box: tuple[int, int, int, int] | None = None,
    ) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` composed cheaply from a bank of exactly rendered tiles.

        The slide is cut on a global grid of ``FAST_TILE`` px. Each grid cell shows, for
        every domain, one of ``FAST_BANK_SIZE`` tiles rendered exactly with that domain
        everywhere (rendered once per process, on first use), picked, flipped and rotated by
        a hash of ``(seed, grid cell, domain)``; the domains are mixed with weights
        interpolated bilinearly from the domain map (:meth:`fields` + :meth:`domain_of`)
        sampled every ``FAST_DOMAIN_STRIDE`` px on a global grid. So glass, stroma, tumour,
        ... lie where the exact rendering has them (boundaries softened over ~16 px), but
        the texture and the nuclei are stand-ins: no cell of :meth:`cells` is drawn where
        it is, and grid-cell seams are visible. Pixel values depend only on absolute
        positions (tile-deterministic) and on the seed.

        Parameters
        ----------
        y, x, h, w
            The region, in level-0 pixels (it may extend past the slide: glass there).
        exact_box
            ``(y0, x0, y1, x1)`` px: inside it the pixels are :meth:`render`'s, exactly.
        """
        y, x, h, w = int(y), int(x), int(h), int(w)
        out = np.empty((h, w, 3), np.uint8)
        p = FAST_TILE
        ey0 = ex0 = ey1 = ex1 = 0
        if exact_box is not None:
            ey0, ex0 = max(exact_box[0], y), max(exact_box[1], x)
            ey1, ex1 = min(exact_box[2], y + h), min(exact_box[3], x + w)
        for gy in range(y // p, (y + h - 1) // p + 1):
            y0, y1 = max(y, gy * p), min(y + h, (gy + 1) * p)
            for gx in range(x // p, (x + w - 1) // p + 1):
                x0, x1 = max(x, gx * p), min(x + w, (gx + 1) * p)
                if ey0 <= y0 and y1 <= ey1 and ex0 <= x0 and x1 <= ex1:
                    continue  # all exact
                out[y0 - y : y1 - y, x0 - x : x1 - x] = self._fast_piece(gy, gx, y0, x0, y1, x1)
        if ey1 > ey0 and ex1 > ex0:
            out[ey0 - y : ey1 - y, ex0 - x : ex1 - x] = self.render(ey0, ex0, ey1 - ey0, ex1 - ex0)
        return out

    def domain_grid(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Domains at the global nodes ``(i, j) * FAST_DOMAIN_STRIDE`` px for node rows
        ``y0..y1`` and columns ``x0..x1`` (inclusive); glass beyond the slide."""
        s = FAST_DOMAIN_STRIDE * self.mpp
        gy = np.arange(y0, y1 + 1) * s
        gx = np.arange(x0, x1 + 1) * s
        xx, yy = np.meshgrid(gx, gy)
        dom, _ = self.domain_of(self.fields(xx, yy, skip=("clone", "flow")))
        inside = (xx >= 0) & (xx < self.side_um) & (yy >= 0) & (yy < self.side_um)
        return np.where(inside, dom, _D["background"]).astype(np.int8)

    def _fast_piece(self, gy: int, gx: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of grid cell ``(gy, gx)`` (all inside it)."""
        s = FAST_DOMAIN_STRIDE
        ty = (np.arange(y0, y1) + 0.5) / s  # pixel centres in node units
        tx = (np.arange(x0, x1) + 0.5) / s
        iy, ix = np.floor(ty).astype(np.int64), np.floor(tx).astype(np.int64)
        ny0, nx0 = int(iy[0]), int(ix[0])
        nodes = self.domain_grid(ny0, nx0, int(iy[-1]) + 1, int(ix[-1]) + 1)
        present = np.unique(nodes)  # ascending: the same order for any region
        ly, lx = y0 - gy * FAST_TILE, x0 - gx * FAST_TILE
        sl = (slice(ly, ly + y1 - y0), slice(lx, lx + x1 - x0))
        if len(present) == 1:
            return self._bank_tile(int(present[0]), gy, gx)[sl]
        banks = {int(d): self._bank_tile(int(d), gy, gx)[sl] for d in present}
        iy, ix = iy - ny0, ix - nx0
        # a pixel between four nodes of one domain is that domain's bank pixel (what the
        # weighted sum below gives too); only pixels between different domains are mixed
        c = nodes[:-1, :-1]
        pure = (c == nodes[1:, :-1]) & (c == nodes[:-1, 1:]) & (c == nodes[1:, 1:])
        label = np.where(pure, c, -1)[iy][:, ix]
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for d, bank in banks.items():
            # whole RGB pixels (3-byte items): much faster than a broadcast channel mask
            np.copyto(out.view("V3")[..., 0], bank.view("V3")[..., 0], where=label == d)
        rr, cc = np.nonzero(label < 0)
        if len(rr):
            wy = (ty - np.floor(ty)).astype(np.float32)[rr]
            wx = (tx - np.floor(tx)).astype(np.float32)[cc]
            ry, cx = iy[rr], ix[cc]
            acc = np.zeros((len(rr), 3), np.float32)
            for d, bank in banks.items():
                one = (nodes == d).astype(np.float32)
                top = one[ry, cx] * (1 - wx) + one[ry, cx + 1] * wx
                bot = one[ry + 1, cx] * (1 - wx) + one[ry + 1, cx + 1] * wx
                wgt = top * (1 - wy) + bot * wy
                acc += wgt[:, None] * bank[rr, cc]
            out[rr, cc] = np.clip(np.rint(acc), 0, 255).astype(np.uint8)
        return out

    def _bank_tile(self, domain: int, gy: int, gx: int) -> np.ndarray:
        """The bank tile grid cell ``(gy, gx)`` shows for ``domain``, oriented (a view)."""
        word = int(sim.hash_u64(self.seed, _S_BANK, gx, gy, domain))
        k = word % FAST_BANK_SIZE
        bank = self.__dict__.setdefault("_bank", {})
        if (domain, k) not in bank:
            bank[(domain, k)] = _render_bank_tile(self, domain, k)
        t = bank[(domain, k)]
        o = (word >> 8) & 7
        if o & 4:
            t = t.transpose(1, 0, 2)
        if o & 1:
            t = t[::-1]
        if o & 2:
            t = t[:, ::-1]
        return t

    def all_cells(self, *, window: tuple[float, float, float, float] | None = None) -> CellSet:
        """Every cell of the slide (or of ``window`` = x0, y0, x1, y1 in µm), block by block,
        ordered by position (rows of 64 µm, then x)."""
        x0, y0, x1, y1 = window or (0.0, 0.0, self.side_um, self.side_um)
        block = 1024.0
        parts = []
        for by in np.arange(y0, y1, block):
            for bx in np.arange(x0, x1, block):
                c = self.cells(bx, by, min(bx + block, x1), min(by + block, y1))
                if len(c):
                    parts.append(c)
        cells = CellSet.concat(parts or [_empty()])
        order = np.lexsort((cells.x, np.floor(cells.y / 64.0)))
        return cells.take(order)


def _lattice_indices(
    x0: float, y0: float, x1: float, y1: float, spacing: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lattice cells whose jittered point may fall in the box."""
    i = np.arange(math.floor(x0 / spacing) - 1, math.floor(x1 / spacing) + 2, dtype=np.int64)
    j = np.arange(math.floor(y0 / spacing) - 1, math.floor(y1 / spacing) + 2, dtype=np.int64)
    ii, jj = np.meshgrid(i, j)
    return ii.ravel(), jj.ravel()


def _cell_key(lid: int, i: np.ndarray, j: np.ndarray, slot: np.ndarray | int) -> np.ndarray:
    return sim.hash_u64(7, lid, i, j, slot)


def _empty() -> CellSet:
    z = np.zeros(0)
    return CellSet(
        key=np.zeros(0, np.uint64),
        x=z,
        y=z,
        type=np.zeros(0, np.int64),
        domain=np.zeros(0, np.int8),
        nx=z,
        ny=z,
        a=z,
        b=z,
        theta=z,
        stain=z,
        harm=np.zeros((0, 3, 2)),
        nucleolus=np.zeros((0, 3)),
        lobe_angle=z,
        hypoxia=z,
        core=np.zeros(0, bool),
    )


class _OneDomainTissue(SyntheticTissue):
    """The same tissue (fields, cells, look) with one domain everywhere: the bank's source.

    Immune tissue gets aggregate cores where its field is high, so both B-cell cores and
    T-cell rims appear in its tiles.
    """

    def __init__(self, base: SyntheticTissue, domain: int) -> None:
        # large enough for bank tiles anywhere, whatever the slide's size
        super().__init__(max(base.size, 8 * FAST_TILE), seed=base.seed, mpp=base.mpp)
        self.domain = domain

    def domain_of(self, f: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        d = np.full(np.shape(f["tumour"]), self.domain, np.int8)
        core = f["immune"] > 0.55 if self.domain == _D["immune"] else np.zeros(d.shape, bool)
        return d, core


def _render_bank_tile(tissue: SyntheticTissue, domain: int, k: int) -> np.ndarray:
    """Bank tile ``k`` of ``domain``: an exact ``FAST_TILE`` px rendering of the one-domain
    tissue at a place drawn from ``(seed, domain, k)``."""
    one = _OneDomainTissue(tissue, domain)
    span = one.size - FAST_TILE
    u = sim.hash_uniform(tissue.seed, _S_BANK, domain, k, np.arange(2))
    y, x = (np.floor(u * span)).astype(np.int64)
    return one.render(int(y), int(x), FAST_TILE, FAST_TILE)


def _smoothstep(e0: float, e1: float, v: np.ndarray) -> np.ndarray:
    t = np.clip((v - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


class _Renderer:
    """Renders one region: a canvas with a margin wide enough for every filter, so that
    the cropped result does not depend on the region's extent."""

    BG_SIGMA_UM = 1.2  # softening of domain boundaries
    OPTICS_SIGMA_PX = 0.55  # microscope blur

    def __init__(self, tissue: SyntheticTissue, y: int, x: int, h: int, w: int) -> None:
        self.t = tissue
        mpp = tissue.mpp
        self.mpp = mpp
        bg_sigma_px = self.BG_SIGMA_UM / mpp
        self.border = math.ceil(4 * bg_sigma_px + 4 * self.OPTICS_SIGMA_PX) + 2
        self.y, self.x, self.h, self.w = y, x, h, w
        self.cy0 = y - self.border
        self.cx0 = x - self.border
        self.ch = h + 2 * self.border
        self.cw = w + 2 * self.border
        # pixel centres (µm)
        self.X = (self.cx0 + np.arange(self.cw) + 0.5) * mpp
        self.Y = (self.cy0 + np.arange(self.ch) + 0.5) * mpp

    # fields on a coarse global grid, bilinear to pixels
    def _fields(self) -> dict[str, np.ndarray]:
        s = max(1, round(4.0 / self.mpp))  # grid stride in px (about 4 µm)
        gx0 = math.floor(self.cx0 / s) - 1
        gy0 = math.floor(self.cy0 / s) - 1
        gx1 = math.ceil((self.cx0 + self.cw) / s) + 2
        gy1 = math.ceil((self.cy0 + self.ch) / s) + 2
        gx = np.arange(gx0, gx1) * s * self.mpp
        gy = np.arange(gy0, gy1) * s * self.mpp
        gxx, gyy = np.meshgrid(gx, gy)
        coarse = self.t.fields(gxx, gyy)
        tx = (self.cx0 + np.arange(self.cw) + 0.5) / s - gx0
        ty = (self.cy0 + np.arange(self.ch) + 0.5) / s - gy0
        ix = np.floor(tx).astype(np.int64)
        iy = np.floor(ty).astype(np.int64)
        wx = (tx - ix)[None, :]
        wy = (ty - iy)[:, None]
        out = {}
        for k, f in coarse.items():
            r0, r1 = f[iy], f[iy + 1]
            top = r0[:, ix] * (1 - wx) + r0[:, ix + 1] * wx
            bot = r1[:, ix] * (1 - wx) + r1[:, ix + 1] * wx
            out[k] = top * (1 - wy) + bot * wy
        return out

    def _fibres(self, flow: np.ndarray, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Oriented collagen texture and cracks (both 0..1), blended over 8 fixed angles."""
        fib = np.zeros((self.ch, self.cw))
        gap = np.zeros((self.ch, self.cw))
        if not where.any():
            return fib, gap
        nb = 8
        ang = np.mod(flow * 2.0 * np.pi, np.pi) / np.pi * nb  # fibres are axial
        lo = np.floor(ang).astype(np.int64) % nb
        frac = ang - np.floor(ang)
        X, Y = np.meshgrid(self.X, self.Y)
        sd = self.t.seed
        for b in np.unique(np.concatenate([lo[where], (lo[where] + 1) % nb])):
            wgt = np.where(lo == b, 1 - frac, 0.0) + np.where((lo + 1) % nb == b, frac, 0.0)
            sel = where & (wgt > 0)
            if not sel.any():
                continue
            phi = b * np.pi / nb
            c, s_ = np.cos(phi), np.sin(phi)
            u = X[sel] * c + Y[sel] * s_
            v = -X[sel] * s_ + Y[sel] * c
            f1 = sim.value_noise(u / 22.0, v / 2.0, 1.0, sd, _S_FIBRE * 16 + int(b))
            f2 = sim.value_noise(u / 45.0, v / 5.0, 1.0, sd, _S_GAP * 16 + int(b))
            fib[sel] += wgt[sel] * f1
            gap[sel] += wgt[sel] * f2
        return fib, gap

    def run(self) -> np.ndarray:
        from scipy import ndimage as ndi

        t, mpp = self.t, self.mpp
        f = self._fields()
        dom, _ = t.domain_of(f)
        flow = f["flow"]
        del f
        X, Y = np.meshgrid(self.X, self.Y)
        sd = t.seed
        inside = (X >= 0) & (X < t.side_um) & (Y >= 0) & (Y < t.side_um)
        dom = np.where(inside, dom, _D["background"])
        fine = sim.value_noise(X, Y, 0.9, sd, _S_CHROM)
        mottle = sim.value_noise(X, Y, 4.0, sd, _S_MOTTLE)

        H = np.zeros((self.ch, self.cw))
        E = np.zeros((self.ch, self.cw))
        fibrous = np.isin(dom, [_D["stroma"], _D["immune"]])
        fib, gap = self._fibres(flow, fibrous)
        crack = _smoothstep(0.28, 0.42, gap)
        st = dom == _D["stroma"]
        E[st] = 0.78 * (0.45 + 0.8 * fib[st]) * crack[st]
        H[st] = 0.03
        im = dom == _D["immune"]
        E[im] = 0.14 + 0.1 * fib[im]
        H[im] = 0.05
        tu = dom == _D["tumour"]
        E[tu] = 0.22 * (0.8 + 0.4 * mottle[tu])
        H[tu] = 0.05
        ep = dom == _D["epithelium"]
        E[ep] = 0.18
        H[ep] = 0.04
        ne = dom == _D["necrosis"]
        E[ne] = 0.55 * (0.65 + 0.7 * mottle[ne])
        H[ne] = 0.08 + 0.6 * _smoothstep(0.78, 0.92, fine[ne]) * (mottle[ne] > 0.5)
        fa = dom == _D["fat"]
        if fa.any():
            E[fa] = 0.62 * self._fat_membranes(X[fa], Y[fa])
            H[fa] = 0.01
        sig = self.BG_SIGMA_UM / mpp
        H = ndi.gaussian_filter(H, sig)
        E = ndi.gaussian_filter(E, sig)

        self._vessels(H, E)
        cells = self._cells()
        if len(cells):
            self._halos(cells, H, E, mottle)
            self._nuclei(cells, H, E, fine)

        od = H[..., None] * _H_OD + E[..., None] * _E_OD + _GLASS_OD
        rgb = 255.0 * np.exp(-od)
        for c in range(3):
            rgb[..., c] = ndi.gaussian_filter(rgb[..., c], self.OPTICS_SIGMA_PX)
        b = self.border
        rgb = rgb[b : b + self.h, b : b + self.w]
        px = (self.cx0 + b + np.arange(self.w))[None, :]
        py = (self.cy0 + b + np.arange(self.h))[:, None]
        word = sim.hash_u64(sd, _S_PIXEL, px, py)
        for c in range(3):
            # two 10-bit uniforms per channel from one 64-bit hash: triangular noise
            u1 = ((word >> np.uint64(20 * c)) & np.uint64(1023)).astype(np.float64)
            u2 = ((word >> np.uint64(20 * c + 10)) & np.uint64(1023)).astype(np.float64)
            rgb[..., c] += ((u1 + u2) / 1023.0 - 1.0) * 4.0
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    def _fat_membranes(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        from scipy.spatial import cKDTree

        m = 2.5 * _LATTICES[_LAT_FAT][0]
        c = self.t._lattice_cells(_LAT_FAT, x.min() - m, y.min() - m, x.max() + m, y.max() + m)
        if c is None or len(c) < 2:
            return np.full(x.shape, 0.2)
        d, _ = cKDTree(np.column_stack([c.x, c.y])).query(np.column_stack([x, y]), k=2)
        return 0.04 + _smoothstep(2.2, 0.6, d[:, 1] - d[:, 0])

    def _vessels(self, H: np.ndarray, E: np.ndarray) -> None:
        mpp = self.mpp
        x0, y0 = self.cx0 * mpp, self.cy0 * mpp
        x1, y1 = (self.cx0 + self.cw) * mpp, (self.cy0 + self.ch) * mpp
        m = _VESSEL_R[1] + 4.0
        ves = self.t.vessels(x0 - m, y0 - m, x1 + m, y1 + m)
        sd, lat = self.t.seed, _S_LAT + 50
        for k in range(len(ves["x"])):
            vx, vy, r = ves["x"][k], ves["y"][k], ves["r"][k]
            ext = r + 3.5
            c0 = max(0, math.floor((vx - ext) / mpp - self.cx0))
            c1 = min(self.cw, math.ceil((vx + ext) / mpp - self.cx0) + 1)
            r0 = max(0, math.floor((vy - ext) / mpp - self.cy0))
            r1 = min(self.ch, math.ceil((vy + ext) / mpp - self.cy0) + 1)
            if c0 >= c1 or r0 >= r1:
                continue
            xs, ys = self.X[c0:c1][None, :], self.Y[r0:r1][:, None]
            d = np.sqrt((xs - vx) ** 2 + (ys - vy) ** 2)
            lumen = _smoothstep(r + 0.4, r - 0.4, d)
            wall = _smoothstep(r - 0.3, r + 0.5, d) * _smoothstep(r + 3.2, r + 2.2, d)
            sub_h, sub_e = H[r0:r1, c0:c1], E[r0:r1, c0:c1]
            sub_h *= 1 - 0.95 * lumen
            sub_e *= 1 - 0.95 * lumen
            sub_e += 0.5 * wall
            # red blood cells inside the lumen
            i, j = ves["i"][k], ves["j"][k]
            n_rbc = int(sim.hash_uniform(sd, lat, i, j, 5) * 0.5 * (r / 3.4) ** 2)
            if n_rbc:
                q = np.arange(n_rbc)
                rr = (r - 3.0) * np.sqrt(sim.hash_uniform(sd, lat + 7, i, j, q))
                aa = 2 * np.pi * sim.hash_uniform(sd, lat + 8, i, j, q)
                bx, by = vx + rr * np.cos(aa), vy + rr * np.sin(aa)
                for px_, py_ in zip(bx, by, strict=True):
                    dd = np.sqrt((xs - px_) ** 2 + (ys - py_) ** 2)
                    sub_e += 1.3 * _smoothstep(3.4, 2.6, dd)

    def _cells(self) -> CellSet:
        mpp = self.mpp
        reach = 16.0  # µm: the largest nucleus + cytoplasm halo
        x0 = self.cx0 * mpp - reach
        y0 = self.cy0 * mpp - reach
        x1 = (self.cx0 + self.cw) * mpp + reach
        y1 = (self.cy0 + self.ch) * mpp + reach
        # adipocyte nuclei sit up to ~19 µm from their cell centre
        c = self.t.cells(x0 - 20.0, y0 - 20.0, x1 + 20.0, y1 + 20.0)
        return c

    def _scatter(self, target: np.ndarray, r: np.ndarray, c: np.ndarray, v: np.ndarray) -> None:
        ok = (r >= 0) & (r < self.ch) & (c >= 0) & (c < self.cw) & (v != 0)
        idx = r[ok] * self.cw + c[ok]
        target += np.bincount(idx, weights=v[ok], minlength=self.ch * self.cw).reshape(target.shape)

    def _patches(
        self, cx: np.ndarray, cy: np.ndarray, radius_px: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pixel rows/cols of a square patch around each centre (µm), and the offsets (µm)
        of those pixel centres from the centre."""
        mpp = self.mpp
        pc = cx / mpp - self.cx0 - 0.5
        pr = cy / mpp - self.cy0 - 0.5
        rc = np.rint(pc).astype(np.int64)
        rr = np.rint(pr).astype(np.int64)
        d = np.arange(-radius_px, radius_px + 1)
        cols = rc[:, None, None] + d[None, None, :]
        rows = rr[:, None, None] + d[None, :, None]
        ex = (cols - pc[:, None, None]) * mpp
        ey = (rows - pr[:, None, None]) * mpp
        cols = np.broadcast_to(cols, (*ex.shape[:1], len(d), len(d)))
        rows = np.broadcast_to(rows, cols.shape)
        ex = np.broadcast_to(ex, cols.shape)
        ey = np.broadcast_to(ey, cols.shape)
        return rows, cols, ex, ey

    def _lookup(self, img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return img[np.clip(rows, 0, self.ch - 1), np.clip(cols, 0, self.cw - 1)]

    def _halos(self, cells: CellSet, H: np.ndarray, E: np.ndarray, mottle: np.ndarray) -> None:
        fac = _look_table("halo", 0)[cells.type]
        he = _look_table("halo", 1)[cells.type]
        hh = _look_table("halo", 2)[cells.type]
        has = fac > 0
        for look in np.unique(cells.type[has]):
            members = np.flatnonzero(has & (cells.type == look))
            rad_all = fac[members] * cells.a[members]
            if look == _T["neutrophil"]:
                rad_all = fac[members] * 1.5
            # chunks of similar size keep the square patches tight
            order = members[np.argsort(rad_all, kind="stable")]
            for s in range(0, len(order), 128):
                self._halo_chunk(cells, order[s : s + 128], look, fac, he, hh, H, E, mottle)

    def _halo_chunk(
        self,
        cells: CellSet,
        sel: np.ndarray,
        look: int,
        fac: np.ndarray,
        he: np.ndarray,
        hh: np.ndarray,
        H: np.ndarray,
        E: np.ndarray,
        mottle: np.ndarray,
    ) -> None:
        rad_a = fac[sel] * cells.a[sel]
        rad_b = fac[sel] * np.maximum(cells.b[sel], 0.75 * cells.a[sel])
        if look == _T["neutrophil"]:
            rad_a = rad_b = fac[sel] * 1.5
        rp = math.ceil(float(rad_a.max()) / self.mpp) + 2
        rows, cols, ex, ey = self._patches(cells.x[sel], cells.y[sel], rp)
        th = cells.theta[sel][:, None, None]
        u = ex * np.cos(th) + ey * np.sin(th)
        v = -ex * np.sin(th) + ey * np.cos(th)
        rho = np.sqrt((u / rad_a[:, None, None]) ** 2 + (v / rad_b[:, None, None]) ** 2)
        k, pr, pc = np.nonzero(rho < 1.0)
        rho = rho[k, pr, pc]
        rows, cols = rows[k, pr, pc], cols[k, pr, pc]
        m = _smoothstep(1.0, 0.75, rho)
        mot = self._lookup(mottle, rows, cols)
        foamy = 0.6 if look == _T["macrophage"] else 0.3
        ev = he[sel][k] * m * (1 - foamy / 2 + foamy * mot)
        hv = hh[sel][k] * m
        self._scatter(E, rows, cols, ev)
        self._scatter(H, rows, cols, hv)

    def _nuclei(self, cells: CellSet, H: np.ndarray, E: np.ndarray, fine: np.ndarray) -> None:
        tex = _look_table("tex")[cells.type]
        rim = _look_table("rim")[cells.type]
        # blobs: one per nucleus, three per neutrophil
        neut = cells.type == _T["neutrophil"]
        bx, by = [cells.nx[~neut]], [cells.ny[~neut]]
        src = [np.flatnonzero(~neut)]
        if neut.any():
            ni = np.flatnonzero(neut)
            la = cells.lobe_angle[ni]
            tx, ty = np.cos(la), np.sin(la)  # along the lobe chain
            for k in (-1.0, 0.0, 1.0):
                # outer lobes along the chain, the middle one bulging sideways
                side = _NEUT_BEND if k == 0 else 0.0
                bx.append(cells.nx[ni] + _NEUT_STEP * k * tx - side * ty)
                by.append(cells.ny[ni] + _NEUT_STEP * k * ty + side * tx)
                src.append(ni)
        bxa, bya, srca = np.concatenate(bx), np.concatenate(by), np.concatenate(src)
        extent = cells.a[srca] * (1.0 + np.abs(cells.harm[srca, :, 0]).sum(axis=1))
        order = np.argsort(extent, kind="stable")
        for s in range(0, len(order), 128):
            part = order[s : s + 128]
            rp = math.ceil(float(extent[part].max()) / self.mpp) + 2
            self._nucleus_chunk(cells, srca[part], bxa[part], bya[part], rp, tex, rim, H, E, fine)

    def _nucleus_chunk(
        self,
        cells: CellSet,
        ci: np.ndarray,
        cx: np.ndarray,
        cy: np.ndarray,
        rp: int,
        tex: np.ndarray,
        rim: np.ndarray,
        H: np.ndarray,
        E: np.ndarray,
        fine: np.ndarray,
    ) -> None:
        rows, cols, ex, ey = self._patches(cx, cy, rp)
        th = cells.theta[ci][:, None, None]
        u = ex * np.cos(th) + ey * np.sin(th)
        v = -ex * np.sin(th) + ey * np.cos(th)
        # only pixels inside the ellipse that bounds the wobbly outline are worked on
        grow = 1.0 + np.abs(cells.harm[ci, :, 0]).sum(axis=1)
        neut = cells.type[ci] == _T["neutrophil"]
        grow = np.where(neut, 1.0, grow)
        pad = self.mpp
        big_a = (cells.a[ci] * grow + pad)[:, None, None]
        big_b = (cells.b[ci] * grow + pad)[:, None, None]
        cand = (u / big_a) ** 2 + (v / big_b) ** 2 <= 1.0
        k, pr, pc = np.nonzero(cand)
        u, v = u[k, pr, pc], v[k, pr, pc]
        ex, ey = ex[k, pr, pc], ey[k, pr, pc]
        rows, cols = rows[k, pr, pc], cols[k, pr, pc]
        cik = ci[k]
        phi = np.arctan2(v, u)
        a = cells.a[cik]
        b = cells.b[cik]
        c, s_ = np.cos(phi), np.sin(phi)
        r_edge = 1.0 / np.sqrt((c / a) ** 2 + (s_ / b) ** 2)
        wob = np.zeros_like(phi)
        for j, order in enumerate((2, 3, 4)):
            wob += cells.harm[cik, j, 0] * np.cos(order * phi + cells.harm[cik, j, 1])
        r_edge = np.where(neut[k], r_edge, r_edge * (1.0 + wob))
        d = np.sqrt(u**2 + v**2)
        rho = d / np.maximum(r_edge, 1e-6)
        edge = 0.5 * self.mpp  # anti-aliased half-pixel edge
        mask = np.clip((r_edge - d) / edge + 0.5, 0.0, 1.0)
        prof = 1.0 - rim[cik] * (1.0 - np.clip(rho, 0, 1) ** 3)
        chrom = self._lookup(fine, rows, cols)
        texture = 1.0 + tex[cik] * (chrom - 0.5) * 2.0
        hv = cells.stain[cik] * prof * texture * mask
        nuc = cells.nucleolus[cik]
        if (nuc[:, 0] > 0).any():
            dx = ex - nuc[:, 1]
            dy = ey - nuc[:, 2]
            hv = hv + 0.9 * np.exp(-(dx**2 + dy**2) / (2 * 0.55**2)) * nuc[:, 0] * mask
        self._scatter(H, rows, cols, hv)
        self._scatter(E, rows, cols, 0.08 * mask)


def render_region(
    tissue: SyntheticTissue,
    y: int,
    x: int,
    h: int,
    w: int,
    *,
    mode: Literal["exact", "fast"] = "exact",
    exact_box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """RGB uint8 ``(h, w, 3)`` of ``tissue`` at pixel region ``(y, x, h, w)``.

    ``mode="exact"``: :meth:`SyntheticTissue.render`; ``"fast"``:
    :meth:`SyntheticTissue.render_fast`, exact inside ``exact_box`` = ``(y0, x0, y1, x1)``.
    """
    if mode == "exact":
        return tissue.render(y, x, h, w)
    if mode == "fast":
        return tissue.render_fast(y, x, h, w, exact_box=exact_box)
    raise SigmmaError(f"render mode must be 'exact' or 'fast', got {mode!r}")


# --- expression ---------------------------------------------------------------------------
# fmt: off
_MOD: dict[str, dict[str, float]] = {
    "epithelial_core": {"EPCAM": 6, "KRT8": 8, "KRT18": 8, "KRT19": 5, "CDH1": 4, "CLDN4": 3,
                        "CLDN7": 2, "ELF3": 2},
    "tumour": {"CEACAM5": 4, "CEACAM6": 3, "MUC1": 3, "TACSTD2": 3, "SOX9": 2, "MYC": 2,
               "ERBB2": 2, "CD24": 2, "AGR2": 2, "LCN2": 1.5},
    "luminal": {"KRT7": 3, "MUC5AC": 2, "TFF1": 3, "SPDEF": 2, "FOXA1": 2, "GATA3": 2,
                "XBP1": 2},
    "basal_like": {"VIM": 4, "ZEB1": 2, "SNAI2": 2, "TWIST1": 1.5, "KRT5": 3, "KRT14": 3,
                   "KRT17": 3, "S100A2": 2, "LAMC2": 2, "ITGA2": 1.5},
    "normal_epi": {"KRT5": 2, "KRT14": 1.5, "TP63": 2, "KRT15": 2, "PIGR": 3, "SCGB2A2": 2,
                   "LTF": 2, "ACTA2": 0.5, "MUC1": 1},
    "cycling": {"MKI67": 2, "TOP2A": 2, "CDK1": 1.5, "CCNB1": 1.5, "PCNA": 1.5, "TYMS": 1,
                "BIRC5": 1.5},
    "fibroblast": {"COL1A1": 10, "COL1A2": 8, "COL3A1": 8, "DCN": 6, "LUM": 5, "PDGFRA": 1.5,
                   "PDGFRB": 1.5, "FBLN1": 2, "SFRP2": 2, "MMP2": 2, "VIM": 3},
    "caf": {"FAP": 3, "POSTN": 4, "COL11A1": 3, "CTHRC1": 2, "INHBA": 2, "MMP11": 2,
            "COL10A1": 1.5},
    "t_cell": {"PTPRC": 5, "CD3E": 5, "CD3D": 4, "CD2": 3, "CD8A": 3, "CD4": 2, "IL7R": 3,
               "GZMK": 2, "NKG7": 1.5, "CCR7": 1.5, "TRAC": 3, "CD247": 2},
    "b_cell": {"PTPRC": 5, "MS4A1": 6, "CD79A": 5, "CD79B": 4, "CD19": 3, "PAX5": 2,
               "BANK1": 2, "CR2": 1.5, "FCER2": 1.5, "TCL1A": 2, "CXCR5": 1.5},
    "macrophage": {"CD68": 5, "CD163": 4, "LYZ": 5, "C1QA": 4, "C1QB": 4, "C1QC": 3,
                   "MRC1": 2, "CSF1R": 2.5, "AIF1": 3, "APOE": 3, "HLA-DRA": 4, "CD74": 4,
                   "SPP1": 1.5, "FCGR3A": 1.5},
    "endothelial": {"PECAM1": 5, "VWF": 6, "CDH5": 3, "CLDN5": 3, "KDR": 2, "EMCN": 2,
                    "PLVAP": 3, "ESAM": 2, "RAMP2": 2, "ACKR1": 1.5},
    "mural": {"ACTA2": 2, "RGS5": 2, "TAGLN": 2, "MYH11": 1, "NOTCH3": 1},
    "adipocyte": {"ADIPOQ": 6, "PLIN1": 5, "LEP": 3, "FABP4": 5, "CIDEA": 1.5, "LPL": 3,
                  "PPARG": 2, "CD36": 2},
    "neutrophil": {"S100A8": 6, "S100A9": 6, "CSF3R": 3, "FCGR3B": 4, "CXCR2": 3, "MNDA": 2,
                   "FPR1": 2, "SELL": 2},
    "interferon": {"CXCL9": 3, "CXCL10": 3, "STAT1": 2, "ISG15": 2, "IFI27": 1.5, "GBP1": 2,
                   "IDO1": 1.5},
    "hypoxia": {"VEGFA": 3, "CA9": 3, "SLC2A1": 3, "LDHA": 2, "NDRG1": 2, "ADM": 2,
                "BNIP3": 2, "PGK1": 1.5},
    "regional": {"AREG": 2, "TFF3": 2, "KRT23": 2, "CXCL14": 2},
    "invasion": {"TGFBI": 2, "FN1": 2, "SPARC": 2, "MMP14": 2, "TNC": 2, "VIM": 1},
    "lymphoid": {"CXCL13": 3, "CCL19": 3, "CCL21": 3, "LTB": 2},
}
# fmt: on


#: The simulated panel (real human gene symbols of a cancer panel).
GENES: tuple[str, ...] = tuple(sim.panel_genes(_MOD))


def _merge(*mods: tuple[str, float]) -> dict[str, float]:
    return sim.merge_modules(_MOD, *mods)


_PROGRAMS: dict[str, dict[str, float]] = {
    "tumour_a": _merge(("epithelial_core", 1.0), ("tumour", 1.0), ("luminal", 1.0)),
    "tumour_b": _merge(("epithelial_core", 0.8), ("tumour", 1.0), ("basal_like", 1.0)),
    "fibroblast": _merge(("fibroblast", 1.0)),
    "t_cell": _merge(("t_cell", 1.0)),
    "b_cell": _merge(("b_cell", 1.0)),
    "macrophage": _merge(("macrophage", 1.0)),
    "endothelial": _merge(("endothelial", 1.0), ("mural", 0.4)),
    "epithelial": _merge(("epithelial_core", 1.0), ("normal_epi", 1.0)),
    "adipocyte": _merge(("adipocyte", 1.0), ("fibroblast", 0.05)),
    "neutrophil": _merge(("neutrophil", 1.0)),
}


def simulate_expression(
    cells: CellSet,
    xy_um: np.ndarray,
    cell_area_um2: np.ndarray,
    side_um: float,
    rng: np.random.Generator,
) -> tuple[Any, pd.DataFrame]:
    """Counts (CSR, cells x (genes + controls)) and the features table.

    Mean expression = library size x the type's program, plus: hypoxia genes graded towards
    necrotic cores (all cells in tumour), a regional gradient along x (tumour and
    epithelium), interferon genes in proportion to the T cells within 30 µm (all cells),
    CAF genes in fibroblasts in proportion to tumour neighbours, invasion genes in tumour
    cells in proportion to fibroblast neighbours, lymphoid chemokines in aggregate cores,
    proliferation in a share of tumour and B cells, and an 8 % ambient spill-over from the six
    nearest cells. Counts are negative binomial with per-gene dispersion.
    """
    import scipy.sparse as sp

    genes = list(GENES)
    gi = {g: i for i, g in enumerate(genes)}
    n, g = len(cells), len(genes)
    prog = sim.program_matrix(genes, CELL_TYPES, _PROGRAMS, baseline=0.02, rng=rng)
    types = cells.type

    def module(name: str) -> np.ndarray:
        v = np.zeros(g)
        for gene, w in _MOD[name].items():
            v[gi[gene]] = w
        return v / v.sum()

    frac, _ = sim.neighbour_fractions(xy_um, types, len(CELL_TYPES), radius=30.0)
    tumourish = np.isin(types, [_T["tumour_a"], _T["tumour_b"]])
    epithelial = tumourish | (types == _T["epithelial"])
    tumour_nb = frac[:, _T["tumour_a"]] + frac[:, _T["tumour_b"]]
    lymphoid = cells.core & np.isin(types, [_T["b_cell"], _T["macrophage"], _T["fibroblast"]])
    p_cyc = np.select(
        [types == _T["tumour_b"], types == _T["tumour_a"], (types == _T["b_cell"]) & cells.core],
        [0.30, 0.10, 0.15],
        0.02,
    )
    cycling = rng.random(n) < p_cyc
    modulation = [
        (0.25 * cells.hypoxia, module("hypoxia")),
        (0.10 * epithelial * np.clip(xy_um[:, 0] / side_um, 0, 1), module("regional")),
        (0.12 * np.clip(frac[:, _T["t_cell"]] * 2.0, 0, 1), module("interferon")),
        (0.20 * (types == _T["fibroblast"]) * np.clip(tumour_nb * 2.0, 0, 1), module("caf")),
        (0.10 * tumourish * np.clip(frac[:, _T["fibroblast"]] * 3.0, 0, 1), module("invasion")),
        (0.06 * lymphoid, module("lymphoid")),
        (0.07 * cycling, module("cycling")),
    ]
    prop = sim.compose_proportions(prog, types, modulation, xy_um, spill=0.08)
    area_rel = cell_area_um2 / max(float(np.median(cell_area_um2)), 1e-6)
    library = np.exp(rng.normal(np.log(160.0), 0.4, n)) * np.clip(area_rel, 0.2, 5.0) ** 0.5
    dispersion = np.exp(rng.normal(np.log(4.0), 0.5, g))
    prop *= library[:, None].astype(np.float32)
    gene_counts = sim.sample_counts(prop, dispersion, rng)
    controls = sim.control_features()
    ctrl = sim.control_counts(n, len(controls), library, rng)
    counts = sp.hstack([gene_counts, sp.csr_matrix(ctrl)], format="csr").astype(np.int32)
    return counts, sim.make_features(genes, controls)


# --- the bundle ---------------------------------------------------------------------------
@dataclass
class _Geometry:
    nucleus_rings: np.ndarray  # (N, A+1, 2) µm, slide frame
    cell_rings: np.ndarray
    cell_radii: np.ndarray  # (N, A) around (x, y)
    nucleus_area: np.ndarray  # µm²
    cell_area: np.ndarray
    cell_centroid: np.ndarray  # (N, 2) µm, slide frame


def _polygons(cells: CellSet) -> _Geometry:
    """Nucleus and cell polygons: the rendered nucleus outline, and the cell grown around it
    by ``EXPANSION_UM`` and cut at the bisectors with its neighbours (adipocytes: their
    whole Voronoi-like cell)."""
    nuc_r = cells.nucleus_radii()
    adipo = cells.type == _T["adipocyte"]
    base = np.where(adipo[:, None], 0.0, nuc_r)
    floor = np.where(adipo, _ADIPO_R * 1.3, 0.0)
    centres = np.column_stack([cells.x, cells.y])
    cell_r = sim.expand_star(centres, base, np.where(adipo, 0.0, EXPANSION_UM), min_radius=floor)
    nuc_c = np.column_stack([cells.nx, cells.ny])
    nuc_area, _ = sim.star_area_centroid(nuc_c, nuc_r)
    cell_area, cell_c = sim.star_area_centroid(centres, cell_r)
    return _Geometry(
        nucleus_rings=sim.star_rings(nuc_c, nuc_r),
        cell_rings=sim.star_rings(centres, cell_r),
        cell_radii=cell_r,
        nucleus_area=nuc_area,
        cell_area=cell_area,
        cell_centroid=cell_c,
    )


def _choose_pixel_size(side_um: float) -> float:
    # keep the morphology frame (and the label masks) at most ~20k px on a side
    return max(PIXEL_SIZE, round(side_um / 20000.0, 4))


def _thinned_transcripts(
    counts: Any,
    names: np.ndarray,
    cell_ids: np.ndarray,
    centres_um: np.ndarray,
    cell_radii_um: np.ndarray,
    budget: int,
    to_xenium: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
) -> pd.DataFrame:
    """A random ``budget``-sized share of the transcripts, each inside its star-shaped cell
    (drawn in the slide frame, then mapped to Xenium µm)."""
    coo = counts.tocoo()
    total = int(coo.data.sum())
    keep = rng.binomial(coo.data.astype(np.int64), min(1.0, budget / max(total, 1)))
    cell = np.repeat(coo.row, keep)
    feat = np.repeat(coo.col, keep)
    m = len(cell)
    ang = rng.random(m) * 2 * np.pi
    na = cell_radii_um.shape[1]
    k = np.floor(ang / (2 * np.pi) * na).astype(np.int64) % na
    r = cell_radii_um[cell, k] * np.sqrt(rng.random(m)) * 0.95
    xy = to_xenium(
        np.column_stack(
            [centres_um[cell, 0] + r * np.cos(ang), centres_um[cell, 1] + r * np.sin(ang)]
        )
    )
    return pd.DataFrame(
        {
            "x_location": xy[:, 0].astype(np.float32),
            "y_location": xy[:, 1].astype(np.float32),
            "z_location": rng.uniform(8.0, 22.0, m).astype(np.float32),
            "feature_name": names[feat],
            "cell_id": cell_ids[cell],
            "qv": rng.uniform(20.0, 40.0, m).astype(np.float32),
            "overlaps_nucleus": (r < 0.45 * cell_radii_um[cell, k]).astype(np.uint8),
        }
    )


def _warm_bank(tissue: SyntheticTissue) -> None:
    """Render every bank tile of ``tissue`` now (before forking render workers)."""
    bank = tissue.__dict__.setdefault("_bank", {})
    for d in range(len(DOMAINS)):
        for k in range(FAST_BANK_SIZE):
            if (d, k) not in bank:
                bank[(d, k)] = _render_bank_tile(tissue, d, k)


_AHEAD_RENDER: Callable[[int, int, int, int], np.ndarray] | None = None


def _ahead_tile(region: tuple[int, int, int, int]) -> np.ndarray:
    assert _AHEAD_RENDER is not None  # set before the workers were forked
    return _AHEAD_RENDER(*region)


class _RenderAhead:
    """Renders a slide's tiles in forked worker processes, in the writer's order (tile rows,
    left to right), a few tiles ahead of the writer; any other request renders here."""

    def __init__(
        self, render: Callable[[int, int, int, int], np.ndarray], size: int, tile: int, workers: int
    ) -> None:
        import multiprocessing
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor

        global _AHEAD_RENDER
        _AHEAD_RENDER = render
        self._render = render
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        self._order = (
            (y, x, min(tile, size - y), min(tile, size - x))
            for y in range(0, size, tile)
            for x in range(0, size, tile)
        )
        self._pending: deque[tuple[tuple[int, int, int, int], Any]] = deque()
        self._ahead = 6 * workers
        self._fill()  # the first submission forks the workers

    def _fill(self) -> None:
        while len(self._pending) < self._ahead:
            region = next(self._order, None)
            if region is None:
                return
            self._pending.append((region, self._pool.submit(_ahead_tile, region)))

    def __call__(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self._pending and self._pending[0][0] == (y, x, h, w):
            _, fut = self._pending.popleft()
            self._fill()
            return fut.result()
        return self._render(y, x, h, w)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def xenium_cells(
    cs: CellSet, geo: Any, cell_xy: np.ndarray, to_xenium: Callable[[np.ndarray], np.ndarray]
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The cells table of placed cells (Xenium ids, centroids ``cell_xy`` in Xenium µm, areas,
    ground-truth type) and their nucleus and cell rings mapped by ``to_xenium``, ``(n, k, 2)``
    each: what a bundle writer takes, shared by the synthetic and layout generators."""
    from napari_sigmma.io.xenium_format import xenium_cell_ids

    n, k = len(cs), geo.nucleus_rings.shape[1]
    table = pd.DataFrame(
        {
            "cell_id": np.asarray(xenium_cell_ids(n)),
            "x_centroid": cell_xy[:, 0],
            "y_centroid": cell_xy[:, 1],
            "cell_area": geo.cell_area,
            "nucleus_area": geo.nucleus_area,
            "cell_type": np.asarray(CELL_TYPES)[cs.type],
        }
    )
    nuc_um = to_xenium(geo.nucleus_rings.reshape(-1, 2)).reshape(n, k, 2)
    cell_um = to_xenium(geo.cell_rings.reshape(-1, 2)).reshape(n, k, 2)
    return table, nuc_um, cell_um


def write_synthetic_sample(
    out: str | os.PathLike[str],
    *,
    size: int = 4096,
    seed: int = 0,
    mpp: float = 0.5,
    cells: Literal["auto", "all", "window"] = "auto",
    cell_window: int = MAX_CELL_SIDE,
    render: Literal["auto", "exact", "fast"] = "auto",
    max_transcripts: int = 2_000_000,
    progress: Callable[[str], None] | None = None,
    maxworkers: int = 2,
    workers: int = 1,
    tile_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a synthetic paired sample (procedural H&E + simulated Xenium) into ``out``.

    Over 120 lines because of its parameter documentation; the body is a short sequence of
    steps (tissue, cells, expression, H&E, bundle, ground truth) that share the affine.

    Parameters
    ----------
    out
        Output folder (a Xenium bundle; created).
    size
        Side of the square H&E in pixels (at ``mpp``). The H&E is rendered tile by tile
        and streamed to disk, so any size fits in memory (100k px: see ``render``).
    seed
        Seed of the tissue, the cells and the expression.
    mpp
        µm per H&E pixel.
    cells
        ``"auto"``: cells on the whole slide up to ``cell_window`` px, else in a centred
        ``cell_window`` px window; ``"all"``: always the whole slide; ``"window"``: always
        the window.
    cell_window
        Side (px) of the centred cell window (default ``MAX_CELL_SIDE``).
    render
        How the H&E is rendered. ``"exact"``: every pixel by :meth:`SyntheticTissue.render`
        (~0.25 s of CPU per 512 px tile). ``"fast"``: exact inside the cell window (plus
        ``EXACT_MARGIN_UM``), composed by :meth:`SyntheticTissue.render_fast` outside it
        (~15 ms per tile: right domains, stand-in texture and nuclei); needs a window.
        ``"auto"``: ``"fast"`` when there is a cell window, else ``"exact"``.
    max_transcripts
        Above this many counts in all, ``transcripts.parquet`` holds a random share of them
        (the cell-feature matrix always has all counts).
    progress
        Optional callable receiving short progress messages.
    tile_progress
        Optional ``tile_progress(done, total)`` after each level-0 H&E tile rendered.
    maxworkers
        Threads encoding the H&E tiles (JPEG).
    workers
        Processes rendering H&E tiles ahead of the writer (``1``: render in this
        process). Forked before the cells are placed; the pixels do not depend on it.

    Returns
    -------
    The bundle folder.
    """
    from napari_sigmma.samples.xenium_write import write_xenium_bundle

    say = progress or (lambda _msg: None)
    out = Path(out)
    tissue = SyntheticTissue(size, seed=seed, mpp=mpp)
    side = tissue.side_um
    window, exact_box = _cell_window(size, mpp, side, cells, cell_window, render, out)
    fast = window is not None and render != "exact"

    def render_tile(y: int, x: int, h: int, w: int) -> np.ndarray:
        if fast:
            return tissue.render_fast(y, x, h, w, exact_box=exact_box)
        return tissue.render(y, x, h, w)

    ahead = None
    if workers > 1:
        if fast:
            say("rendering the tile bank")
            _warm_bank(tissue)
        # forked now, while this process is small: the workers inherit the tissue and bank
        ahead = _RenderAhead(render_tile, size, FAST_TILE, workers)
    say("placing cells")
    cs = tissue.all_cells(window=window)
    if len(cs) < 10:
        raise SigmmaError(f"only {len(cs)} cells on a {size} px slide: make it larger", path=out)
    geo = _polygons(cs)

    pixel_size = _choose_pixel_size(side)
    a = _he_to_morph(size, mpp, pixel_size)

    def to_xenium(xy_slide_um: np.ndarray) -> np.ndarray:
        px = xy_slide_um / mpp
        return (px @ a[:2, :2].T + a[:2, 2]) * pixel_size

    n = len(cs)
    cell_xy = to_xenium(geo.cell_centroid)
    say(f"simulating expression of {n} cells")
    rng = np.random.default_rng([seed, 1])
    counts, features = simulate_expression(cs, cell_xy, geo.cell_area, side, rng)
    table, nuc_um, cell_um = xenium_cells(cs, geo, cell_xy, to_xenium)
    ids = table["cell_id"].to_numpy()

    out.mkdir(parents=True, exist_ok=True)
    he_path = out / "he_image.ome.tif"
    if fast:
        say(f"rendering the {size} x {size} px H&E (exact in the cell window, composed outside)")
    else:
        say(f"rendering the {size} x {size} px H&E")

    _write_he(he_path, render_tile, ahead, size, mpp, maxworkers, say, tile_progress)
    transcripts = None
    if int(counts.sum()) > max_transcripts:
        transcripts = _thinned_transcripts(
            counts,
            features["name"].to_numpy(),
            ids,
            np.column_stack([cs.x, cs.y]),
            geo.cell_radii,
            max_transcripts,
            to_xenium,
            np.random.default_rng([seed, 2]),
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
        transcripts=transcripts,
        seed=seed,
    )
    _write_ground_truth(Path(path), table, cs, geo, mpp)
    return Path(path)


def _cell_window(
    size: int,
    mpp: float,
    side: float,
    cells: str,
    cell_window: int,
    render: str,
    out: Path,
) -> tuple[tuple[float, float, float, float] | None, tuple[int, int, int, int] | None]:
    """Check the options; return the centred cell window (µm; ``None``: the whole slide)
    and the H&E pixel box rendered exactly when the rest is composed (``None``: all)."""
    if cells not in ("auto", "all", "window"):
        raise SigmmaError(f"cells must be 'auto', 'all' or 'window', got {cells!r}", path=out)
    if render not in ("auto", "exact", "fast"):
        raise SigmmaError(f"render must be 'auto', 'exact' or 'fast', got {render!r}", path=out)
    if cell_window < 64:
        raise SigmmaError(f"cell_window must be at least 64 px, got {cell_window}", path=out)
    window = None
    exact_box = None
    if cells == "window" or (cells == "auto" and size > cell_window):
        half = min(cell_window, size) * mpp / 2
        window = (side / 2 - half, side / 2 - half, side / 2 + half, side / 2 + half)
        m = EXACT_MARGIN_UM
        exact_box = (
            max(0, math.floor((window[1] - m) / mpp)),
            max(0, math.floor((window[0] - m) / mpp)),
            min(size, math.ceil((window[3] + m) / mpp)),
            min(size, math.ceil((window[2] + m) / mpp)),
        )
    if render == "fast" and window is None:
        raise SigmmaError(
            "render='fast' needs a cell window (cells='window', or a slide larger than "
            f"cell_window={cell_window} px)",
            path=out,
        )
    return window, exact_box


def _he_to_morph(size: int, mpp: float, pixel_size: float) -> np.ndarray:
    """The H&E px → morphology px affine: scaled, rotated by ``ROTATION_DEG`` and shifted
    so the rotated slide starts ``FRAME_MARGIN`` px inside the frame."""
    a = sim.similarity_affine(mpp / pixel_size, ROTATION_DEG, 0.0, 0.0)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], float) @ a.T
    a[0, 2] = FRAME_MARGIN - corners[:, 0].min()
    a[1, 2] = FRAME_MARGIN - corners[:, 1].min()
    return a


def _write_he(
    he_path: Path,
    render_tile: Callable[[int, int, int, int], np.ndarray],
    ahead: Any,
    size: int,
    mpp: float,
    maxworkers: int,
    say: Callable[[str], None],
    tile_progress: Callable[[int, int], None] | None,
) -> None:
    """Render the H&E tile by tile (through the workers ``ahead`` when given, closed at the
    end) and stream it into a pyramidal OME-TIFF."""
    from napari_sigmma.samples.tiffwrite import write_pyramidal_ome_tiff

    rows = math.ceil(size / FAST_TILE)
    rendered = [0]

    def source(y: int, x: int, h: int, w: int) -> np.ndarray:
        if x == 0 and rows >= 16:
            say(f"H&E tile row {y // FAST_TILE + 1}/{rows}")
        tile = ahead(y, x, h, w) if ahead is not None else render_tile(y, x, h, w)
        if tile_progress is not None:
            rendered[0] += 1
            tile_progress(rendered[0], rows * rows)
        return tile

    try:
        write_pyramidal_ome_tiff(
            he_path,
            source,
            shape=(size, size, 3),
            mpp=mpp,
            tile=FAST_TILE,
            compression="jpeg",
            maxworkers=maxworkers,
        )
    finally:
        if ahead is not None:
            ahead.close()


def _write_ground_truth(path: Path, table: pd.DataFrame, cs: CellSet, geo: Any, mpp: float) -> None:
    """Write the cells' true type, domain, programme flags and H&E positions."""
    truth = table[["cell_id", "cell_type"]].copy()
    truth["domain"] = np.asarray(DOMAINS)[cs.domain]
    truth["immune_core"] = cs.core
    truth["hypoxia"] = cs.hypoxia
    truth["he_x"] = geo.cell_centroid[:, 0] / mpp
    truth["he_y"] = geo.cell_centroid[:, 1] / mpp
    truth["nucleus_he_x"] = cs.nx / mpp
    truth["nucleus_he_y"] = cs.ny / mpp
    truth.to_parquet(Path(path) / GROUND_TRUTH_FILE, index=False)
