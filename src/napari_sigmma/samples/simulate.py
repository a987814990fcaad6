"""Shared machinery of the two paired-sample generators (:mod:`.sample`, :mod:`.synthetic`).

* Counter-based randomness: :func:`hash_uniform` turns integer keys (seed, stream, lattice
  indices, …) into uniform numbers with SplitMix64, so any region of a procedural slide
  can be generated on its own and always comes out the same (tile determinism).
* Smooth random fields: :func:`value_noise` / :func:`fbm` on a hashed lattice.
* Star-shaped polygons: nuclei as radii over a fixed set of angles, measured on a label
  image (:func:`star_radii_from_labels`) or drawn analytically; cells as the nucleus grown
  by a fixed distance and cut at the perpendicular bisectors with the neighbouring cells
  (:func:`expand_star`), which is how Xenium's nucleus-expansion segmentation behaves.
* Expression: negative binomial counts from per-type programs with library-size variation
  (:func:`sample_counts`), neighbourhood composition (:func:`neighbour_fractions`), ambient
  spill-over from neighbours, and control probes / codewords (:func:`control_features`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = [
    "ANGLES",
    "N_ANGLES",
    "compose_proportions",
    "control_counts",
    "control_features",
    "expand_star",
    "fbm",
    "hash_u64",
    "hash_uniform",
    "make_features",
    "neighbour_fractions",
    "neighbour_mean",
    "normal_from_uniform",
    "program_matrix",
    "sample_counts",
    "similarity_affine",
    "star_area_centroid",
    "star_radii_from_labels",
    "star_rings",
    "value_noise",
]

#: Number of vertices of every simulated polygon.
N_ANGLES = 24
#: Polygon vertex angles (radians), shared by all star-shaped polygons.
ANGLES = np.linspace(0.0, 2.0 * np.pi, N_ANGLES, endpoint=False)

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_KEY_MULT = np.uint64(0xD6E8FEB86659FD93)


# --- counter-based random numbers ---------------------------------------------------------
def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (uint64 in, uint64 out; wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _M1
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
        return z ^ (z >> np.uint64(31))


def _as_u64(v: np.ndarray | int) -> np.ndarray:
    # negative lattice indices wrap to large unsigned values: still distinct keys
    return np.asarray(v).astype(np.int64).astype(np.uint64)


def hash_u64(*keys: np.ndarray | int) -> np.ndarray:
    """Hash integer keys (broadcast together) to uint64 words."""
    h = np.uint64(0x243F6A8885A308D3)
    with np.errstate(over="ignore"):
        for k in keys:
            h = _splitmix((h * _KEY_MULT) ^ _as_u64(k))
    return np.asarray(h)


def hash_uniform(*keys: np.ndarray | int) -> np.ndarray:
    """Uniform numbers in [0, 1) determined by the integer keys (broadcast together)."""
    return (hash_u64(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def normal_from_uniform(u: np.ndarray) -> np.ndarray:
    """Standard normal deviates from uniforms (inverse CDF, clipped away from 0 and 1)."""
    from scipy.special import ndtri

    return ndtri(np.clip(u, 1e-12, 1.0 - 1e-12))


# --- smooth random fields -----------------------------------------------------------------
def value_noise(x: np.ndarray, y: np.ndarray, scale: float, seed: int, stream: int) -> np.ndarray:
    """Smooth noise in [0, 1): hashed values on a square lattice of spacing ``scale``,
    interpolated with a quintic fade.

    ``x`` and ``y`` are absolute coordinates (any unit, the same as ``scale``), so the field
    does not depend on which region is evaluated.
    """
    gx = np.asarray(x, dtype=np.float64) / scale
    gy = np.asarray(y, dtype=np.float64) / scale
    ix = np.floor(gx)
    iy = np.floor(gy)
    fx = gx - ix
    fy = gy - iy
    ix = ix.astype(np.int64)
    iy = iy.astype(np.int64)
    ux = fx * fx * fx * (fx * (fx * 6 - 15) + 10)
    uy = fy * fy * fy * (fy * (fy * 6 - 15) + 10)
    if ix.size == 0:
        return np.zeros(ix.shape)
    x0, x1 = int(ix.min()), int(ix.max()) + 2
    y0, y1 = int(iy.min()), int(iy.max()) + 2
    if (x1 - x0) * (y1 - y0) <= max(64, ix.size):
        # hash each lattice point once and gather (same values as hashing per corner)
        table = hash_uniform(seed, stream, np.arange(x0, x1)[None, :], np.arange(y0, y1)[:, None])
        jx = ix - x0
        jy = iy - y0
        v00 = table[jy, jx]
        v10 = table[jy, jx + 1]
        v01 = table[jy + 1, jx]
        v11 = table[jy + 1, jx + 1]
    else:
        v00 = hash_uniform(seed, stream, ix, iy)
        v10 = hash_uniform(seed, stream, ix + 1, iy)
        v01 = hash_uniform(seed, stream, ix, iy + 1)
        v11 = hash_uniform(seed, stream, ix + 1, iy + 1)
    a = v00 + ux * (v10 - v00)
    b = v01 + ux * (v11 - v01)
    return a + uy * (b - a)


def fbm(
    x: np.ndarray, y: np.ndarray, scale: float, seed: int, stream: int, *, octaves: int = 3
) -> np.ndarray:
    """Fractal sum of :func:`value_noise` octaves, rescaled to keep its mean at 0.5 and a
    spread comparable to one octave (values roughly in [0.1, 0.9])."""
    total = np.zeros(np.broadcast(x, y).shape)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += amp * (value_noise(x, y, scale / 2**o, seed, stream * 16 + o) - 0.5)
        norm += amp
        amp *= 0.5
    # the sum of independent octaves is narrower than one octave; stretch it back
    return 0.5 + total / norm * 1.6


# --- star-shaped polygons -----------------------------------------------------------------
def star_radii_from_labels(
    labels: np.ndarray,
    centres_yx: np.ndarray,
    label_ids: np.ndarray,
    *,
    max_radius: float,
    step: float = 0.5,
) -> np.ndarray:
    """Radii of each labelled object along :data:`ANGLES`, measured from its centre.

    The radius along an angle is the first distance where the ray leaves the object's label
    (nearest-pixel sampling). Objects whose centre is not on their own label (concave
    shapes) get the radius at which the ray first *enters* their label, then leaves it.

    Returns
    -------
    (N, len(ANGLES)) float array in pixels.
    """
    n = len(label_ids)
    if n == 0:
        return np.zeros((0, N_ANGLES))
    r = np.arange(step, max_radius + step, step)
    dy = np.sin(ANGLES)[:, None] * r[None, :]
    dx = np.cos(ANGLES)[:, None] * r[None, :]
    h, w = labels.shape
    out = np.empty((n, N_ANGLES))
    chunk = 4096
    for s in range(0, n, chunk):
        c = centres_yx[s : s + chunk]
        ids = label_ids[s : s + chunk]
        yy = np.rint(c[:, 0, None, None] + dy[None]).astype(np.int64)
        xx = np.rint(c[:, 1, None, None] + dx[None]).astype(np.int64)
        valid = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        sampled = labels[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        inside = valid & (sampled == ids[:, None, None])
        # last index of the first run of "inside" along each ray
        seen = np.maximum.accumulate(inside, axis=2)
        left = seen & ~inside
        first_out = np.where(left.any(axis=2), left.argmax(axis=2), len(r))
        radius = np.where(seen.any(axis=2), r[np.maximum(first_out - 1, 0)] + step / 2, 0.0)
        out[s : s + chunk] = radius
    # a ray that never touched the label (thin concave spots) borrows its neighbours' radius
    zero = out <= 0
    if zero.any():
        mean = np.where(zero, np.nan, out)
        fill = np.nan_to_num(np.nanmean(mean, axis=1), nan=step)
        out = np.where(zero, fill[:, None], out)
    return out


def expand_star(
    centres: np.ndarray,
    nucleus_radii: np.ndarray,
    expansion: np.ndarray | float,
    *,
    k: int = 10,
    min_radius: np.ndarray | None = None,
) -> np.ndarray:
    """Cell radii: the nucleus grown by ``expansion`` along each angle, cut at the
    perpendicular bisector with each of the ``k`` nearest other cells (a Voronoi clip),
    never smaller than the nucleus.

    Parameters
    ----------
    centres
        (N, 2) x, y in any unit (the same as the radii).
    nucleus_radii
        (N, A) radii along :data:`ANGLES`.
    expansion
        Growth per cell (scalar or (N,)).
    min_radius
        Optional (N,) floor for the expanded radius (before the bisector cut).

    Returns
    -------
    (N, A) radii.
    """
    from scipy.spatial import cKDTree

    n = len(centres)
    grow = nucleus_radii + np.broadcast_to(np.asarray(expansion, float), (n,))[:, None]
    if min_radius is not None:
        grow = np.maximum(grow, np.asarray(min_radius)[:, None])
    if n < 2:
        return grow
    kk = min(k + 1, n)
    _, idx = cKDTree(centres).query(centres, k=kk)
    ux = np.cos(ANGLES)
    uy = np.sin(ANGLES)
    limit = np.full_like(grow, np.inf)
    for j in range(1, kk):
        d = centres[idx[:, j]] - centres  # (N, 2)
        proj = d[:, 0, None] * ux[None] + d[:, 1, None] * uy[None]  # (N, A)
        half = 0.5 * (d**2).sum(axis=1)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(proj > 1e-9, half / proj, np.inf)
        limit = np.minimum(limit, t)
    return np.maximum(np.minimum(grow, limit), nucleus_radii)


def star_rings(centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(N, A+1, 2) closed rings (x, y) of star polygons (first vertex repeated)."""
    x = centres[:, 0, None] + radii * np.cos(ANGLES)[None]
    y = centres[:, 1, None] + radii * np.sin(ANGLES)[None]
    ring = np.stack([x, y], axis=-1)
    return np.concatenate([ring, ring[:, :1]], axis=1)


