"""Write a format-valid Xenium Onboard Analysis 2.x output bundle.

The bundle is what ``spatialdata_io.xenium(out)`` (0.7.x) reads with its default flags, plus a
post-Xenium H&E image and its Xenium Explorer alignment matrix. It is used for the embedded
and synthetic samples and for tests, so everything a real bundle carries that the readers use
is written for real: label masks rasterised from the polygons, a pyramidal DAPI-like
morphology image, transcripts placed inside their cells, a 10x v3 HDF5 matrix.

Writing is memory-bounded: masks and images are produced tile by tile, transcripts a batch of
cells at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.errors import SigmmaError
from napari_sigmma.io import xenium_format as xf
from napari_sigmma.samples.tiffwrite import write_pyramidal_ome_tiff

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["write_xenium_bundle"]

_MASK_CHUNK = 2048
_TX_BATCH_CELLS = 2048
_UNASSIGNED_FRACTION = 0.02
_FOV_UM = 800.0  # edge of the (notional) fields of view used for fov_name


# ---------------------------------------------------------------------------------------
# polygons
# ---------------------------------------------------------------------------------------
class _Polygons:
    """Ragged closed rings: ``verts (V, 2)`` and ``offsets (P + 1)``; ``owner[p]`` = cell row."""

    def __init__(self, verts: np.ndarray, offsets: np.ndarray, owner: np.ndarray) -> None:
        self.verts = verts
        self.offsets = offsets
        self.owner = owner
        n = len(offsets) - 1
        self.n = n
        if n:
            starts = offsets[:-1]
            counts = np.diff(offsets)
            self.lo = np.minimum.reduceat(verts, starts, axis=0)
            self.hi = np.maximum.reduceat(verts, starts, axis=0)
            # vertex mean without the closing vertex = a point inside star-shaped rings
            sums = np.add.reduceat(verts, starts, axis=0) - verts[offsets[1:] - 1]
            self.center = sums / (counts - 1)[:, None]
        else:
            self.lo = self.hi = self.center = np.zeros((0, 2))

    @classmethod
    def from_list(
        cls, polygons: Sequence[np.ndarray | None], what: str, *, allow_missing: bool
    ) -> _Polygons:
        rings: list[np.ndarray] = []
        owner: list[int] = []
        for i, poly in enumerate(polygons):
            if poly is None or len(poly) == 0:
                if allow_missing:
                    continue
                raise SigmmaError(f"{what} polygon {i} is empty")
            ring = np.asarray(poly, dtype=np.float64)
            if ring.ndim != 2 or ring.shape[1] != 2:
                raise SigmmaError(f"{what} polygon {i} must be (k, 2), got {ring.shape}")
            if not np.isfinite(ring).all():
                raise SigmmaError(f"{what} polygon {i} has non-finite vertices")
            if not np.array_equal(ring[0], ring[-1]):
                ring = np.vstack([ring, ring[:1]])
            if len(ring) < 4:
                raise SigmmaError(f"{what} polygon {i} needs at least 3 distinct vertices")
            rings.append(ring)
            owner.append(i)
        if rings:
            verts = np.concatenate(rings)
            offsets = np.concatenate([[0], np.cumsum([len(r) for r in rings])])
        else:
            verts, offsets = np.zeros((0, 2)), np.zeros(1, np.int64)
        return cls(verts, offsets.astype(np.int64), np.asarray(owner, dtype=np.int64))

    def ring(self, p: int) -> np.ndarray:
        return self.verts[self.offsets[p] : self.offsets[p + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def areas(self) -> np.ndarray:
        """Shoelace areas (same unit² as the vertices)."""
        x, y = self.verts[:, 0], self.verts[:, 1]
        cross = x[:-1] * y[1:] - x[1:] * y[:-1]
        cross = np.concatenate([cross, [0.0]])
        # drop the cross terms that span two rings (last vertex of ring -> first of the next)
        cross[self.offsets[1:] - 1] = 0.0
        return 0.5 * np.abs(np.add.reduceat(cross, self.offsets[:-1])) if self.n else np.zeros(0)


class _Rasterizer:
    """Renders polygon labels (``label = polygon index + 1``) for any pixel window.

    Polygons are bucketed on a coarse grid so that a window only looks at the polygons near
    it: rendering a whole-slide frame tile by tile stays linear in its size.
    """

    _BUCKET = 256  # px

    def __init__(self, polys: _Polygons, pixel_size: float) -> None:
        self.polys = polys
        # morphology pixel j covers [j, j + 1): test pixel centres by shifting the rings
        self.px = polys.verts / pixel_size - 0.5
        self.lo = polys.lo / pixel_size - 0.5
        self.hi = polys.hi / pixel_size - 0.5
        b = self._BUCKET
        if polys.n:
            b0 = np.floor(self.lo / b).astype(np.int64)
            b1 = np.floor(self.hi / b).astype(np.int64)
            self._origin = b0.min(axis=0)
            b0 -= self._origin
            b1 -= self._origin
            self._nbx = int(b1[:, 0].max()) + 1
            span = b1 - b0 + 1
            reps = span[:, 0] * span[:, 1]
            ids = np.repeat(np.arange(polys.n), reps)
            k = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
            sx = np.repeat(span[:, 0], reps)
            bx = np.repeat(b0[:, 0], reps) + k % sx
            by = np.repeat(b0[:, 1], reps) + k // sx
            keys = by * self._nbx + bx
            order = np.argsort(keys, kind="stable")
            self._keys, self._ids = keys[order], ids[order]

    def _candidates(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        b = self._BUCKET
        bx0 = max(int(np.floor((x0 - 1) / b)) - int(self._origin[0]), 0)
        bx1 = min(int(np.floor((x0 + w) / b)) - int(self._origin[0]), self._nbx - 1)
        by0 = max(int(np.floor((y0 - 1) / b)) - int(self._origin[1]), 0)
        by1 = int(np.floor((y0 + h) / b)) - int(self._origin[1])
        if bx1 < bx0 or by1 < by0:
            return np.zeros(0, np.int64)
        parts = []
        for by in range(by0, by1 + 1):
            lo = np.searchsorted(self._keys, by * self._nbx + bx0, side="left")
            hi = np.searchsorted(self._keys, by * self._nbx + bx1, side="right")
            parts.append(self._ids[lo:hi])
        cand = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        keep = (
            (self.hi[cand, 0] >= x0 - 1)
            & (self.lo[cand, 0] <= x0 + w)
            & (self.hi[cand, 1] >= y0 - 1)
            & (self.lo[cand, 1] <= y0 + h)
        )
        return cand[keep]

    def render(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        # PIL's C polygon fill is ~20x faster than skimage.draw.polygon; "I" = int32 labels
        from PIL import Image, ImageDraw

        if not self.polys.n:
            return np.zeros((h, w), dtype=np.uint32)
        hit = self._candidates(y0, x0, h, w)  # sorted: later polygons are drawn on top
        if not hit.size:
            return np.zeros((h, w), dtype=np.uint32)
        canvas = Image.new("I", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        off = self.polys.offsets
        shift = np.array([x0, y0], dtype=np.float64)
        for p in hit:
            ring = self.px[off[p] : off[p + 1]] - shift
            draw.polygon(ring.ravel().tolist(), fill=int(p) + 1)
        return np.asarray(canvas, dtype=np.int32).view(np.uint32).reshape(h, w)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def _check_affine(he_to_morph: Any) -> np.ndarray:
    a = np.asarray(he_to_morph, dtype=np.float64)
    if a.shape != (3, 3) or not np.isfinite(a).all():
        raise SigmmaError(f"he_to_morph must be a finite 3x3 affine, got shape {a.shape}")
    if not np.allclose(a[2], [0, 0, 1]):
        raise SigmmaError("he_to_morph must be affine (last row 0, 0, 1)")
    if abs(np.linalg.det(a[:2, :2])) < 1e-12:
        raise SigmmaError("he_to_morph is singular")
    return a


def _check_inputs(
    cells: pd.DataFrame,
    counts: Any,
    features: pd.DataFrame,
    cell_polygons: Sequence[np.ndarray],
    nucleus_polygons: Sequence[np.ndarray | None],
) -> tuple[pd.DataFrame, Any, pd.DataFrame]:
    import pandas as pd
    import scipy.sparse as sp

    if not isinstance(cells, pd.DataFrame):
        raise SigmmaError("cells must be a pandas DataFrame")
    missing = [c for c in xf.CELLS_INPUT_COLUMNS if c not in cells.columns and c != xf.CELL_ID]
    if missing:
        raise SigmmaError(f"cells is missing column(s) {missing}")
    cells = cells.reset_index(drop=True).copy()
    n = len(cells)
    if n == 0:
        raise SigmmaError("cells is empty")
    if xf.CELL_ID not in cells.columns:
        cells.insert(0, xf.CELL_ID, xf.xenium_cell_ids(n))
    cells[xf.CELL_ID] = cells[xf.CELL_ID].astype(str)
    if cells[xf.CELL_ID].duplicated().any():
        raise SigmmaError("cells.cell_id has duplicates")
    for col in (xf.CELL_X, xf.CELL_Y, xf.CELL_AREA, xf.NUCLEUS_AREA):
        vals = pd.to_numeric(cells[col], errors="coerce").to_numpy(np.float64)
        if col in (xf.CELL_X, xf.CELL_Y) and not np.isfinite(vals).all():
            raise SigmmaError(f"cells.{col} has missing or non-finite values")
        cells[col] = vals

    if not sp.issparse(counts):
        counts = sp.csr_matrix(np.asarray(counts))
    counts = sp.csr_matrix(counts)
    if counts.shape[0] != n:
        raise SigmmaError(f"counts has {counts.shape[0]} rows but cells has {n}")
    data = counts.data
    if data.size and (not np.isfinite(data).all() or (data < 0).any()):
        raise SigmmaError("counts has negative or non-finite values")
    if data.size and not np.array_equal(data, np.round(data)):
        raise SigmmaError("counts must be integers")
    counts = counts.astype(np.int32)
    counts.eliminate_zeros()
    counts.sort_indices()

    if not isinstance(features, pd.DataFrame) or not {"id", "name", "feature_type"} <= set(
        features.columns
    ):
        raise SigmmaError("features must be a DataFrame with columns id, name, feature_type")
    features = features.reset_index(drop=True).copy()
    if len(features) != counts.shape[1]:
        raise SigmmaError(f"counts has {counts.shape[1]} columns but features has {len(features)}")
    bad_types = sorted(set(features["feature_type"]) - set(xf.FEATURE_TYPES))
    if bad_types:
        raise SigmmaError(f"unknown feature_type(s) {bad_types}; expected {list(xf.FEATURE_TYPES)}")
    if features["name"].astype(str).duplicated().any():
        raise SigmmaError("features.name has duplicates")
    if len(cell_polygons) != n:
        raise SigmmaError(f"cell_polygons has {len(cell_polygons)} entries but cells has {n}")
    if len(nucleus_polygons) != n:
        raise SigmmaError(f"nucleus_polygons has {len(nucleus_polygons)} entries but cells has {n}")
    return cells, counts, features


# ---------------------------------------------------------------------------------------
# pieces of the bundle
# ---------------------------------------------------------------------------------------
def _write_experiment(
    out: Path,
    *,
    pixel_size: float,
    n_cells: int,
    n_tx: int,
    n_genes: int,
    name_prefix: str,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    spec = {
        "major_version": 5,
        "minor_version": 0,
        "patch_version": 0,
        "run_name": "napari-sigmma",
        "run_start_time": "2024-01-01T00:00:00Z",
        "region_name": name_prefix.rstrip("_") or "region",
        "preservation_method": "ffpe",
        "num_cells": int(n_cells),
        "transcripts_per_cell": round(n_tx / max(n_cells, 1)),
        "cassette_name": "synthetic",
        "slide_id": "0000000",
        "panel_design_id": "synthetic",
        "panel_name": "synthetic panel",
        "panel_organism": "Human",
        "panel_num_targets_predesigned": int(n_genes),
        "panel_num_targets_custom": 0,
        "pixel_size": float(pixel_size),
        "instrument_sn": "synthetic",
        "instrument_sw_version": "2.0.0.0",
        xf.SW_VERSION_KEY: xf.ANALYSIS_SW_VERSION,
        "experiment_uuid": str(uuid.UUID(int=int(rng.integers(0, 2**63)))),
        "z_step_size": 3.0,
        "images": {
            "morphology_filepath": "morphology.ome.tif",
            "morphology_focus_filepath": (
                f"{xf.MORPHOLOGY_FOCUS_DIR}/{xf.MORPHOLOGY_FOCUS_FILE.format(0)}"
            ),
        },
        "xenium_explorer_files": {
            "transcripts_zarr_filepath": "transcripts.zarr.zip",
            "cells_zarr_filepath": xf.CELLS_ZARR,
            "cell_features_zarr_filepath": "cell_feature_matrix.zarr.zip",
            "analysis_zarr_filepath": "analysis.zarr.zip",
            "analysis_summary_filepath": "analysis_summary.html",
        },
    }
    (out / xf.EXPERIMENT_FILE).write_text(json.dumps(spec, indent=2))


def _write_cells_zarr(
    out: Path,
    *,
    cell_ids: np.ndarray,
    cells: pd.DataFrame,
    cell_polys: _Polygons,
    nuc_polys: _Polygons,
    shape: tuple[int, int],
    pixel_size: float,
) -> None:
    import numcodecs
    import zarr
    from zarr.storage import ZipStore

    n = len(cell_ids)
    prefix, suffix = xf.pairs_from_cell_ids(cell_ids)
    nuc_count = np.bincount(nuc_polys.owner, minlength=n).astype(np.float64)
    nuc_cx = np.full(n, np.nan)
    nuc_cy = np.full(n, np.nan)
    # first nucleus of each cell gives its nucleus centroid
    first = np.unique(nuc_polys.owner, return_index=True)
    nuc_cx[first[0]] = nuc_polys.center[first[1], 0]
    nuc_cy[first[0]] = nuc_polys.center[first[1], 1]
    summary = np.column_stack(
        [
            cells[xf.CELL_X].to_numpy(np.float64),
            cells[xf.CELL_Y].to_numpy(np.float64),
            cells[xf.CELL_AREA].to_numpy(np.float64),
            nuc_cx,
            nuc_cy,
            cells[xf.NUCLEUS_AREA].to_numpy(np.float64),
            np.zeros(n),
            nuc_count,
        ]
    )

    path = out / xf.CELLS_ZARR
    path.unlink(missing_ok=True)
    comp = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    store = ZipStore(path, mode="w")
    try:
        # zarr v2 inside a zip: attributes go in at creation (a later update would append a
        # second copy of the .zattrs entry to the zip)
        root = zarr.open_group(
            store,
            mode="w",
            zarr_format=2,
            attributes={
                "major_version": 6,
                "minor_version": 0,
                "number_cells": int(n),
                "polygon_set_names": ["nucleus", "cell"],
                "polygon_set_display_names": ["Nucleus boundaries", "Cell boundaries"],
                "polygon_set_descriptions": [
                    "DAPI-based nuclei segmentation",
                    "Expansion of nuclei boundaries by 5 µm",
                ],
                "spatial_units": "microns",
            },
        )
        rows = max(1, min(n, 1 << 16))
        root.create_array(
            xf.ZARR_CELL_ID,
            data=np.column_stack([prefix, suffix]).astype(np.uint32),
            chunks=(rows, 2),
            compressors=comp,
        )
        root.create_array(
            xf.ZARR_CELL_SUMMARY,
            data=summary,
            chunks=(rows, summary.shape[1]),
            compressors=comp,
            attributes={"column_names": list(xf.CELL_SUMMARY_COLUMNS)},
        )
        masks = root.create_group(
            xf.ZARR_MASKS, attributes={"mask_names": ["nucleus", "cell"], "spatial_units": "pixels"}
        )
        h, w = shape
        chunk = (min(_MASK_CHUNK, h), min(_MASK_CHUNK, w))
        for index, polys in ((xf.NUCLEUS_MASK_INDEX, nuc_polys), (xf.CELL_MASK_INDEX, cell_polys)):
            arr = masks.create_array(
                str(index),
                shape=(h, w),
                dtype=np.uint32,
                chunks=chunk,
                fill_value=0,
                compressors=comp,
            )
            raster = _Rasterizer(polys, pixel_size)
            # chunk-aligned writes: each chunk is written to the zip exactly once
            for y in range(0, h, chunk[0]):
                for x in range(0, w, chunk[1]):
                    hh, ww = min(chunk[0], h - y), min(chunk[1], w - x)
                    block = raster.render(y, x, hh, ww)
                    if block.any():
                        arr[y : y + hh, x : x + ww] = block
        psets = root.create_group(xf.ZARR_POLYGON_SETS)
        for index, polys in ((xf.NUCLEUS_MASK_INDEX, nuc_polys), (xf.CELL_MASK_INDEX, cell_polys)):
            g = psets.create_group(str(index))
            m = max(1, min(polys.n, 1 << 16))
            g.create_array(
                "cell_index", data=polys.owner.astype(np.uint32), chunks=(m,), compressors=comp
            )
            g.create_array(
                "num_vertices",
                data=(polys.counts() if polys.n else np.zeros(0, np.int64)).astype(np.int32),
                chunks=(m,),
                compressors=comp,
            )
    finally:
        store.close()


def _write_h5(out: Path, cell_ids: np.ndarray, counts: Any, features: pd.DataFrame) -> None:
    import h5py

    def s(values: Any) -> np.ndarray:
        return np.array([str(v).encode("utf-8") for v in values], dtype=object).astype("S")

    path = out / xf.CELL_FEATURE_MATRIX
    n_cells, n_feat = counts.shape
    gz: dict[str, Any] = {"compression": "gzip", "compression_opts": 4}
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["software_version"] = xf.ANALYSIS_SW_VERSION
        g = f.create_group(xf.H5_MATRIX)
        g.create_dataset("barcodes", data=s(cell_ids), **gz)
        # 10x stores features x barcodes as CSC: the same three arrays as our cells x features CSR
        opts = gz if counts.nnz else {}
        g.create_dataset("data", data=counts.data.astype(np.int32), **opts)
        g.create_dataset("indices", data=counts.indices.astype(np.int64), **opts)
        g.create_dataset("indptr", data=counts.indptr.astype(np.int64), **gz)
        g.create_dataset("shape", data=np.array([n_feat, n_cells], dtype=np.int32))
        fg = g.create_group(xf.H5_FEATURES)
        fg.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        fg.create_dataset("feature_type", data=s(features["feature_type"]), **gz)
        fg.create_dataset("genome", data=s(["Unknown"] * n_feat), **gz)
        fg.create_dataset("id", data=s(features["id"]), **gz)
        fg.create_dataset("name", data=s(features["name"]), **gz)


def _write_cells_parquet(
    out: Path, cells: pd.DataFrame, counts: Any, features: pd.DataFrame, nuc_count: np.ndarray
) -> None:
    import pandas as pd

    n = len(cells)
    ftype = features["feature_type"].to_numpy()
    df = pd.DataFrame(
        {
            xf.CELL_ID: cells[xf.CELL_ID].astype(str).to_numpy(),
            xf.CELL_X: cells[xf.CELL_X].to_numpy(np.float64),
            xf.CELL_Y: cells[xf.CELL_Y].to_numpy(np.float64),
        }
    )

    def col_sum(mask: np.ndarray) -> np.ndarray:
        if not mask.any():
            return np.zeros(n, np.int64)
        return np.asarray(counts[:, np.flatnonzero(mask)].sum(axis=1)).ravel().astype(np.int64)

    df["transcript_counts"] = col_sum(ftype == xf.GENE_EXPRESSION)
    for ft in (
        xf.NEG_CONTROL_PROBE,
        xf.NEG_CONTROL_CODEWORD,
        xf.UNASSIGNED_CODEWORD,
        xf.DEPRECATED_CODEWORD,
    ):
        df[xf.CONTROL_COUNT_COLUMNS[ft]] = col_sum(ftype == ft)
    if (ftype == xf.GENOMIC_CONTROL).any():
        df[xf.CONTROL_COUNT_COLUMNS[xf.GENOMIC_CONTROL]] = col_sum(ftype == xf.GENOMIC_CONTROL)
    df["total_counts"] = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
    df[xf.CELL_AREA] = cells[xf.CELL_AREA].to_numpy(np.float64)
    df[xf.NUCLEUS_AREA] = cells[xf.NUCLEUS_AREA].to_numpy(np.float64)
    df[xf.NUCLEUS_COUNT] = nuc_count.astype(np.int64)
    df[xf.SEGMENTATION_METHOD] = "Segmented by nucleus expansion of 5.0µm"
    # extra columns (e.g. ground-truth cell_type of a synthetic sample) travel along
    for col in cells.columns:
        if col not in df.columns:
            df[col] = cells[col].to_numpy()
    df.to_parquet(out / xf.CELLS_PARQUET, index=False)


def _write_boundaries(out: Path, file: str, polys: _Polygons, cell_ids: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = polys.counts()
    owner_rows = np.repeat(polys.owner, counts)
    label_rows = np.repeat(np.arange(1, polys.n + 1, dtype=np.uint32), counts)
    table = pa.table(
        {
            xf.CELL_ID: pa.array(
                cell_ids[owner_rows] if polys.n else np.zeros(0, str), pa.string()
            ),
            xf.VERTEX_X: pa.array(polys.verts[:, 0].astype(np.float32)),
            xf.VERTEX_Y: pa.array(polys.verts[:, 1].astype(np.float32)),
            xf.LABEL_ID: pa.array(label_rows),
        }
    )
    pq.write_table(table, out / file, compression="zstd")


def _points_in_rings(pts: np.ndarray, ring_of_pt: np.ndarray, polys: _Polygons) -> np.ndarray:
    """Even-odd test of each point against one ring (``ring_of_pt`` = -1: outside)."""
    inside = np.zeros(len(pts), dtype=bool)
    has = ring_of_pt >= 0
    if not has.any():
        return inside
    idx = np.flatnonzero(has)
    r = ring_of_pt[idx]
    start = polys.offsets[r]
    nedges = polys.offsets[r + 1] - start - 1
    x, y = pts[idx, 0], pts[idx, 1]
    acc = np.zeros(len(idx), dtype=bool)
    for k in range(int(nedges.max())):
        valid = k < nedges
        a = polys.verts[np.where(valid, start + k, start)]
        b = polys.verts[np.where(valid, start + k + 1, start)]
        cond = (a[:, 1] > y) != (b[:, 1] > y)
        dy = np.where(b[:, 1] == a[:, 1], 1e-300, b[:, 1] - a[:, 1])
        xc = a[:, 0] + (y - a[:, 1]) * (b[:, 0] - a[:, 0]) / dy
        acc ^= valid & cond & (x < xc)
    inside[idx] = acc
    return inside


def _sample_in_rings(
    rng: np.random.Generator, ring_of_pt: np.ndarray, polys: _Polygons
) -> np.ndarray:
    """Uniform points in star-shaped rings: pick a fan triangle (centre, v_k, v_k+1) by area."""
    if len(ring_of_pt) == 0:
        return np.zeros((0, 2))
    rings, inverse = np.unique(ring_of_pt, return_inverse=True)
    # triangles of the chosen rings only
    starts = polys.offsets[rings]
    nedge = polys.offsets[rings + 1] - starts - 1
    tri_ring = np.repeat(np.arange(len(rings)), nedge)
    local = np.arange(nedge.sum()) - np.repeat(np.cumsum(nedge) - nedge, nedge)
    a_idx = np.repeat(starts, nedge) + local
    c = polys.center[rings][tri_ring]
    va = polys.verts[a_idx] - c
    vb = polys.verts[a_idx + 1] - c
    area = 0.5 * np.abs(va[:, 0] * vb[:, 1] - va[:, 1] * vb[:, 0])
    tri_start = np.cumsum(nedge) - nedge
    ring_area = np.add.reduceat(area, tri_start) if len(area) else np.zeros(len(rings))
    ring_area = np.where(ring_area > 0, ring_area, 1.0)
    cum = np.cumsum(area)
    before = np.concatenate([[0.0], cum])[tri_start]
    # key: ring index + cumulative fraction inside the ring, increasing over all triangles
    key = tri_ring + (cum - before[tri_ring]) / ring_area[tri_ring]
    u = rng.random(len(ring_of_pt)) * (1 - 1e-9)
    tri = np.searchsorted(key, inverse + u, side="right")
    # rounding (or a zero-area ring) must not spill into the next ring's triangles
    tri = np.clip(tri, tri_start[inverse], tri_start[inverse] + nedge[inverse] - 1)
    r1 = rng.random(len(tri))
    r2 = rng.random(len(tri))
    flip = r1 + r2 > 1
    r1[flip], r2[flip] = 1 - r1[flip], 1 - r2[flip]
    # shrink a little towards the centre so points never sit on the boundary
    shrink = 0.97
    pts = c[tri] + shrink * (r1[:, None] * va[tri] + r2[:, None] * vb[tri])
    return pts


def _fov_names(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    row = np.clip((y // _FOV_UM).astype(np.int64), 0, 25)
    col = np.clip((x // _FOV_UM).astype(np.int64), 0, 98) + 1
    letters = np.array([chr(ord("A") + i) for i in range(26)])
    return np.char.add(letters[row], col.astype("U"))


def _tx_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            (xf.TX_ID, pa.uint64()),
            (xf.CELL_ID, pa.string()),
            (xf.TX_OVERLAPS_NUCLEUS, pa.uint8()),
            (xf.TX_FEATURE, pa.string()),
            (xf.TX_X, pa.float32()),
            (xf.TX_Y, pa.float32()),
            (xf.TX_Z, pa.float32()),
            (xf.TX_QV, pa.float32()),
            (xf.TX_FOV, pa.string()),
            (xf.TX_NUCLEUS_DISTANCE, pa.float32()),
            (xf.TX_CODEWORD_INDEX, pa.int32()),
        ]
    )


def _write_generated_transcripts(
    out: Path,
    *,
    counts: Any,
    feature_names: np.ndarray,
    cell_ids: np.ndarray,
    cell_polys: _Polygons,
    nuc_polys: _Polygons,
    extent_um: tuple[float, float],
    seed: int,
) -> int:
    """Transcripts from the count matrix, one batch of cells per parquet row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed + 7)
    n = counts.shape[0]
    # ring index of each cell (cell polygons: one per cell) and of its first nucleus
    cell_ring = np.full(n, -1, np.int64)
    cell_ring[cell_polys.owner] = np.arange(cell_polys.n)
    nuc_ring = np.full(n, -1, np.int64)
    owners, first = np.unique(nuc_polys.owner, return_index=True)
    nuc_ring[owners] = first
    nuc_radius = np.sqrt(nuc_polys.areas() / np.pi) if nuc_polys.n else np.zeros(0)
    schema = _tx_schema()
    next_id = np.uint64(281474976710656)  # real ids are large integers
    total = 0
    writer = pq.ParquetWriter(out / xf.TRANSCRIPTS, schema, compression="zstd")
    try:
        for b0 in range(0, n, _TX_BATCH_CELLS):
            b1 = min(n, b0 + _TX_BATCH_CELLS)
            sub = counts[b0:b1]
            rows = np.repeat(np.arange(b0, b1), np.diff(sub.indptr))
            per_entry = sub.data.astype(np.int64)
            cell_of = np.repeat(rows, per_entry)
            feat_of = np.repeat(sub.indices.astype(np.int64), per_entry)
            pts = _sample_in_rings(rng, cell_ring[cell_of], cell_polys)
            nuc_of = nuc_ring[cell_of]
            in_nuc = _points_in_rings(pts, nuc_of, nuc_polys)
            dist = np.zeros(len(pts), np.float32)
            has_nuc = nuc_of >= 0
            if has_nuc.any():
                d = np.linalg.norm(pts[has_nuc] - nuc_polys.center[nuc_of[has_nuc]], axis=1)
                dist[has_nuc] = np.maximum(0.0, d - nuc_radius[nuc_of[has_nuc]])
            dist[in_nuc] = 0.0
            cid = cell_ids[cell_of] if len(cell_of) else np.zeros(0, str)
            # a few background transcripts outside any cell, as real runs have
            n_un = int(rng.binomial(len(pts), _UNASSIGNED_FRACTION)) if len(pts) else 0
            if n_un:
                lo = cell_polys.lo[cell_ring[b0:b1][cell_ring[b0:b1] >= 0]].min(axis=0)
                hi = cell_polys.hi[cell_ring[b0:b1][cell_ring[b0:b1] >= 0]].max(axis=0)
                hi = np.minimum(hi, extent_um)
                upts = lo + rng.random((n_un, 2)) * np.maximum(hi - lo, 1e-3)
                pts = np.vstack([pts, upts])
                feat_of = np.concatenate([feat_of, rng.integers(0, len(feature_names), n_un)])
                cid = np.concatenate([cid, np.full(n_un, xf.UNASSIGNED)])
                in_nuc = np.concatenate([in_nuc, np.zeros(n_un, bool)])
                dist = np.concatenate([dist, np.full(n_un, np.nan, np.float32)])
            m = len(pts)
            if m == 0:
                continue
            qv = np.clip(20.0 + 20.0 * rng.beta(4.0, 1.5, m), 20.0, 40.0)
            ids = next_id + np.arange(m, dtype=np.uint64)
            next_id = ids[-1] + np.uint64(1)
            table = pa.table(
                {
                    xf.TX_ID: ids,
                    xf.CELL_ID: pa.array(cid, pa.string()),
                    xf.TX_OVERLAPS_NUCLEUS: in_nuc.astype(np.uint8),
                    xf.TX_FEATURE: pa.array(feature_names[feat_of], pa.string()),
                    xf.TX_X: pts[:, 0].astype(np.float32),
                    xf.TX_Y: pts[:, 1].astype(np.float32),
                    xf.TX_Z: rng.uniform(8.0, 22.0, m).astype(np.float32),
                    xf.TX_QV: qv.astype(np.float32),
                    xf.TX_FOV: pa.array(_fov_names(pts[:, 0], pts[:, 1]), pa.string()),
                    xf.TX_NUCLEUS_DISTANCE: dist.astype(np.float32),
                    xf.TX_CODEWORD_INDEX: feat_of.astype(np.int32),
                },
                schema=schema,
            )
            writer.write_table(table)
            total += m
        if total == 0:
            writer.write_table(schema.empty_table())
    finally:
        writer.close()
    return total


