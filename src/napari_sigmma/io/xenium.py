"""Read a 10x Genomics Xenium output bundle (plus its post-Xenium H&E) into SpatialData.

``read_xenium`` checks the folder first (so that a missing or broken file is reported by
name), reads it with ``spatialdata_io.xenium`` and then brings the result to the project's
canonical layout (docs/INTERFACES.md):

- ``images["he_image"]``: the H&E pyramid read lazily from the OME-TIFF's own levels, with
  its alignment affine (H&E level-0 px -> morphology px = ``"global"``) as transformation.
- ``tables["table"]``: raw counts (CSR float32) of real genes only; control probes and
  codewords (and BLANK) in ``obsm["controls"]``; ``obs["cell_id"]`` str; ``obsm["spatial"]``
  cell centroids in µm.
- ``shapes["cell_boundaries"]``, ``["nucleus_boundaries"]``, ``["cell_circles"]`` in µm with
  ``Scale(1 / pixel_size)`` to ``"global"``; ``points["transcripts"]``; the morphology
  image and label masks as spatialdata-io reads them.

Alignment. ``<name>he_imagealignment.csv`` (header-less 3x3, H&E px -> morphology px) is
used when present. Otherwise a Xenium Explorer keypoints CSV (``*keypoints*.csv`` with
``fixedX, fixedY, alignmentX, alignmentY``) is turned into an affine by least squares. In
Xenium Explorer the *fixed* image is the Xenium morphology (DAPI) image and the *alignment*
image is the one being registered, the H&E; HEST (``hest.utils.read_xenium_alignment``)
uses the same reading, mapping alignment -> fixed. We therefore fit
``A @ [alignmentX, alignmentY, 1] = [fixedX, fixedY]``, i.e. H&E px -> morphology px,
the same direction as ``he_imagealignment.csv``. The fixed coordinates are taken as
morphology pixels like HEST does; ``keypoints_fixed_units="um"`` reads them as µm instead.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from napari_sigmma.errors import SigmmaError
from napari_sigmma.io import xenium_format as xf

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = [
    "XeniumBundle",
    "affine_from_keypoints",
    "check_xenium_bundle",
    "he_mpp",
    "he_pixels_from_um",
    "read_alignment_csv",
    "read_xenium",
    "um_to_he_matrix",
]

HE_IMAGE = "he_image"
TABLE = "table"
ATTRS_KEY = "sigmma"
_CHECK_BLOCK = 1 << 22  # entries per block when scanning the count matrix


@dataclass
class XeniumBundle:
    """What :func:`check_xenium_bundle` found in a Xenium output folder."""

    path: Path
    pixel_size: float
    version: str
    n_cells: int
    he_image: Path | None = None
    alignment: np.ndarray | None = None  # 3x3, H&E px -> morphology px
    alignment_source: Literal["csv", "keypoints", "identity"] | None = None
    alignment_file: Path | None = None


# ---------------------------------------------------------------------------------------
# alignment files
# ---------------------------------------------------------------------------------------
def _check_affine(a: np.ndarray, path: Path) -> np.ndarray:
    if not np.isfinite(a).all():
        raise SigmmaError("alignment matrix has non-finite values", path=path)
    if not np.allclose(a[2], [0.0, 0.0, 1.0], atol=1e-6):
        raise SigmmaError(
            f"alignment matrix is not affine: last row is {a[2].tolist()}, expected [0, 0, 1]",
            path=path,
        )
    lin = a[:2, :2]
    det = float(np.linalg.det(lin))
    scale = float(np.abs(lin).max())
    if scale == 0 or abs(det) <= 1e-9 * scale * scale:
        raise SigmmaError("alignment matrix is singular (it collapses the image)", path=path)
    return a


def read_alignment_csv(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a Xenium Explorer ``*imagealignment.csv``: a header-less 3x3 affine.

    Returns
    -------
    (3, 3) float64 array mapping image px ``(x, y, 1)`` to morphology px.

    Raises
    ------
    SigmmaError
        Not 3x3, not numeric, not affine, or singular.
    """
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path, header=None)
    except FileNotFoundError as exc:
        raise SigmmaError("alignment file not found", path=path) from exc
    except Exception as exc:
        raise SigmmaError(f"cannot parse the alignment CSV ({exc})", path=path) from exc
    if df.shape != (3, 3):
        raise SigmmaError(
            f"alignment CSV must hold a 3x3 matrix, found {df.shape[0]}x{df.shape[1]}", path=path
        )
    try:
        a = df.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SigmmaError("alignment CSV has non-numeric entries", path=path) from exc
    return _check_affine(a, path)