def star_area_centroid(centres: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area (N,) and centroid (N, 2) of star polygons (shoelace formula)."""
    ring = star_rings(centres, radii)
    x0, y0 = ring[:, :-1, 0], ring[:, :-1, 1]
    x1, y1 = ring[:, 1:, 0], ring[:, 1:, 1]
    cross = x0 * y1 - x1 * y0
    a = 0.5 * cross.sum(axis=1)
    safe = np.where(np.abs(a) > 1e-12, a, 1e-12)
    cx = ((x0 + x1) * cross).sum(axis=1) / (6 * safe)
    cy = ((y0 + y1) * cross).sum(axis=1) / (6 * safe)
    return np.abs(a), np.stack([cx, cy], axis=1)


def similarity_affine(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    """3x3 matrix ``[[s cos, -s sin, tx], [s sin, s cos, ty], [0, 0, 1]]`` (x, y order)."""
    t = np.deg2rad(angle_deg)
    c, s = np.cos(t) * scale, np.sin(t) * scale
    return np.array([[c, -s, tx], [s, c, ty], [0.0, 0.0, 1.0]])


# --- expression ---------------------------------------------------------------------------
def panel_genes(modules: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Gene symbols of all expression modules, in first-seen order (the simulated panel)."""
    seen: dict[str, None] = {}
    for mod in modules.values():
        for g in mod:
            seen.setdefault(g, None)
    return list(seen)


def merge_modules(
    modules: Mapping[str, Mapping[str, float]], *weighted: tuple[str, float]
) -> dict[str, float]:
    """A cell type's program: the weighted sum of named expression modules."""
    out: dict[str, float] = {}
    for name, w in weighted:
        for g, v in modules[name].items():
            out[g] = out.get(g, 0.0) + w * v
    return out


def program_matrix(
    genes: Sequence[str],
    types: Sequence[str],
    programs: Mapping[str, Mapping[str, float]],
    *,
    baseline: float = 0.03,
    rng: np.random.Generator,
) -> np.ndarray:
    """(T, G) expression proportions: a small random baseline for every gene plus each
    type's marker weights; rows sum to 1."""
    gi = {g: i for i, g in enumerate(genes)}
    m = baseline * rng.lognormal(0.0, 0.6, size=(len(types), len(genes)))
    for t, name in enumerate(types):
        for g, w in programs.get(name, {}).items():
            m[t, gi[g]] += w * rng.lognormal(0.0, 0.1)
    return m / m.sum(axis=1, keepdims=True)


def neighbour_fractions(
    xy: np.ndarray, types: np.ndarray, n_types: int, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Composition of each cell's neighbourhood within ``radius`` (the cell excluded).

    Returns
    -------
    fractions (N, T) (rows sum to 1, or 0 without neighbours) and neighbour counts (N,).
    """
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    n = len(xy)
    tree = cKDTree(xy)
    pairs = tree.query_pairs(radius, output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros((n, n_types)), np.zeros(n)
    i = np.concatenate([pairs[:, 0], pairs[:, 1]])
    j = np.concatenate([pairs[:, 1], pairs[:, 0]])
    adj = sp.csr_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), types)), shape=(n, n_types))
    counts = np.asarray((adj @ onehot).todense())
    deg = counts.sum(axis=1)
    frac = counts / np.maximum(deg, 1)[:, None]
    return frac, deg


def neighbour_mean(
    xy: np.ndarray, values: np.ndarray, k: int = 6, *, chunk: int = 20_000
) -> np.ndarray:
    """Mean of ``values`` (N, G) over each cell's ``k`` nearest neighbours (chunked rows, so
    the (rows, k, G) gather stays small)."""
    from scipy.spatial import cKDTree

    n = len(xy)
    if n < 2:
        return np.zeros_like(values)
    kk = min(k + 1, n)
    _, idx = cKDTree(xy).query(xy, k=kk)
    out = np.empty_like(values)
    for s in range(0, n, chunk):
        out[s : s + chunk] = values[idx[s : s + chunk, 1:]].mean(axis=1)
    return out


def compose_proportions(
    programs: np.ndarray,
    types: np.ndarray,
    modulation: Sequence[tuple[np.ndarray, np.ndarray]],
    xy: np.ndarray,
    *,
    spill: float = 0.08,
    k: int = 6,
) -> np.ndarray:
    """Per-cell expression proportions (N, G) as float32.

    Each cell starts from its type's program (rows of ``programs``), gets every
    ``(weight (N,), module (G,))`` of ``modulation`` added, is renormalised, and mixes in
    ``spill`` of its ``k`` nearest neighbours' profiles (ambient RNA, imperfect
    segmentation). Modules enter as one (N, M) @ (M, G) product, so memory stays at a few
    (N, G) float32 arrays.
    """
    prop = programs[types].astype(np.float32)
    if modulation:
        w = np.column_stack([np.asarray(m[0], np.float32) for m in modulation])
        mods = np.stack([np.asarray(m[1], np.float32) for m in modulation])
        prop += w @ mods
    prop /= prop.sum(axis=1, keepdims=True)
    if spill > 0:
        nb = neighbour_mean(xy, prop, k=k)
        prop *= 1.0 - spill
        nb *= spill
        prop += nb
    return prop


def sample_counts(
    mean: np.ndarray, dispersion: np.ndarray, rng: np.random.Generator, *, chunk: int = 50_000
) -> sp.csr_matrix:
    """Negative binomial counts (gamma-Poisson) with the given means (N, G) and per-gene
    dispersion ``r`` (variance ``mu + mu^2 / r``); returned as an int32 CSR matrix."""
    import scipy.sparse as sp

    parts = []
    r = np.asarray(dispersion, dtype=np.float64)[None, :]
    for s in range(0, mean.shape[0], chunk):
        mu = mean[s : s + chunk]
        lam = rng.gamma(shape=np.broadcast_to(r, mu.shape), scale=mu / r)
        parts.append(sp.csr_matrix(rng.poisson(lam).astype(np.int32)))
    if not parts:
        return sp.csr_matrix((0, mean.shape[1]), dtype=np.int32)
    return sp.vstack(parts, format="csr")


def control_features(
    n_probe: int = 20, n_codeword: int = 20, n_unassigned: int = 20
) -> pd.DataFrame:
    """Control features named as in Xenium panels (``NegControlProbe_*``, …)."""
    from napari_sigmma.io import xenium_format as xf

    rows = []
    for i in range(n_probe):
        rows.append((f"NegControlProbe_{i:05d}", xf.NEG_CONTROL_PROBE))
    for i in range(n_codeword):
        rows.append((f"NegControlCodeword_{500 + i:04d}", xf.NEG_CONTROL_CODEWORD))
    for i in range(n_unassigned):
        rows.append((f"UnassignedCodeword_{i:04d}", xf.UNASSIGNED_CODEWORD))
    return pd.DataFrame(rows, columns=["name", "feature_type"])


def control_counts(
    n_cells: int, n_controls: int, library: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Sparse background counts of control features (about 1 per 300 real counts in all)."""
    rate = (library / 300.0)[:, None] / max(n_controls, 1) * rng.lognormal(0, 0.4, n_controls)
    return rng.poisson(rate).astype(np.int32)


def make_features(genes: Sequence[str], controls: pd.DataFrame) -> pd.DataFrame:
    """Features table (``id, name, feature_type``) for the genes followed by the controls."""
    from napari_sigmma.io import xenium_format as xf

    names = [*genes, *controls["name"].tolist()]
    ftypes = [xf.GENE_EXPRESSION] * len(genes) + controls["feature_type"].tolist()
    ids = [
        f"ENSG{9_000_000 + i:011d}" if t == xf.GENE_EXPRESSION else n
        for i, (n, t) in enumerate(zip(names, ftypes, strict=True))
    ]
    return pd.DataFrame({"id": ids, "name": names, "feature_type": ftypes})