def _write_given_transcripts(out: Path, transcripts: pd.DataFrame) -> int:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(transcripts, pd.DataFrame):
        raise SigmmaError("transcripts must be a pandas DataFrame")
    need = [xf.TX_X, xf.TX_Y, xf.TX_FEATURE]
    missing = [c for c in need if c not in transcripts.columns]
    if missing:
        raise SigmmaError(f"transcripts is missing column(s) {missing}")
    m = len(transcripts)
    df = pd.DataFrame(
        {
            xf.TX_ID: transcripts.get(xf.TX_ID, pd.Series(np.arange(m))).to_numpy(np.uint64),
            xf.CELL_ID: transcripts.get(xf.CELL_ID, pd.Series([xf.UNASSIGNED] * m))
            .astype(str)
            .to_numpy(),
            xf.TX_OVERLAPS_NUCLEUS: transcripts.get(xf.TX_OVERLAPS_NUCLEUS, pd.Series(np.zeros(m)))
            .to_numpy()
            .astype(np.uint8),
            xf.TX_FEATURE: transcripts[xf.TX_FEATURE].astype(str).to_numpy(),
            xf.TX_X: transcripts[xf.TX_X].to_numpy(np.float32),
            xf.TX_Y: transcripts[xf.TX_Y].to_numpy(np.float32),
            xf.TX_Z: transcripts.get(xf.TX_Z, pd.Series(np.zeros(m))).to_numpy(np.float32),
            xf.TX_QV: transcripts.get(xf.TX_QV, pd.Series(np.full(m, 30.0))).to_numpy(np.float32),
        }
    )
    if not (np.isfinite(df[xf.TX_X]).all() and np.isfinite(df[xf.TX_Y]).all()):
        raise SigmmaError("transcripts have non-finite positions")
    pq.write_table(
        pa.Table.from_pandas(df, preserve_index=False), out / xf.TRANSCRIPTS, compression="zstd"
    )
    return m