def affine_from_keypoints(
    path: str | os.PathLike[str],
    *,
    fixed_units: Literal["px", "um"] = "px",
    pixel_size: float | None = None,
) -> np.ndarray:
    """Least-squares affine from a Xenium Explorer keypoints CSV.

    Parameters
    ----------
    path
        CSV with columns ``fixedX, fixedY`` (morphology image) and ``alignmentX,
        alignmentY`` (the registered image, e.g. H&E, in its pixels).
    fixed_units
        Unit of the fixed coordinates: morphology pixels (``"px"``, as HEST reads them) or
        µm (``"um"``, then ``pixel_size`` is required).
    pixel_size
        µm per morphology pixel, for ``fixed_units="um"``.

    Returns
    -------
    (3, 3) affine mapping alignment-image px to morphology px.

    Raises
    ------
    SigmmaError
        Missing columns, fewer than 3 points, non-numeric values, or collinear points.
    """
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path)
    except FileNotFoundError as exc:
        raise SigmmaError("keypoints file not found", path=path) from exc
    except Exception as exc:
        raise SigmmaError(f"cannot parse the keypoints CSV ({exc})", path=path) from exc
    df.columns = [str(c).strip() for c in df.columns]
    cols = [xf.KP_FIXED_X, xf.KP_FIXED_Y, xf.KP_ALIGN_X, xf.KP_ALIGN_Y]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SigmmaError(f"keypoints CSV lacks column(s) {missing}", path=path)
    try:
        pts = df[cols].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SigmmaError("keypoints CSV has non-numeric entries", path=path) from exc
    if not np.isfinite(pts).all():
        raise SigmmaError("keypoints CSV has missing or non-finite values", path=path)
    if len(pts) < 3:
        raise SigmmaError(f"need at least 3 keypoints for an affine, found {len(pts)}", path=path)
    fixed, moving = pts[:, :2], pts[:, 2:]
    if fixed_units == "um":
        if not pixel_size or pixel_size <= 0:
            raise SigmmaError("fixed_units='um' needs the morphology pixel_size", path=path)
        fixed = fixed / pixel_size
    elif fixed_units != "px":
        raise SigmmaError(f"fixed_units must be 'px' or 'um', got {fixed_units!r}", path=path)
    for name, p in (("alignment", moving), ("fixed", fixed)):
        centred = p - p.mean(axis=0)
        sv = np.linalg.svd(centred, compute_uv=False)
        if sv[0] == 0 or sv[1] <= 1e-9 * sv[0]:
            raise SigmmaError(f"the {name} keypoints are collinear: no unique affine", path=path)
    design = np.column_stack([moving, np.ones(len(moving))])
    sol, *_ = np.linalg.lstsq(design, fixed, rcond=None)  # (3, 2)
    a = np.eye(3)
    a[:2, :] = sol.T
    return _check_affine(a, path)


# ---------------------------------------------------------------------------------------
# folder check
# ---------------------------------------------------------------------------------------
def _check_experiment(path: Path) -> tuple[float, str]:
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SigmmaError(f"not valid JSON ({exc})", path=path) from exc
    if not isinstance(spec, dict):
        raise SigmmaError("expected a JSON object", path=path)
    ps = spec.get(xf.PIXEL_SIZE_KEY)
    if not isinstance(ps, int | float) or isinstance(ps, bool) or not ps > 0:
        raise SigmmaError(f"'{xf.PIXEL_SIZE_KEY}' must be a positive number, got {ps!r}", path=path)
    if not math.isfinite(ps) or not 1e-3 <= ps <= 100:
        # Xenium's is 0.2125 µm; a wild value would size the image to petabytes
        raise SigmmaError(
            f"'{xf.PIXEL_SIZE_KEY}' must be a morphology pixel size in µm between 0.001 and 100 "
            f"(Xenium: 0.2125), got {ps!r}",
            path=path,
        )
    ranger = spec.get(xf.XENIUM_RANGER_KEY)
    version = ranger.get("version") if isinstance(ranger, dict) else spec.get(xf.SW_VERSION_KEY)
    if not isinstance(version, str):
        raise SigmmaError(f"'{xf.SW_VERSION_KEY}' is missing", path=path)
    return float(ps), version


