"""HEST-1k Xenium samples (mahmoodlab/HEST layout) as SpatialData.

A HEST-1k sample folder holds, for a sample id ``{id}``::

    wsis/{id}.tif                              pyramidal generic TIFF, the H&E
    transcripts/{id}_transcripts.parquet       one row per transcript; he_x, he_y in H&E px
    xenium_seg/{id}_xenium_cell_seg.parquet    cell polygons in H&E px (GeoParquet, WKB)
    xenium_seg/{id}_xenium_nucleus_seg.parquet nucleus polygons in H&E px
    metadata/{id}.json                         pixel_size_um_estimated, ...
    st/{id}.h5ad                               100 µm pseudo-spots (not used: not per cell)

HEST has already registered the Xenium data onto the H&E, so the ``"global"`` coordinate
system here *is* H&E level-0 pixels: the image's transformation is the identity. Like
spatialdata-io does for Xenium (where ``global`` is morphology pixels), cells, boundaries
and transcripts are stored in µm (H&E px × µm/px) with ``Scale(1 / he_mpp)`` to ``global``.

Mapping µm to H&E pixels is therefore ``he_px = xy_um / he_mpp``, and the table carries it
in the same form every reader uses::

    table.uns["sigmma"] = {"he_mpp": m, "um_to_he_px": [[1/m, 0, 0], [0, 1/m, 0], [0, 0, 1]]}

so ``he_px = (np.asarray(um_to_he_px) @ [x_um, y_um, 1])[:2]`` whatever the source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.constants import is_control
from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    import pandas as pd
    from spatialdata import SpatialData

__all__ = [
    "MIN_QV",
    "TRANSCRIPT_COLUMNS",
    "find_hest_samples",
    "is_control_feature",
    "is_hest_folder",
    "read_hest",
    "write_hest_sample",
]

WSI_DIR = "wsis"
TRANSCRIPTS_DIR = "transcripts"
SEG_DIR = "xenium_seg"
META_DIR = "metadata"
TRANSCRIPTS_FILE = "{id}_transcripts.parquet"
CELL_SEG_FILE = "{id}_xenium_cell_seg.parquet"
NUCLEUS_SEG_FILE = "{id}_xenium_nucleus_seg.parquet"
META_FILE = "{id}.json"
WSI_SUFFIXES = (".tif", ".tiff")
MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")

#: Columns read from the transcripts parquet.
TRANSCRIPT_COLUMNS = ("cell_id", "he_x", "he_y", "feature_name", "qv")
#: Transcripts below this Phred quality are dropped (Xenium's own threshold).
MIN_QV = 20.0
#: cell_id values meaning "not in a cell".
UNASSIGNED = frozenset({"UNASSIGNED", "-1", "", "nan", "None"})
#: Radius (µm) of a cell circle when the cell has no segmentation polygon.
DEFAULT_RADIUS_UM = 5.0


def is_control_feature(name: str) -> bool:
    """Whether a Xenium feature name is a control probe / codeword rather than a gene."""
    return is_control(name)


def is_hest_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a HEST-1k folder (``wsis/`` and ``transcripts/``)."""
    p = Path(path)
    return p.is_dir() and (p / WSI_DIR).is_dir() and (p / TRANSCRIPTS_DIR).is_dir()


def find_hest_samples(path: str | os.PathLike[str]) -> list[str]:
    """Sample ids having both a WSI and a transcripts file, sorted."""
    p = Path(path)
    ids = set()
    if (p / WSI_DIR).is_dir():
        for f in (p / WSI_DIR).iterdir():
            name = f.name
            for suffix in (".ome.tif", ".ome.tiff", *WSI_SUFFIXES):
                if name.lower().endswith(suffix):
                    ids.add(name[: -len(suffix)])
                    break
    return sorted(i for i in ids if (p / TRANSCRIPTS_DIR / TRANSCRIPTS_FILE.format(id=i)).is_file())


# ----------------------------------------------------------------------------- reading