def _write_morphology(
    out: Path,
    morphology: np.ndarray | str | os.PathLike[str] | None,
    *,
    nuc_polys: _Polygons,
    shape: tuple[int, int],
    pixel_size: float,
    seed: int,
) -> None:
    folder = out / xf.MORPHOLOGY_FOCUS_DIR
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.ome.tif"):
        old.unlink()
    target = folder / xf.MORPHOLOGY_FOCUS_FILE.format(0)
    if isinstance(morphology, str | os.PathLike):
        _place_file(Path(morphology), target)
        return
    if morphology is not None:
        arr = np.asarray(morphology)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise SigmmaError(f"morphology must be a (H, W) DAPI image, got {arr.shape}")
        if arr.dtype != np.uint16:
            arr = np.clip(arr, 0, 65535).astype(np.uint16)
        write_pyramidal_ome_tiff(
            target, arr, mpp=pixel_size, tile=512, compression="zlib", channel_names=["DAPI"]
        )
        return

    # DAPI-like: bright nuclei (one brightness each) on a dim background, blurred a little
    from scipy.ndimage import uniform_filter

    raster = _Rasterizer(nuc_polys, pixel_size)
    rng = np.random.default_rng(seed + 11)
    level = (1200 + rng.integers(0, 1800, max(nuc_polys.n, 1) + 1)).astype(np.float32)
    level[0] = 0.0
    margin = 4

    def tile(y: int, x: int, h: int, w: int) -> np.ndarray:
        lab = raster.render(y - margin, x - margin, h + 2 * margin, w + 2 * margin)
        if not lab.any():
            return np.full((h, w), 110, dtype=np.uint16)
        img = level[lab]
        img = uniform_filter(img, 3)
        # flat background (no pixel noise: it would only bloat the zlib-compressed file)
        img = img[margin : margin + h, margin : margin + w] + 110.0
        return np.clip(img, 0, 65535).astype(np.uint16)

    write_pyramidal_ome_tiff(
        target,
        tile,
        shape=shape,
        dtype=np.uint16,
        mpp=pixel_size,
        tile=512,
        compression="zlib",
        channel_names=["DAPI"],
    )