def _check_cells_zarr(path: Path) -> np.ndarray:
    import zarr
    from zarr.storage import ZipStore

    if not zipfile.is_zipfile(path):
        raise SigmmaError("not a zip file (expected zarr v2 in a zip)", path=path)
    try:
        store = ZipStore(path, read_only=True)
        try:
            group = zarr.open(store, mode="r")
            raw = np.asarray(group[xf.ZARR_CELL_ID][...])
            summary = group[xf.ZARR_CELL_SUMMARY]
            names = summary.attrs.get("column_names")
            n_summary = summary.shape[0]
        finally:
            store.close()
    except SigmmaError:
        raise
    except Exception as exc:
        raise SigmmaError(
            f"cannot read the cell zarr ({type(exc).__name__}: {exc})", path=path
        ) from exc
    if raw.ndim != 2 or raw.shape[1] != 2:
        raise SigmmaError(f"'cell_id' must be (N, 2) uint32, got {raw.shape}", path=path)
    if not names or n_summary != raw.shape[0]:
        raise SigmmaError("'cell_summary' lacks column_names or has the wrong length", path=path)
    return xf.cell_ids_from_pairs(raw[:, 0], raw[:, 1])


def _check_h5(path: Path) -> tuple[np.ndarray, int]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            m = f[xf.H5_MATRIX]
            barcodes = np.asarray(m["barcodes"][()]).astype(str)
            n_feat, n_cells = (int(v) for v in m["shape"][()])
            indptr = np.asarray(m["indptr"][()])
            data, indices = m["data"], m["indices"]
            feats = m[xf.H5_FEATURES]
            for key in ("id", "name", "feature_type"):
                if len(feats[key]) != n_feat:
                    raise SigmmaError(
                        f"features/{key} has {len(feats[key])} entries, the matrix "
                        f"{n_feat} features",
                        path=path,
                    )
            names, counts_ = np.unique(
                np.asarray(feats["name"][()]).astype(str), return_counts=True
            )
            if (counts_ > 1).any():
                dup = ", ".join(
                    f"{g} ({c}x)"
                    for g, c in zip(names[counts_ > 1][:5], counts_[counts_ > 1][:5], strict=True)
                )
                raise SigmmaError(
                    f"duplicate gene names in the panel: {dup}; each feature needs its own "
                    "name (genes are matched by name)",
                    path=path,
                )
            if len(barcodes) != n_cells or len(indptr) != n_cells + 1:
                raise SigmmaError("matrix shape, barcodes and indptr disagree", path=path)
            nnz = int(indptr[-1]) if len(indptr) else 0
            if len(data) != nnz or len(indices) != nnz or (np.diff(indptr) < 0).any():
                raise SigmmaError("matrix data/indices/indptr are inconsistent", path=path)
            for start in range(0, nnz, _CHECK_BLOCK):
                block = np.asarray(data[start : start + _CHECK_BLOCK])
                if block.dtype.kind == "f" and not np.isfinite(block).all():
                    raise SigmmaError("count matrix has NaN or infinite values", path=path)
                if (block < 0).any():
                    raise SigmmaError("count matrix has negative values", path=path)
                idx = np.asarray(indices[start : start + _CHECK_BLOCK])
                if idx.size and (idx.min() < 0 or idx.max() >= n_feat):
                    raise SigmmaError("feature indices out of range", path=path)
    except SigmmaError:
        raise
    except Exception as exc:
        raise SigmmaError(
            f"not a readable 10x HDF5 matrix ({type(exc).__name__}: {exc})", path=path
        ) from exc
    return barcodes, n_feat


def _check_parquet(path: Path, columns: list[str]) -> Any:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise SigmmaError(f"not a readable parquet file ({exc})", path=path) from exc
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise SigmmaError(f"missing column(s) {missing}", path=path)
    return schema


def _check_tiff(path: Path) -> tuple[str, tuple[int, ...], Any]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return series.axes, tuple(series.shape), series.dtype
    except Exception as exc:
        raise SigmmaError(f"not a readable TIFF ({exc})", path=path) from exc


def _find_he(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob(f"*{xf.HE_IMAGE_SUFFIX}") if not p.name.startswith("._"))
    if len(found) > 1:
        raise SigmmaError(
            f"more than one H&E image: {[p.name for p in found]}; keep one", path=folder
        )
    return found[0] if found else None