def read_hest(
    path: str | os.PathLike[str],
    sample_id: str | None = None,
    *,
    include_transcripts: bool = False,
    min_qv: float = MIN_QV,
    mpp: float | None = None,
) -> SpatialData:
    """Read one HEST-1k Xenium sample into the canonical SpatialData layout.

    Parameters
    ----------
    path
        The HEST folder (with ``wsis/``, ``transcripts/``, ``xenium_seg/``, ``metadata/``).
    sample_id
        Which sample; may be omitted when the folder holds exactly one.
    include_transcripts
        Also keep the transcripts as ``points["transcripts"]`` (µm).
    min_qv
        Transcripts with ``qv`` below this are ignored.
    mpp
        µm per H&E pixel; by default ``pixel_size_um_estimated`` of the metadata JSON,
        else the WSI's own metadata.

    Returns
    -------
    SpatialData
        ``images["he_image"]`` (identity to ``global`` = H&E pixels), ``tables["table"]``
        (cells × genes raw counts; ``obsm["spatial"]`` µm; ``obsm["controls"]``;
        ``uns["sigmma"]`` with ``he_mpp`` and ``um_to_he_px``), ``shapes["cell_boundaries"]``,
        ``["nucleus_boundaries"]`` (when segmented) and ``["cell_circles"]`` in µm with
        ``Scale(1 / he_mpp)`` to ``global``.

    Notes
    -----
    Per-cell counts are the transcripts grouped by ``cell_id`` (``UNASSIGNED`` / ``-1``
    dropped). Centroids are the segmentation polygons' centroids; cells without a polygon
    use the mean position of their transcripts.

    Raises
    ------
    SigmmaError
        Missing folder, subfolder or file; unknown sample id; a transcripts file without
        the needed columns; an unreadable WSI or segmentation.
    """
    from spatialdata import SpatialData
    from spatialdata.transformations import Identity, Scale

    from napari_sigmma.io.wsi import slide_image_element

    root = Path(path)
    sample_id = _resolve_sample(root, sample_id)
    files = _sample_files(root, sample_id)

    slide = _open_wsi(root, sample_id, files, mpp)
    mpp = slide.mpp

    tx, panel = _read_transcripts(files["transcripts"], min_qv=min_qv)
    cells_seg = _read_polygons(files["cell_seg"]) if files["cell_seg"] is not None else None
    nuclei_seg = _read_polygons(files["nucleus_seg"]) if files["nucleus_seg"] is not None else None

    assigned = tx[tx["cell_id"] != ""]
    cell_ids = _cell_ids(assigned, cells_seg, files["transcripts"])
    cell_index = {c: i for i, c in enumerate(cell_ids)}
    rows = np.fromiter((cell_index[c] for c in assigned["cell_id"]), np.int64, len(assigned))
    n_cells = len(cell_ids)
    counts, genes, ctrl, ctrl_names = _count_matrices(assigned, rows, panel, n_cells)
    centroid_px, area_px = _centroids_px(assigned, rows, n_cells, cells_seg, files["transcripts"])

    table = _make_table(
        cell_ids=cell_ids,
        counts=counts,
        genes=genes,
        controls=ctrl,
        control_names=ctrl_names,
        centroid_um=centroid_px * mpp,
        area_um2=area_px * mpp * mpp,
        he_mpp=mpp,
        um_to_he_px=np.diag([1.0 / mpp, 1.0 / mpp, 1.0]),
        extra_uns={"source": "hest", "sample_id": sample_id, "min_qv": float(min_qv)},
    )

    to_global = Scale([1.0 / mpp, 1.0 / mpp], axes=("x", "y"))
    shapes = {"cell_circles": _circles(table, to_global)}
    if cells_seg is not None:
        shapes["cell_boundaries"] = _polygons_um(cells_seg, mpp, to_global)
    if nuclei_seg is not None:
        shapes["nucleus_boundaries"] = _polygons_um(nuclei_seg, mpp, to_global)

    points = {}
    if include_transcripts:
        points["transcripts"] = _transcript_points(tx, mpp, to_global)

    image = slide_image_element(slide, Identity())
    sdata = SpatialData(
        images={"he_image": image}, shapes=shapes, points=points, tables={"table": table}
    )
    sdata.attrs["sigmma"] = {
        "he_mpp": float(mpp),
        "source_path": str(root),
        "source": "hest",
        "sample_id": sample_id,
    }
    return sdata


