"""Names and encodings of the 10x Genomics Xenium output bundle (XOA 2.x), in one place.

Both the writer (:mod:`napari_sigmma.samples.xenium_write`) and the reader
(:mod:`napari_sigmma.io.xenium`) use these constants; they follow what
``spatialdata_io.xenium`` (0.7.x) reads.

Cell ids: a Xenium cell id string is the uint32 *prefix* written as 8 hexadecimal nibbles,
most significant first, each nibble mapped ``0 -> 'a'`` … ``15 -> 'p'``, then ``-<suffix>``
(the dataset suffix, usually 1), e.g. ``"aaaabfkp-1"``. ``cells.zarr.zip`` stores the
``(prefix, suffix)`` pairs as an ``(N, 2)`` uint32 array.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from napari_sigmma.constants import is_control
from napari_sigmma.errors import SigmmaError

# --- files -------------------------------------------------------------------------------
EXPERIMENT_FILE = "experiment.xenium"
CELLS_ZARR = "cells.zarr.zip"
CELL_FEATURE_MATRIX = "cell_feature_matrix.h5"
CELLS_PARQUET = "cells.parquet"
CELL_BOUNDARIES = "cell_boundaries.parquet"
NUCLEUS_BOUNDARIES = "nucleus_boundaries.parquet"
TRANSCRIPTS = "transcripts.parquet"
MORPHOLOGY_FOCUS_DIR = "morphology_focus"
MORPHOLOGY_FOCUS_FILE = "morphology_focus_{:04d}.ome.tif"
MORPHOLOGY_FOCUS_V4_DAPI = "ch0000_dapi.ome.tif"
HE_IMAGE_SUFFIX = "he_image.ome.tif"
HE_ALIGNMENT_SUFFIX = "he_imagealignment.csv"
KEYPOINTS_GLOB = "*keypoints*.csv"

#: Files (and the one folder) a bundle must have, in the order the reader checks them.
REQUIRED_FILES: tuple[str, ...] = (
    EXPERIMENT_FILE,
    CELLS_ZARR,
    CELL_FEATURE_MATRIX,
    CELLS_PARQUET,
    CELL_BOUNDARIES,
    NUCLEUS_BOUNDARIES,
    TRANSCRIPTS,
    MORPHOLOGY_FOCUS_DIR,
)

# --- experiment.xenium ------------------------------------------------------------------
PIXEL_SIZE_KEY = "pixel_size"
SW_VERSION_KEY = "analysis_sw_version"
XENIUM_RANGER_KEY = "xenium_ranger"
DEFAULT_PIXEL_SIZE = 0.2125  # µm per morphology pixel
ANALYSIS_SW_VERSION = "xenium-2.0.0.10"

# --- cells.zarr.zip ---------------------------------------------------------------------
ZARR_CELL_ID = "cell_id"
ZARR_CELL_SUMMARY = "cell_summary"
ZARR_MASKS = "masks"
ZARR_POLYGON_SETS = "polygon_sets"
NUCLEUS_MASK_INDEX = 0
CELL_MASK_INDEX = 1
CELL_SUMMARY_COLUMNS: tuple[str, ...] = (
    "cell_centroid_x",
    "cell_centroid_y",
    "cell_area",
    "nucleus_centroid_x",
    "nucleus_centroid_y",
    "nucleus_area",
    "z_level",
    "nucleus_count",
)

# --- cells.parquet / tables -------------------------------------------------------------
CELL_ID = "cell_id"
CELL_X = "x_centroid"
CELL_Y = "y_centroid"
CELL_AREA = "cell_area"
NUCLEUS_AREA = "nucleus_area"
NUCLEUS_COUNT = "nucleus_count"
SEGMENTATION_METHOD = "segmentation_method"
CELLS_INPUT_COLUMNS: tuple[str, ...] = (CELL_ID, CELL_X, CELL_Y, CELL_AREA, NUCLEUS_AREA)

# --- boundaries -------------------------------------------------------------------------
VERTEX_X = "vertex_x"
VERTEX_Y = "vertex_y"
LABEL_ID = "label_id"

# --- transcripts ------------------------------------------------------------------------
TX_ID = "transcript_id"
TX_X = "x_location"
TX_Y = "y_location"
TX_Z = "z_location"
TX_FEATURE = "feature_name"
TX_QV = "qv"
TX_OVERLAPS_NUCLEUS = "overlaps_nucleus"
TX_FOV = "fov_name"
TX_NUCLEUS_DISTANCE = "nucleus_distance"
TX_CODEWORD_INDEX = "codeword_index"
UNASSIGNED = "UNASSIGNED"

# --- cell_feature_matrix.h5 (10x v3 HDF5) -----------------------------------------------
H5_MATRIX = "matrix"
H5_FEATURES = "features"

# --- feature types ----------------------------------------------------------------------
GENE_EXPRESSION = "Gene Expression"
NEG_CONTROL_PROBE = "Negative Control Probe"
NEG_CONTROL_CODEWORD = "Negative Control Codeword"
UNASSIGNED_CODEWORD = "Unassigned Codeword"
GENOMIC_CONTROL = "Genomic Control"
DEPRECATED_CODEWORD = "Deprecated Codeword"
FEATURE_TYPES: tuple[str, ...] = (
    GENE_EXPRESSION,
    NEG_CONTROL_PROBE,
    NEG_CONTROL_CODEWORD,
    UNASSIGNED_CODEWORD,
    GENOMIC_CONTROL,
    DEPRECATED_CODEWORD,
)
#: cells.parquet count column for each non-gene feature type.
CONTROL_COUNT_COLUMNS: dict[str, str] = {
    NEG_CONTROL_PROBE: "control_probe_counts",
    GENOMIC_CONTROL: "genomic_control_counts",
    NEG_CONTROL_CODEWORD: "control_codeword_counts",
    UNASSIGNED_CODEWORD: "unassigned_codeword_counts",
    DEPRECATED_CODEWORD: "deprecated_codeword_counts",
}

# --- keypoints CSV (Xenium Explorer) ----------------------------------------------------
KP_FIXED_X = "fixedX"
KP_FIXED_Y = "fixedY"
KP_ALIGN_X = "alignmentX"
KP_ALIGN_Y = "alignmentY"

_ID_RE = re.compile(r"^([a-p]{8})-(\d+)$")
_SHIFTS = np.array([28, 24, 20, 16, 12, 8, 4, 0], dtype=np.uint32)


def is_control_feature(name: str, feature_type: str) -> bool:
    """Whether a feature is a control probe / codeword rather than a real gene."""
    return feature_type != GENE_EXPRESSION or is_control(name)


def encode_prefix(prefix: Iterable[int] | np.ndarray) -> np.ndarray:
    """uint32 prefixes -> 8-letter strings (``0 -> 'a'`` … ``15 -> 'p'`` per nibble)."""
    p = np.asarray(prefix, dtype=np.uint64)
    if p.size and (p.max() > 0xFFFFFFFF):
        raise SigmmaError("cell id prefix does not fit in uint32")
    nibbles = (p.astype(np.uint32)[:, None] >> _SHIFTS) & 0xF
    codes = (nibbles + ord("a")).astype(np.uint8)
    return codes.view("S8").ravel().astype("U8")


def cell_ids_from_pairs(
    prefix: Sequence[int] | np.ndarray, suffix: Sequence[int] | np.ndarray
) -> np.ndarray:
    """``(prefix, suffix)`` uint32 pairs -> Xenium cell id strings (``"ffkpbaba-1"``)."""
    prefix = np.asarray(prefix)
    suffix = np.broadcast_to(np.asarray(suffix), prefix.shape)
    letters = encode_prefix(prefix)
    return np.char.add(np.char.add(letters, "-"), suffix.astype(np.int64).astype("U"))


def pairs_from_cell_ids(cell_ids: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Xenium cell id strings -> ``(prefix, suffix)`` uint32 arrays.

    Raises
    ------
    SigmmaError
        If an id is not of the form ``<8 letters a-p>-<integer>``.
    """
    ids = np.asarray(cell_ids, dtype=str)
    if ids.size == 0:
        return np.zeros(0, np.uint32), np.zeros(0, np.uint32)
    parts = np.char.partition(ids, "-")
    letters, dash, suffix = parts[:, 0], parts[:, 1], parts[:, 2]
    bad = (np.char.str_len(letters) != 8) | (dash != "-") | ~np.char.isdigit(suffix)
    codes = np.zeros((ids.size, 8), np.int64)
    if not bad.any():
        try:
            raw = np.char.encode(letters, "ascii").astype("S8")
        except UnicodeEncodeError:
            bad = bad | np.array([not str(x).isascii() for x in letters])
        else:
            codes = np.frombuffer(raw.tobytes(), np.uint8).reshape(-1, 8).astype(np.int64)
            codes -= ord("a")
            bad = ((codes < 0) | (codes > 15)).any(axis=1)
            bad |= ~np.char.isalpha(letters)
    if bad.any():
        example = str(ids[np.flatnonzero(bad)[0]])
        raise SigmmaError(
            f"{int(bad.sum())} cell id(s) are not Xenium ids (8 letters a-p, '-', a number), "
            f"e.g. {example!r}"
        )
    prefix = (codes << _SHIFTS.astype(np.int64)).sum(axis=1).astype(np.uint32)
    suffix_arr = suffix.astype(np.int64)
    if (suffix_arr > 0xFFFFFFFF).any():
        raise SigmmaError("cell id suffix does not fit in uint32")
    return prefix, suffix_arr.astype(np.uint32)


def xenium_cell_ids(n: int, suffix: int = 1) -> list[str]:
    """``n`` distinct, sorted Xenium-style cell ids (``"aaabaaaa-1"``, …).

    Prefixes start at 0x10000 and step by 13 so that every nibble letter gets used, much like
    the ids of a real run.
    """
    if n < 0:
        raise SigmmaError(f"number of cells must be >= 0, got {n}")
    prefix = 0x10000 + 13 * np.arange(n, dtype=np.uint64)
    return cell_ids_from_pairs(prefix, np.full(n, suffix)).tolist()