def check_xenium_bundle(
    path: str | os.PathLike[str],
    *,
    he: bool = True,
    keypoints_fixed_units: Literal["px", "um"] = "px",
) -> XeniumBundle:
    """Check a Xenium output folder before reading it; name the first bad file.

    Parameters
    ----------
    path
        The bundle folder (or its ``experiment.xenium``).
    he
        Also find the H&E image and its alignment.
    keypoints_fixed_units
        See :func:`affine_from_keypoints`.

    Returns
    -------
    XeniumBundle with pixel size, version, cell count and the H&E alignment.

    Raises
    ------
    SigmmaError
        Naming the missing or corrupt file and what is wrong with it.
    """
    folder = _bundle_folder(path)
    pixel_size, version = _check_experiment(folder / xf.EXPERIMENT_FILE)
    zarr_ids = _check_cells_zarr(folder / xf.CELLS_ZARR)
    barcodes, _ = _check_h5(folder / xf.CELL_FEATURE_MATRIX)
    cell_ids = _check_cell_ids(folder, barcodes, zarr_ids)
    for name in (xf.CELL_BOUNDARIES, xf.NUCLEUS_BOUNDARIES):
        _check_parquet(folder / name, [xf.CELL_ID, xf.VERTEX_X, xf.VERTEX_Y])
    _check_parquet(folder / xf.TRANSCRIPTS, [xf.CELL_ID, xf.TX_X, xf.TX_Y, xf.TX_Z, xf.TX_FEATURE])
    _check_morphology(folder)

    bundle = XeniumBundle(folder, pixel_size, version, len(cell_ids))
    if he:
        _attach_he(bundle, keypoints_fixed_units)
    return bundle


def _bundle_folder(path: str | os.PathLike[str]) -> Path:
    """The bundle folder of ``path``, checked to exist and to hold every required file."""
    folder = Path(path)
    if folder.is_file() and folder.name == xf.EXPERIMENT_FILE:
        folder = folder.parent
    if not folder.exists():
        raise SigmmaError("folder not found", path=folder)
    if not folder.is_dir():
        raise SigmmaError("expected a Xenium output folder", path=folder)
    for name in xf.REQUIRED_FILES:
        if not (folder / name).exists():
            kind = "folder" if name == xf.MORPHOLOGY_FOCUS_DIR else "file"
            raise SigmmaError(
                f"not a Xenium bundle: required {kind} {name} is missing", path=folder / name
            )

    return folder


def _check_cell_ids(folder: Path, barcodes: np.ndarray, zarr_ids: np.ndarray) -> np.ndarray:
    """The cell ids of ``cells.parquet``: present, unique, with finite centroids, and the
    same (in order) as those of the count matrix and of ``cells.zarr.zip``."""
    cells_path = folder / xf.CELLS_PARQUET
    _check_parquet(cells_path, [xf.CELL_ID, xf.CELL_X, xf.CELL_Y, xf.CELL_AREA])
    import pandas as pd

    try:
        cell_ids = pd.read_parquet(cells_path, columns=[xf.CELL_ID])[xf.CELL_ID]
    except Exception as exc:
        raise SigmmaError(f"cannot read cell ids ({exc})", path=cells_path) from exc
    if len(cell_ids) and isinstance(cell_ids.iloc[0], bytes):
        cell_ids = cell_ids.str.decode("utf-8")
    cell_ids = cell_ids.astype(str).to_numpy()
    if len(cell_ids) == 0:
        raise SigmmaError(
            "no cells: the table is empty (a run that segmented no cells, or a partial copy)",
            path=cells_path,
        )
    ids_u, ids_n = np.unique(cell_ids, return_counts=True)
    if (ids_n > 1).any():
        raise SigmmaError(
            f"{int((ids_n > 1).sum())} cell id(s) appear more than once (e.g. "
            f"{ids_u[ids_n > 1][0]!r}): the table is damaged or two runs were merged",
            path=cells_path,
        )
    xy = pd.read_parquet(cells_path, columns=[xf.CELL_X, xf.CELL_Y]).to_numpy(np.float64)
    bad_xy = ~np.isfinite(xy).all(axis=1)
    if bad_xy.any():
        raise SigmmaError(
            f"{int(bad_xy.sum())} of {len(xy)} cells have NaN or infinite centroids "
            f"({xf.CELL_X}/{xf.CELL_Y}): the file is damaged",
            path=cells_path,
        )
    if len(barcodes) != len(cell_ids) or not np.array_equal(barcodes, cell_ids):
        n_bad = (
            abs(len(barcodes) - len(cell_ids))
            if len(barcodes) != len(cell_ids)
            else int((barcodes != cell_ids).sum())
        )
        raise SigmmaError(
            f"the cell ids of the count matrix ({len(barcodes)} cells) do not match "
            f"{xf.CELLS_PARQUET} ({len(cell_ids)} cells; {n_bad} differ)",
            path=folder / xf.CELL_FEATURE_MATRIX,
        )
    if len(zarr_ids) != len(cell_ids) or not np.array_equal(zarr_ids, cell_ids):
        raise SigmmaError(
            f"its cell ids ({len(zarr_ids)}) do not match {xf.CELLS_PARQUET} ({len(cell_ids)})",
            path=folder / xf.CELLS_ZARR,
        )
    return cell_ids