def _open_wsi(root: Path, sample_id: str, files: dict[str, Path | None], mpp: float | None) -> Any:
    """Open the sample's WSI; its pixel size is ``mpp``, else the metadata JSON's, else the
    WSI's own (none of them: an error that says to pass ``mpp=``)."""
    from napari_sigmma.io.wsi import open_slide

    if mpp is None and files["metadata"] is not None:
        mpp = _metadata_mpp(files["metadata"])
    try:
        slide = open_slide(files["wsi"], mpp=mpp)
    except SigmmaError as err:
        if mpp is None and "pixel size" in err.problem:
            meta = root / META_DIR / META_FILE.format(id=sample_id)
            raise SigmmaError(
                f"no pixel size: {meta} is missing or has no {MPP_KEYS[0]}, and the WSI "
                "carries none; pass mpp= (µm per H&E pixel)",
                path=files["wsi"],
            ) from err
        raise
    return slide


def _cell_ids(assigned: pd.DataFrame, cells_seg: Any, transcripts: Path) -> np.ndarray:
    """Every segmented cell, then the cells that only appear in the (assigned) transcripts."""
    tx_cells = np.unique(assigned["cell_id"].to_numpy())
    if cells_seg is not None:
        seg_ids = cells_seg[0]
        extra = np.setdiff1d(tx_cells, seg_ids, assume_unique=False)
        cell_ids = np.concatenate([seg_ids, extra])
    else:
        cell_ids = tx_cells
    if len(cell_ids) == 0:
        raise SigmmaError(
            "no cells: no segmentation and no transcript assigned to a cell",
            path=transcripts,
        )
    return cell_ids