def _place_file(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst``: a hard link where possible (no copy of a big slide), else a copy."""
    if not src.is_file():
        raise SigmmaError("file not found", path=src)
    if dst.exists() and os.path.samefile(src, dst):
        return
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _tiff_shape(path: Path) -> tuple[int, int]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes, series.shape
    except Exception as exc:
        raise SigmmaError(f"not a readable TIFF ({exc})", path=path) from exc
    dims = dict(zip(axes, shape, strict=False))
    if "Y" not in dims or "X" not in dims:
        raise SigmmaError(f"TIFF has no Y/X axes (axes {axes!r})", path=path)
    return int(dims["Y"]), int(dims["X"])


# ---------------------------------------------------------------------------------------
# public
# ---------------------------------------------------------------------------------------
def write_xenium_bundle(
    out: str | os.PathLike[str],
    *,
    he_image: np.ndarray | str | os.PathLike[str],
    he_to_morph: np.ndarray,
    pixel_size: float = xf.DEFAULT_PIXEL_SIZE,
    cells: pd.DataFrame,
    counts: Any,
    features: pd.DataFrame,
    cell_polygons: Sequence[np.ndarray],
    nucleus_polygons: Sequence[np.ndarray | None],
    transcripts: pd.DataFrame | None = None,
    morphology: np.ndarray | str | os.PathLike[str] | None = None,
    name_prefix: str = "",
    seed: int = 0,
) -> Path:
    """Write a Xenium Onboard Analysis 2.x output folder with an aligned H&E image.

    Over 120 lines because of its parameter documentation; the body checks the inputs and
    calls one writer per bundle file.

    Parameters
    ----------
    out
        Output folder (created; files of a previous bundle there are overwritten).
    he_image
        ``(H, W, 3)`` uint8 H&E image, written as a pyramidal JPEG OME-TIFF; or the path of
        an already written pyramidal OME-TIFF, which is hard-linked (or copied) in.
    he_to_morph
        3x3 affine mapping H&E level-0 pixels ``(x, y, 1)`` to morphology pixels; written as
        ``<name_prefix>he_imagealignment.csv``. The H&E µm/px is
        ``pixel_size * sqrt(|det A[:2, :2]|)``.
    pixel_size
        µm per morphology pixel (``experiment.xenium`` ``pixel_size``).
    cells
        One row per cell: ``cell_id`` (Xenium ids; generated if absent), ``x_centroid``,
        ``y_centroid`` (µm), ``cell_area``, ``nucleus_area`` (µm²). Extra columns are kept in
        ``cells.parquet`` (and so reach the table's ``obs``).
    counts
        ``(n_cells, n_features)`` integer counts (scipy sparse or dense), rows in ``cells``
        order.
    features
        ``id``, ``name``, ``feature_type`` (``"Gene Expression"``, ``"Negative Control
        Probe"``, ``"Negative Control Codeword"``, ``"Unassigned Codeword"``, …), in
        ``counts`` column order.
    cell_polygons, nucleus_polygons
        One ``(k, 2)`` ring in µm per cell (closed or not; ``None`` = no nucleus).
    transcripts
        Optional DataFrame (``x_location``, ``y_location``, ``feature_name``, optional
        ``cell_id``, ``z_location``, ``qv``, ``overlaps_nucleus``, ``transcript_id``). By
        default transcripts are generated from ``counts``: each count becomes a transcript at
        a random point inside its cell, with ``overlaps_nucleus`` from its nucleus polygon,
        qv in 20-40, plus ~2 % unassigned background transcripts.
    morphology
        Optional ``(H, W)`` DAPI image (or an OME-TIFF path). By default a DAPI-like image is
        rendered from the nucleus polygons.
    name_prefix
        Prefix of the H&E file names (``<name_prefix>he_image.ome.tif``).
    seed
        Seed for everything random (transcript positions, image noise).

    Returns
    -------
    Path of the bundle folder.
    """
    out = Path(out)
    if not pixel_size or pixel_size <= 0 or not math.isfinite(pixel_size):
        raise SigmmaError(f"pixel_size must be positive, got {pixel_size}", path=out)
    affine = _check_affine(he_to_morph)
    try:
        cells, counts, features = _check_inputs(
            cells, counts, features, cell_polygons, nucleus_polygons
        )
        cell_polys = _Polygons.from_list(cell_polygons, "cell", allow_missing=False)
        nuc_polys = _Polygons.from_list(nucleus_polygons, "nucleus", allow_missing=True)
    except SigmmaError as exc:
        raise SigmmaError(exc.problem, path=out) from exc
    out.mkdir(parents=True, exist_ok=True)
    cell_ids = cells[xf.CELL_ID].to_numpy().astype(str)
    try:
        xf.pairs_from_cell_ids(cell_ids)
    except SigmmaError as exc:
        raise SigmmaError(exc.problem, path=out) from exc

    # H&E first: its extent decides the morphology frame's size together with the cells
    he_h, he_w = _write_he(out, he_image, affine, pixel_size, name_prefix)
    shape = _morphology_shape(morphology, affine, (he_h, he_w), cell_polys, pixel_size)

    nuc_count = np.bincount(nuc_polys.owner, minlength=len(cells))
    _write_cells_zarr(
        out,
        cell_ids=cell_ids,
        cells=cells,
        cell_polys=cell_polys,
        nuc_polys=nuc_polys,
        shape=shape,
        pixel_size=pixel_size,
    )
    _write_cells_parquet(out, cells, counts, features, nuc_count)
    _write_h5(out, cell_ids, counts, features)
    _write_boundaries(out, xf.CELL_BOUNDARIES, cell_polys, cell_ids)
    _write_boundaries(out, xf.NUCLEUS_BOUNDARIES, nuc_polys, cell_ids)
    if transcripts is None:
        n_tx = _write_generated_transcripts(
            out,
            counts=counts,
            feature_names=features["name"].astype(str).to_numpy(),
            cell_ids=cell_ids,
            cell_polys=cell_polys,
            nuc_polys=nuc_polys,
            extent_um=(shape[1] * pixel_size, shape[0] * pixel_size),
            seed=seed,
        )
    else:
        n_tx = _write_given_transcripts(out, transcripts)
    _write_morphology(
        out, morphology, nuc_polys=nuc_polys, shape=shape, pixel_size=pixel_size, seed=seed
    )
    n_genes = int((features["feature_type"] == xf.GENE_EXPRESSION).sum())
    _write_experiment(
        out,
        pixel_size=pixel_size,
        n_cells=len(cells),
        n_tx=n_tx,
        n_genes=n_genes,
        name_prefix=name_prefix,
        seed=seed,
    )
    return out


def _write_he(
    out: Path,
    he_image: np.ndarray | str | os.PathLike[str],
    affine: np.ndarray,
    pixel_size: float,
    name_prefix: str,
) -> tuple[int, int]:
    """Write (or link in) the H&E OME-TIFF and its alignment CSV; return its (H, W)."""
    he_name = f"{name_prefix}{xf.HE_IMAGE_SUFFIX}"
    he_path = out / he_name
    he_mpp = pixel_size * math.sqrt(abs(np.linalg.det(affine[:2, :2])))
    if isinstance(he_image, str | os.PathLike):
        src = Path(he_image)
        he_h, he_w = _tiff_shape(src)
        _place_file(src, he_path)
    else:
        img = np.asarray(he_image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise SigmmaError(
                f"he_image must be (H, W, 3) uint8, got {img.shape} {img.dtype}", path=out
            )
        he_h, he_w = img.shape[:2]
        write_pyramidal_ome_tiff(he_path, img, mpp=he_mpp, tile=512, compression="jpeg")
    np.savetxt(out / f"{name_prefix}{xf.HE_ALIGNMENT_SUFFIX}", affine, delimiter=",", fmt="%.17g")
    return int(he_h), int(he_w)


def _morphology_shape(
    morphology: np.ndarray | str | os.PathLike[str] | None,
    affine: np.ndarray,
    he_shape: tuple[int, int],
    cell_polys: _Polygons,
    pixel_size: float,
) -> tuple[int, int]:
    """(H, W) of the morphology frame: the given image's, else enough to hold the mapped
    H&E image and every cell."""
    he_h, he_w = he_shape
    corners = np.array([[0, 0, 1], [he_w, 0, 1], [0, he_h, 1], [he_w, he_h, 1]], float)
    he_max = (affine @ corners.T).T[:, :2].max(axis=0)
    cell_max = cell_polys.hi.max(axis=0) / pixel_size
    if isinstance(morphology, str | os.PathLike):
        mh, mw = _tiff_shape(Path(morphology))
    elif morphology is not None:
        arr = np.asarray(morphology)
        mh, mw = arr.shape[-2:]
    else:
        mw = max(1, math.ceil(max(he_max[0], cell_max[0])) + 1)
        mh = max(1, math.ceil(max(he_max[1], cell_max[1])) + 1)
    shape = (int(mh), int(mw))
    return shape