def _check_morphology(folder: Path) -> None:
    """Check the first morphology-focus image (v1–v3 ``ch0000`` or the v4 DAPI file)."""
    morph_dir = folder / xf.MORPHOLOGY_FOCUS_DIR
    first = morph_dir / xf.MORPHOLOGY_FOCUS_FILE.format(0)
    if not first.exists():
        first = morph_dir / xf.MORPHOLOGY_FOCUS_V4_DAPI
    if not first.exists():
        raise SigmmaError(
            f"no {xf.MORPHOLOGY_FOCUS_FILE.format(0)} (or {xf.MORPHOLOGY_FOCUS_V4_DAPI}) inside",
            path=morph_dir,
        )
    _check_tiff(first)


def _attach_he(bundle: XeniumBundle, keypoints_fixed_units: Literal["px", "um"]) -> None:
    """Find and check the bundle's H&E image and set its alignment on ``bundle``.

    The alignment comes from the image's alignment CSV, else the keypoints CSV, else
    (with a warning) the identity.
    """
    folder = bundle.path
    he_path = _find_he(folder)
    if he_path is None:
        raise SigmmaError(
            f"no H&E image (*{xf.HE_IMAGE_SUFFIX}) in the bundle: copy it back with its "
            "alignment CSV, under the name Xenium writes (a renamed file is not found)",
            path=folder,
        )
    axes, shape, dtype = _check_tiff(he_path)
    dims = dict(zip(axes, shape, strict=False))
    n_channels = dims.get("S", dims.get("C", 1))
    if n_channels not in (3, 4) or np.dtype(dtype) != np.uint8:
        raise SigmmaError(
            f"expected an RGB uint8 H&E image, got axes {axes} shape {shape} {dtype}",
            path=he_path,
        )
    bundle.he_image = he_path
    csv = he_path.with_name(he_path.name[: -len(xf.HE_IMAGE_SUFFIX)] + xf.HE_ALIGNMENT_SUFFIX)
    keypoints = sorted(folder.glob(xf.KEYPOINTS_GLOB))
    if csv.exists():
        bundle.alignment = read_alignment_csv(csv)
        bundle.alignment_source, bundle.alignment_file = "csv", csv
    elif keypoints:
        kp = keypoints[0]
        bundle.alignment = affine_from_keypoints(
            kp, fixed_units=keypoints_fixed_units, pixel_size=bundle.pixel_size
        )
        bundle.alignment_source, bundle.alignment_file = "keypoints", kp
    else:
        warnings.warn(
            f"{folder}: no {csv.name} or keypoints CSV; assuming the H&E image is already in "
            "morphology pixels (identity alignment)",
            UserWarning,
            stacklevel=4,
        )
        bundle.alignment = np.eye(3)
        bundle.alignment_source = "identity"


# ---------------------------------------------------------------------------------------
# elements
# ---------------------------------------------------------------------------------------
def _he_image_element(path: Path, affine: np.ndarray, he_mpp: float) -> Any:
    """Lazy multiscale ``(c, y, x)`` uint8 image from the OME-TIFF's own pyramid levels."""
    from spatialdata.transformations import Affine

    from napari_sigmma.io.wsi import open_slide, slide_image_element

    slide = open_slide(path, mpp=he_mpp)  # the alignment, not the metadata, sets the µm/px
    transformation = Affine(affine, input_axes=("x", "y"), output_axes=("x", "y"))
    return slide_image_element(slide, transformation)