def _count_matrices(
    assigned: pd.DataFrame, rows: np.ndarray, panel: np.ndarray, n_cells: int
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Cells × genes counts (CSR, float32), the genes, cells × controls counts and the
    control names, from the transcripts assigned to cell ``rows``."""
    from scipy import sparse

    # var = every gene of the panel (all feature names in the file), controls apart
    panel_is_control = np.array([is_control_feature(f) for f in panel], dtype=bool)
    genes, ctrl_names = panel[~panel_is_control], panel[panel_is_control]
    features = assigned["feature_name"].to_numpy()
    controls_mask = np.isin(features, ctrl_names)

    gene_codes = np.searchsorted(genes, features[~controls_mask])
    counts = sparse.csr_matrix(
        (np.ones(len(gene_codes), np.float32), (rows[~controls_mask], gene_codes)),
        shape=(n_cells, len(genes)),
        dtype=np.float32,
    )
    counts.sum_duplicates()
    ctrl_codes = np.searchsorted(ctrl_names, features[controls_mask])
    ctrl = sparse.coo_matrix(
        (np.ones(len(ctrl_codes), np.int64), (rows[controls_mask], ctrl_codes)),
        shape=(n_cells, len(ctrl_names)),
    ).toarray()
    return counts, genes, ctrl, ctrl_names


def _centroids_px(
    assigned: pd.DataFrame, rows: np.ndarray, n_cells: int, cells_seg: Any, transcripts: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Cell centroids and areas (H&E px): polygons first, transcript means for the rest
    (area NaN for cells without a polygon)."""
    centroid_px = np.full((n_cells, 2), np.nan)
    area_px = np.full(n_cells, np.nan)
    if cells_seg is not None:
        import shapely

        n_seg = len(cells_seg[0])
        cxy = shapely.get_coordinates(shapely.centroid(cells_seg[1]))
        centroid_px[:n_seg] = cxy
        area_px[:n_seg] = shapely.area(cells_seg[1])
    missing = np.isnan(centroid_px[:, 0])
    if missing.any():
        xy = assigned[["he_x", "he_y"]].to_numpy(np.float64)
        sums = np.zeros((n_cells, 2))
        np.add.at(sums, rows, xy)
        n = np.bincount(rows, minlength=n_cells).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums / n[:, None]
        centroid_px[missing] = means[missing]
    if np.isnan(centroid_px).any():  # pragma: no cover - every cell has a polygon or transcripts
        raise SigmmaError("a cell has neither a polygon nor transcripts", path=transcripts)
    return centroid_px, area_px


def _resolve_sample(root: Path, sample_id: str | None) -> str:
    if not root.exists():
        raise SigmmaError("folder not found", path=root)
    if not root.is_dir():
        raise SigmmaError("not a folder (a HEST-1k sample folder was expected)", path=root)
    for sub in (WSI_DIR, TRANSCRIPTS_DIR):
        if not (root / sub).is_dir():
            raise SigmmaError(
                f"not a HEST-1k folder: the {sub}/ subfolder is missing "
                f"(expected {WSI_DIR}/, {TRANSCRIPTS_DIR}/, {SEG_DIR}/, {META_DIR}/)",
                path=root,
            )
    found = find_hest_samples(root)
    if sample_id is None:
        if len(found) == 1:
            return found[0]
        if not found:
            raise SigmmaError(
                f"no sample with both {WSI_DIR}/<id>.tif and "
                f"{TRANSCRIPTS_DIR}/<id>_transcripts.parquet",
                path=root,
            )
        raise SigmmaError(
            f"{len(found)} samples in the folder ({', '.join(found)}); pass sample_id",
            path=root,
        )
    sample_id = str(sample_id)
    if sample_id not in found:
        listing = ", ".join(found) if found else "none"
        raise SigmmaError(
            f"no sample {sample_id!r} (needs {WSI_DIR}/{sample_id}.tif and "
            f"{TRANSCRIPTS_DIR}/{TRANSCRIPTS_FILE.format(id=sample_id)}); samples found: "
            f"{listing}",
            path=root,
        )
    return sample_id


def _sample_files(root: Path, sample_id: str) -> dict[str, Path | None]:
    wsi = next(
        (
            root / WSI_DIR / f"{sample_id}{s}"
            for s in (*WSI_SUFFIXES, ".ome.tif", ".ome.tiff")
            if (root / WSI_DIR / f"{sample_id}{s}").is_file()
        ),
        None,
    )
    assert wsi is not None  # _resolve_sample checked it
    files: dict[str, Path | None] = {
        "wsi": wsi,
        "transcripts": root / TRANSCRIPTS_DIR / TRANSCRIPTS_FILE.format(id=sample_id),
    }
    optional = {
        "cell_seg": root / SEG_DIR / CELL_SEG_FILE.format(id=sample_id),
        "nucleus_seg": root / SEG_DIR / NUCLEUS_SEG_FILE.format(id=sample_id),
        "metadata": root / META_DIR / META_FILE.format(id=sample_id),
    }
    for key, f in optional.items():
        files[key] = f if f.is_file() else None
    return files


def _metadata_mpp(path: Path) -> float | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SigmmaError(f"cannot read the metadata JSON ({err})", path=path) from err
    if not isinstance(meta, dict):
        raise SigmmaError("the metadata JSON is not an object", path=path)
    for key in MPP_KEYS:
        value = meta.get(key)
        if value is None:
            continue
        try:
            mpp = float(value)
        except (TypeError, ValueError) as err:
            raise SigmmaError(f"{key} is not a number: {value!r}", path=path) from err
        if not np.isfinite(mpp) or mpp <= 0:
            raise SigmmaError(f"{key} must be positive, got {value!r}", path=path)
        return mpp
    return None


def _read_transcripts(path: Path, *, min_qv: float) -> tuple[pd.DataFrame, np.ndarray]:
    """The transcripts with ``qv >= min_qv`` (``cell_id`` as str, ``""`` = unassigned),
    and every feature name in the file (the panel, whatever the quality)."""
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as err:
        raise SigmmaError(f"not a readable parquet file ({err})", path=path) from err
    missing = [c for c in TRANSCRIPT_COLUMNS if c not in schema.names]
    if missing:
        raise SigmmaError(
            f"the transcripts table lacks column(s) {', '.join(missing)} "
            f"(needs {', '.join(TRANSCRIPT_COLUMNS)})",
            path=path,
        )
    try:
        df = pd.read_parquet(path, columns=list(TRANSCRIPT_COLUMNS))
    except Exception as err:
        raise SigmmaError(f"cannot read the transcripts ({err})", path=path) from err
    features = np.unique(_as_str(df["feature_name"]))
    df = df[df["qv"].to_numpy(np.float64) >= min_qv]
    df = pd.DataFrame(
        {
            "cell_id": _as_str(df["cell_id"]),
            "he_x": df["he_x"].to_numpy(np.float64),
            "he_y": df["he_y"].to_numpy(np.float64),
            "feature_name": _as_str(df["feature_name"]),
            "qv": df["qv"].to_numpy(np.float32),
        }
    )
    df.loc[df["cell_id"].isin(UNASSIGNED), "cell_id"] = ""
    return df.reset_index(drop=True), features


def _as_str(col: pd.Series) -> np.ndarray:
    """Strings from a column of str, bytes or integers (as Xenium versions store them)."""
    values = col.to_numpy()
    if values.dtype.kind in "iu":
        return values.astype(str).astype(object)
    if values.dtype.kind == "f":
        out = np.where(np.isnan(values), -1, values).astype(np.int64).astype(str)
        return out.astype(object)
    return np.array(
        [v.decode() if isinstance(v, bytes) else ("" if v is None else str(v)) for v in values],
        dtype=object,
    )


def _read_polygons(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, polygons)`` from a HEST segmentation parquet (GeoParquet or plain WKB)."""
    import pandas as pd
    import shapely

    try:
        import geopandas as gpd

        gdf = gpd.read_parquet(path)
        geoms = np.asarray(gdf.geometry.values, dtype=object)
        frame: pd.DataFrame = gdf
    except Exception:
        try:
            frame = pd.read_parquet(path)
        except Exception as err:
            raise SigmmaError(f"not a readable parquet file ({err})", path=path) from err
        col = next((c for c in ("geometry", "combined", "geom") if c in frame.columns), None)
        if col is None:
            raise SigmmaError("no geometry column in the segmentation table", path=path) from None
        try:
            geoms = shapely.from_wkb(frame[col].to_numpy())
        except Exception as err:
            raise SigmmaError(f"the geometry column is not WKB ({err})", path=path) from err
    if "cell_id" in frame.columns:
        ids = _as_str(frame["cell_id"])
    else:
        ids = _as_str(frame.index.to_series())
    geoms = np.array([_largest_polygon(g) for g in geoms], dtype=object)
    keep = np.array([g is not None for g in geoms], dtype=bool) & ~np.isin(ids, list(UNASSIGNED))
    ids, geoms = ids[keep], geoms[keep]
    if len(np.unique(ids)) != len(ids):
        raise SigmmaError("the segmentation has duplicate cell ids", path=path)
    return ids.astype(str).astype(object), geoms


def _largest_polygon(geom: Any) -> Any:
    if geom is None or geom.is_empty:
        return None
    if geom.geom_type == "Polygon":
        return geom
    if geom.geom_type == "MultiPolygon":
        return max(geom.geoms, key=lambda g: g.area)
    return None


def _make_table(
    *,
    cell_ids: np.ndarray,
    counts: Any,
    genes: np.ndarray,
    controls: np.ndarray,
    control_names: np.ndarray,
    centroid_um: np.ndarray,
    area_um2: np.ndarray,
    he_mpp: float,
    um_to_he_px: np.ndarray,
    extra_uns: Mapping[str, Any] | None = None,
) -> Any:
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    ids = pd.Index(np.asarray(cell_ids, dtype=str).astype(object))
    obs = pd.DataFrame(
        {
            "cell_id": ids.to_numpy(),
            "transcript_counts": np.asarray(counts.sum(axis=1)).ravel().astype(np.int64),
            "control_probe_counts": controls.sum(axis=1).astype(np.int64),
            "cell_area": area_um2,
            "region": pd.Categorical(["cell_circles"] * len(ids)),
        },
        index=ids,
    )
    var = pd.DataFrame(
        {"gene_ids": np.asarray(genes, dtype=object), "feature_types": "Gene Expression"},
        index=pd.Index(np.asarray(genes, dtype=str).astype(object)),
    )
    adata = ad.AnnData(X=counts.tocsr().astype(np.float32), obs=obs, var=var)
    adata.obsm["spatial"] = np.asarray(centroid_um, dtype=np.float64)
    adata.obsm["controls"] = pd.DataFrame(
        controls.astype(np.int64),
        index=ids,
        columns=pd.Index(np.asarray(control_names, dtype=str).astype(object)),
    )
    uns = {
        "he_mpp": float(he_mpp),
        "um_to_he_px": np.asarray(um_to_he_px, dtype=np.float64).tolist(),
    }
    uns.update(dict(extra_uns or {}))
    adata.uns["sigmma"] = uns
    return TableModel.parse(
        adata, region="cell_circles", region_key="region", instance_key="cell_id"
    )


def _circles(table: Any, to_global: Any) -> Any:
    from spatialdata.models import ShapesModel

    area = table.obs["cell_area"].to_numpy(np.float64)
    radius = np.where(np.isfinite(area) & (area > 0), np.sqrt(area / np.pi), DEFAULT_RADIUS_UM)
    return ShapesModel.parse(
        np.asarray(table.obsm["spatial"], dtype=np.float64),
        geometry=0,
        radius=radius,
        index=table.obs["cell_id"].copy(),
        transformations={"global": to_global},
    )


def _polygons_um(seg: tuple[np.ndarray, np.ndarray], mpp: float, to_global: Any) -> Any:
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata.models import ShapesModel

    ids, geoms = seg
    scaled = shapely.transform(np.asarray(geoms, dtype=object), lambda xy: xy * mpp)
    gdf = gpd.GeoDataFrame(
        {"cell_id": ids}, geometry=list(scaled), index=pd.Index(ids.astype(str).astype(object))
    )
    return ShapesModel.parse(gdf, transformations={"global": to_global})


def _transcript_points(tx: pd.DataFrame, mpp: float, to_global: Any) -> Any:
    import pandas as pd
    from spatialdata.models import PointsModel

    df = pd.DataFrame(
        {
            "x": tx["he_x"].to_numpy() * mpp,
            "y": tx["he_y"].to_numpy() * mpp,
            "feature_name": pd.Categorical(tx["feature_name"]),
            "cell_id": tx["cell_id"].to_numpy(),
            "qv": tx["qv"].to_numpy(),
        }
    )
    return PointsModel.parse(
        df,
        coordinates={"x": "x", "y": "y"},
        feature_key="feature_name",
        transformations={"global": to_global},
    )


# ----------------------------------------------------------------------------- writing


def write_hest_sample(
    out: str | os.PathLike[str],
    *,
    sample_id: str,
    he_image: np.ndarray,
    mpp: float,
    transcripts: pd.DataFrame | Mapping[str, Sequence[Any] | np.ndarray],
    cell_polygons: Mapping[str, np.ndarray] | None = None,
    nucleus_polygons: Mapping[str, np.ndarray] | None = None,
    metadata: Mapping[str, Any] | None = None,
    tile: int = 256,
    compression: str = "zlib",
    mpp_in_tiff: bool = False,
) -> Path:
    """Write a small HEST-1k style sample folder (for tests and examples).

    Parameters
    ----------
    out
        The folder (created; an existing sample with the same id is overwritten).
    sample_id
        The sample id used in every file name.
    he_image
        ``(H, W, 3)`` uint8 H&E, written as a tiled pyramidal generic TIFF (levels as
        reduced-resolution pages, as HEST writes them).
    mpp
        µm/px of the H&E, written to ``metadata/{id}.json`` as ``pixel_size_um_estimated``.
    transcripts
        Columns ``cell_id, he_x, he_y, feature_name, qv`` (more are kept), H&E px.
    cell_polygons, nucleus_polygons
        ``{cell_id: (n, 2) array of x, y H&E px}``, written as GeoParquet with a WKB
        geometry column and the cell id as index (as HEST stores them).
    metadata
        Extra metadata keys.
    tile
        TIFF tile size.
    compression
        TIFF compression (``"zlib"`` keeps pixels exact, ``"jpeg"`` is what HEST uses).
    mpp_in_tiff
        Also write the pixel size as TIFF resolution (HEST's files usually lack it).

    Returns
    -------
    Path of the folder.
    """
    import pandas as pd

    root = Path(out)
    image = np.asarray(he_image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SigmmaError(f"he_image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if not mpp or mpp <= 0:
        raise SigmmaError(f"mpp must be positive, got {mpp}")
    for sub in (WSI_DIR, TRANSCRIPTS_DIR, SEG_DIR, META_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)

    _write_generic_pyramid(
        root / WSI_DIR / f"{sample_id}.tif",
        image,
        tile=tile,
        compression=compression,
        mpp=mpp if mpp_in_tiff else None,
    )

    df = (
        pd.DataFrame(dict(transcripts))
        if not isinstance(transcripts, pd.DataFrame)
        else transcripts
    )
    df.to_parquet(root / TRANSCRIPTS_DIR / TRANSCRIPTS_FILE.format(id=sample_id), index=False)

    if cell_polygons is not None:
        _write_polygons(root / SEG_DIR / CELL_SEG_FILE.format(id=sample_id), cell_polygons)
    if nucleus_polygons is not None:
        _write_polygons(root / SEG_DIR / NUCLEUS_SEG_FILE.format(id=sample_id), nucleus_polygons)

    meta = {
        "id": sample_id,
        "st_technology": "Xenium",
        "pixel_size_um_estimated": float(mpp),
        "fullres_px_height": int(image.shape[0]),
        "fullres_px_width": int(image.shape[1]),
    }
    meta.update(dict(metadata or {}))
    (root / META_DIR / META_FILE.format(id=sample_id)).write_text(json.dumps(meta, indent=2))
    return root


def _write_polygons(path: Path, polygons: Mapping[str, np.ndarray]) -> None:
    import geopandas as gpd
    import pandas as pd
    import shapely

    ids = [str(k) for k in polygons]
    geoms = [shapely.Polygon(np.asarray(v, dtype=np.float64)) for v in polygons.values()]
    gdf = gpd.GeoDataFrame(
        {"geometry": geoms}, geometry="geometry", index=pd.Index(ids, name="cell_id")
    )
    gdf.to_parquet(path)


def _write_generic_pyramid(
    path: Path, image: np.ndarray, *, tile: int, compression: str, mpp: float | None
) -> None:
    """Tiled TIFF, level 0 then 2x reduced pages (NewSubfileType = 1), like pyvips writes."""
    import tifffile

    levels = [image]
    while max(levels[-1].shape[:2]) > tile:
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        b = a[:h, :w].astype(np.uint16)
        levels.append(
            ((b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2] + 2) // 4).astype(
                np.uint8
            )
        )
    options: dict[str, Any] = {
        "photometric": "rgb",
        "tile": (tile, tile),
        "compression": compression,
    }
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for k, level in enumerate(levels):
            extra: dict[str, Any] = {"subfiletype": 1} if k else {}
            if mpp is not None:
                ds = image.shape[1] / level.shape[1]
                extra["resolution"] = (1e4 / (mpp * ds), 1e4 / (mpp * ds))
                extra["resolutionunit"] = "CENTIMETER"
            tw.write(level, **options, **extra)