def _normalise_table(table: Any, path: Path, uns: dict[str, Any]) -> Any:
    """Genes only in X (CSR float32); controls -> obsm['controls']; cell_id str; uns."""
    import pandas as pd
    import scipy.sparse as sp

    names = table.var_names.astype(str).to_numpy()
    types = (
        table.var["feature_types"].astype(str).to_numpy()
        if "feature_types" in table.var
        else np.full(len(names), xf.GENE_EXPRESSION)
    )
    is_ctrl = np.array(
        [xf.is_control_feature(n, t) for n, t in zip(names, types, strict=True)], dtype=bool
    )
    x = sp.csr_matrix(table.X, dtype=np.float32)
    if x.data.size and (not np.isfinite(x.data).all() or (x.data < 0).any()):
        raise SigmmaError(
            "count matrix has NaN, infinite or negative values", path=path / xf.CELL_FEATURE_MATRIX
        )
    controls = pd.DataFrame(
        np.rint(x[:, np.flatnonzero(is_ctrl)].toarray()).astype(np.int64),
        index=table.obs_names.copy(),
        columns=pd.Index(names[is_ctrl].astype(object)),
    )
    genes = table[:, ~is_ctrl].copy()
    genes.X = sp.csr_matrix(x[:, np.flatnonzero(~is_ctrl)], dtype=np.float32)
    genes.obsm["controls"] = controls
    genes.obs[xf.CELL_ID] = genes.obs[xf.CELL_ID].astype(str).to_numpy()
    genes.obsm["spatial"] = np.asarray(genes.obsm["spatial"], dtype=np.float64)
    genes.uns["sigmma"] = uns
    return genes


def _file_in_message(exc: BaseException, folder: Path) -> Path:
    text = f"{exc}"
    names = [*xf.REQUIRED_FILES, xf.HE_IMAGE_SUFFIX, xf.HE_ALIGNMENT_SUFFIX]
    for name in names:
        if name in text:
            return folder / name
    return folder


def read_xenium(
    path: str | os.PathLike[str],
    *,
    he: bool = True,
    transcripts: bool = True,
    keypoints_fixed_units: Literal["px", "um"] = "px",
) -> SpatialData:
    """Read a Xenium bundle (and its H&E) into the canonical SpatialData layout.

    Parameters
    ----------
    path
        Xenium output folder (or its ``experiment.xenium``).
    he
        Read the post-Xenium H&E image (``*he_image.ome.tif``) and its alignment; it must
        then exist.
    transcripts
        Read ``transcripts.parquet`` as ``points["transcripts"]`` (lazy).
    keypoints_fixed_units
        Unit of ``fixedX/fixedY`` in a keypoints CSV, see :func:`affine_from_keypoints`.

    Returns
    -------
    SpatialData with ``images["he_image"]`` (if ``he``), ``tables["table"]``, the boundary
    and circle shapes, label masks, the morphology image and (optionally) transcripts.
    ``sdata.attrs["sigmma"]`` records the source, ``pixel_size``, the H&E file and where
    its alignment came from.

    Raises
    ------
    SigmmaError
        Missing or corrupt files (named), bad alignment, mismatched cell ids, bad counts.
    """
    bundle = check_xenium_bundle(path, he=he, keypoints_fixed_units=keypoints_fixed_units)
    folder = bundle.path
    from spatialdata_io import xenium as sdio_xenium

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            sdata = sdio_xenium(
                folder,
                cells_as_circles=True,
                gex_only=False,
                aligned_images=False,
                transcripts=transcripts,
            )
    except SigmmaError:
        raise
    except Exception as exc:
        raise SigmmaError(
            f"spatialdata-io could not read the bundle ({type(exc).__name__}: {exc})",
            path=_file_in_message(exc, folder),
        ) from exc

    ps = bundle.pixel_size
    a = bundle.alignment if bundle.alignment is not None else np.eye(3)
    mpp = ps * math.sqrt(abs(np.linalg.det(a[:2, :2])))
    if he and bundle.he_image is not None and not 1e-3 <= mpp <= 1e3:
        raise SigmmaError(
            f"the alignment makes the H&E {mpp:.3g} µm/px (scanners: 0.1-2): it scales the "
            "image by a wrong factor; check the alignment's units (morphology pixels)",
            path=bundle.alignment_file or bundle.he_image,
        )
    # µm -> morphology px -> H&E px, for code that must not care where the data came from
    um_to_he = np.linalg.inv(a) @ np.diag([1.0 / ps, 1.0 / ps, 1.0])
    uns = {"he_mpp": float(mpp), "um_to_he_px": um_to_he.tolist(), "source": "xenium"}
    if not he:
        uns["he_frame"] = "morphology"  # no H&E read: the morphology frame stands in for it
    sdata.tables[TABLE] = _normalise_table(sdata.tables[TABLE], folder, uns)
    if he and bundle.he_image is not None:
        sdata.images[HE_IMAGE] = _he_image_element(bundle.he_image, a, mpp)
    sdata.attrs[ATTRS_KEY] = {
        "source": "xenium",
        "source_path": str(folder),
        "he_mpp": float(mpp),
        "pixel_size": ps,
        "analysis_sw_version": bundle.version,
        "he_image": str(bundle.he_image) if bundle.he_image else None,
        "alignment_source": bundle.alignment_source,
        "alignment_file": str(bundle.alignment_file) if bundle.alignment_file else None,
    }
    return sdata


# ---------------------------------------------------------------------------------------
# coordinate helpers
# ---------------------------------------------------------------------------------------
def _table_uns(sdata: SpatialData) -> dict[str, Any] | None:
    table = sdata.tables.get(TABLE) if hasattr(sdata, "tables") else None
    uns = table.uns.get("sigmma") if table is not None else None
    return uns if isinstance(uns, dict) and "um_to_he_px" in uns else None


def _he_affine(sdata: SpatialData) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    if HE_IMAGE not in sdata.images:
        raise SigmmaError(f"the SpatialData object has no '{HE_IMAGE}' image")
    t = get_transformation(sdata.images[HE_IMAGE], to_coordinate_system="global")
    return np.asarray(
        t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64
    )


def _um_per_global_unit(sdata: SpatialData) -> float:
    """µm per unit of the ``global`` system (the morphology pixel size for Xenium)."""
    from spatialdata.transformations import get_transformation

    attrs = sdata.attrs.get(ATTRS_KEY) if hasattr(sdata, "attrs") else None
    if isinstance(attrs, dict) and attrs.get("pixel_size"):
        return float(attrs["pixel_size"])
    for name in ("cell_circles", "cell_boundaries", "nucleus_boundaries"):
        if name in sdata.shapes:
            t = get_transformation(sdata.shapes[name], to_coordinate_system="global")
            m = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
            scale = math.sqrt(abs(np.linalg.det(np.asarray(m)[:2, :2])))
            if scale > 0:
                return 1.0 / scale
    raise SigmmaError("cannot tell the µm scale of this SpatialData (no pixel_size, no shapes)")


def um_to_he_matrix(sdata: SpatialData) -> np.ndarray:
    """3x3 matrix ``M`` with ``he_px = (M @ [x_um, y_um, 1])[:2]``.

    Taken from ``table.uns["sigmma"]["um_to_he_px"]`` when a reader set it, else computed
    as ``inv(A_he) @ diag(1/pixel_size, 1/pixel_size, 1)`` from the H&E transformation.
    """
    uns = _table_uns(sdata)
    if uns is not None:
        return np.asarray(uns["um_to_he_px"], dtype=np.float64)
    s = 1.0 / _um_per_global_unit(sdata)
    return np.linalg.inv(_he_affine(sdata)) @ np.diag([s, s, 1.0])


def he_mpp(sdata: SpatialData) -> float:
    """µm per H&E level-0 pixel (from the H&E affine and the morphology pixel size)."""
    uns = _table_uns(sdata)
    if uns is not None and uns.get("he_mpp"):
        return float(uns["he_mpp"])
    a = _he_affine(sdata)
    return _um_per_global_unit(sdata) * math.sqrt(abs(np.linalg.det(a[:2, :2])))


def he_pixels_from_um(sdata: SpatialData, xy_um: np.ndarray) -> np.ndarray:
    """Map ``(N, 2)`` µm positions (cells, transcripts) to H&E level-0 pixels ``(x, y)``.

    ``xy_he = inv(A_he) @ (xy_um / pixel_size, 1)``.
    """
    xy = np.asarray(xy_um, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise SigmmaError(f"expected (N, 2) positions, got {xy.shape}")
    m = um_to_he_matrix(sdata)
    return xy @ m[:2, :2].T + m[:2, 2]
