"""SpatialData -> napari layer data, as pure functions (no viewer needed).

Every layer lives in the H&E's physical frame: world coordinates are µm of the H&E
(H&E level-0 pixels × ``he_mpp``). Layer *data* are H&E level-0 pixels, ``(y, x)``, and
the layer's ``scale`` is ``(he_mpp, he_mpp)``, so ``layer.data`` indexes the slide
directly while rulers and the scale bar show µm.

Layer metadata carries the link back to the data: ``{"sdata_path", "element", "he_mpp"}``
plus, for thinned layers, ``"note"``, ``"n_total"``, ``"n_shown"`` and ``"obs_index"``
(rows of the table / shapes element that are shown).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = [
    "LayerData",
    "boundaries_layer",
    "cells_layer",
    "element_to_he_px",
    "he_image_layer",
    "he_mpp_of",
    "layer_notes",
    "sdata_layers",
    "um_to_he_px",
]

LayerData = tuple[Any, dict[str, Any], str]

#: Default caps: more points / polygons than this make napari slow to build and to pan.
MAX_POINTS = 200_000
MAX_SHAPES = 5_000
#: Point size (diameter) and polygon edge width, µm. Points are smaller than a nucleus
#: (~7 µm) so that the H&E under them stays readable at working zoom.
POINT_SIZE_UM = 3.5
EDGE_WIDTH_UM = 0.6
HE_IMAGE = "he_image"
TABLE = "table"


# ----------------------------------------------------------------------------- frames


def _affine(element: Any) -> np.ndarray:
    """3x3 matrix (x, y) of an element's transformation to ``"global"``."""
    from spatialdata.transformations import get_transformation

    try:
        t = get_transformation(element, to_coordinate_system="global")
    except Exception as err:  # no "global" system
        raise SigmmaError(f"element has no transformation to 'global' ({err})") from err
    return np.asarray(
        t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64
    )


def _sigmma_uns(sdata: SpatialData, table_key: str = TABLE) -> dict[str, Any]:
    if table_key in sdata.tables:
        uns = sdata.tables[table_key].uns.get("sigmma")
        if isinstance(uns, dict):
            return uns
    return {}


def he_mpp_of(sdata: SpatialData, *, image_key: str = HE_IMAGE) -> float | None:
    """µm per H&E level-0 pixel: ``table.uns["sigmma"]["he_mpp"]``, then
    ``sdata.attrs["sigmma"]["he_mpp"]``, then the image's transformation when ``global``
    is in µm (a slide read alone). ``None`` when unknown."""
    uns = _sigmma_uns(sdata)
    if "he_mpp" in uns:
        return float(uns["he_mpp"])
    attrs = getattr(sdata, "attrs", {}) or {}
    if isinstance(attrs.get("sigmma"), dict) and "he_mpp" in attrs["sigmma"]:
        return float(attrs["sigmma"]["he_mpp"])
    if image_key in sdata.images and not sdata.tables:
        a = _affine(sdata.images[image_key])
        sx, sy = np.hypot(a[0, 0], a[1, 0]), np.hypot(a[0, 1], a[1, 1])
        if abs(a[0, 1]) < 1e-9 and abs(a[1, 0]) < 1e-9 and np.isclose(sx, sy, rtol=1e-3):
            return float(sx)
    return None


def element_to_he_px(sdata: SpatialData, element: str, *, image_key: str = HE_IMAGE) -> np.ndarray:
    """3x3 matrix mapping an element's own (x, y) coordinates to H&E level-0 pixels:
    ``inv(A_image) @ A_element`` through the ``"global"`` system."""
    if image_key not in sdata.images:
        raise SigmmaError(f"no {image_key!r} image to place {element!r} on")
    target = sdata[element]
    return np.linalg.inv(_affine(sdata.images[image_key])) @ _affine(target)


def um_to_he_px(sdata: SpatialData, *, table_key: str = TABLE) -> np.ndarray:
    """3x3 matrix mapping µm (table ``obsm["spatial"]``) to H&E level-0 pixels.

    ``table.uns["sigmma"]["um_to_he_px"]`` when the reader set it, else derived from the
    transformations of the µm elements (``cell_circles`` / ``cell_boundaries``)."""
    uns = _sigmma_uns(sdata, table_key)
    if "um_to_he_px" in uns:
        m = np.asarray(uns["um_to_he_px"], dtype=np.float64)
        if m.shape == (3, 3):
            return m
    for name in ("cell_circles", "cell_boundaries", "nucleus_boundaries"):
        if name in sdata.shapes:
            return element_to_he_px(sdata, name)
    raise SigmmaError("cannot place the cells on the H&E: no um_to_he_px and no cell shapes")


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


def _only_var(node: Any) -> Any:
    """The one image variable of a multiscale level (``"image"`` by convention)."""
    if "image" in node.data_vars:
        return node["image"]
    return next(iter(node.data_vars.values()))


def _base_meta(sdata_path: str | os.PathLike[str] | None, element: str, mpp: float) -> dict:
    return {
        "sdata_path": None if sdata_path is None else os.fspath(sdata_path),
        "element": element,
        "he_mpp": mpp,
    }


def _units(note: str | None) -> tuple[str, str]:
    """Layer units: µm when the H&E pixel size is known (``note`` is None), else pixels
    (the scale bar and the status bar then say which)."""
    return ("pixel", "pixel") if note else ("um", "um")


def _resolve_mpp(sdata: SpatialData) -> tuple[float, str | None]:
    mpp = he_mpp_of(sdata)
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        return 1.0, "the H&E pixel size is unknown: layers are in pixels, not µm"
    return mpp, None


# ----------------------------------------------------------------------------- layers


def he_image_layer(
    sdata: SpatialData,
    *,
    image_key: str = HE_IMAGE,
    sdata_path: str | os.PathLike[str] | None = None,
    name: str = "H&E",
) -> LayerData:
    """The H&E as a (multiscale) RGB image layer, lazily, scaled to µm."""
    if image_key not in sdata.images:
        raise SigmmaError(f"the data has no {image_key!r} image")
    element = sdata.images[image_key]
    mpp, note = _resolve_mpp(sdata)
    from xarray import DataTree

    if isinstance(element, DataTree):
        levels = [_only_var(element[k]).data.transpose(1, 2, 0) for k in element]
        data: Any = levels if len(levels) > 1 else levels[0]
        multiscale = len(levels) > 1
    else:
        levels = [element.data.transpose(1, 2, 0)]
        data, multiscale = levels[0], False
    channels = int(levels[0].shape[-1])
    meta = _base_meta(sdata_path, image_key, mpp)
    if note:
        meta["note"] = note
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": (mpp, mpp),
        "translate": (0.0, 0.0),
        "units": _units(note),
        "multiscale": multiscale,
        "metadata": meta,
    }
    if channels in (3, 4) and levels[0].dtype == np.uint8:
        kwargs["rgb"] = True
        kwargs["contrast_limits"] = (0, 255)
    else:  # not RGB: show the channels as they come
        kwargs["rgb"] = False
    return data, kwargs, "image"


def cells_layer(
    sdata: SpatialData,
    *,
    table_key: str = TABLE,
    sdata_path: str | os.PathLike[str] | None = None,
    max_points: int | None = None,
    name: str = "cells",
    seed: int = 0,
) -> LayerData | None:
    """Cell centroids as points (``None`` when there is no table); at most
    ``max_points`` (default :data:`MAX_POINTS`), a random subset beyond."""
    max_points = MAX_POINTS if max_points is None else int(max_points)
    if table_key not in sdata.tables:
        return None
    table = sdata.tables[table_key]
    if "spatial" not in table.obsm:
        raise SigmmaError(f"table {table_key!r} has no obsm['spatial'] (cell centroids)")
    mpp, note = _resolve_mpp(sdata)
    xy_um = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
    xy_px = _apply(um_to_he_px(sdata, table_key=table_key), xy_um)
    n = len(xy_px)
    index = np.arange(n)
    notes = [note] if note else []
    if n > max_points:
        rng = np.random.default_rng(seed)
        index = np.sort(rng.choice(n, size=max_points, replace=False))
        notes.append(
            f"{name}: showing {len(index):,} of {n:,} cells (a random subset; every cell is "
            "in the data)"
        )
    obs = table.obs.iloc[index]
    features: dict[str, Any] = {
        "cell_id": obs["cell_id"].astype(str).to_numpy()
        if "cell_id" in obs
        else obs.index.astype(str).to_numpy()
    }
    for col in ("cell_type", "transcript_counts", "cell_area"):
        if col in obs:
            features[col] = obs[col].to_numpy()
    meta = _base_meta(sdata_path, table_key, mpp)
    meta.update({"n_total": n, "n_shown": len(index), "obs_index": index})
    if notes:
        meta["note"] = "; ".join(notes)
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": (mpp, mpp),
        "translate": (0.0, 0.0),
        "units": _units(note),
        "size": POINT_SIZE_UM / mpp,
        "border_width": 0.0,
        "features": features,
        "metadata": meta,
        "opacity": 0.85,
    }
    if "cell_type" in features:
        # one distinct colour per cell type (Glasbey), listed with its count in the legend
        from napari_sigmma.viewer.palette import categorical, category_colours, to_hex

        names, codes, counts = categorical(features["cell_type"])
        rgb = category_colours(len(names))
        kwargs["face_color"] = np.c_[rgb[codes], np.ones(len(codes))].astype(np.float32)
        meta["legend"] = {
            "title": "cell types",
            "column": "cell_type",
            "names": names,
            "colours": [to_hex(c) for c in rgb],
            "counts": [int(c) for c in counts],
        }
    else:
        kwargs["face_color"] = "#39d353"
    data = xy_px[index][:, ::-1].astype(np.float64)  # napari: (y, x)
    return data, kwargs, "points"


def boundaries_layer(
    sdata: SpatialData,
    *,
    key: str = "cell_boundaries",
    sdata_path: str | os.PathLike[str] | None = None,
    max_shapes: int | None = None,
    name: str | None = None,
    edge_color: str = "#ffd400",
) -> LayerData | None:
    """Polygons of a shapes element as a shapes layer (``None`` if absent or empty).

    Over ``max_shapes`` polygons, the ones nearest the middle of the tissue are kept (a
    compact patch reads better than a random sprinkle of outlines). Default cap
    :data:`MAX_SHAPES`."""
    max_shapes = MAX_SHAPES if max_shapes is None else int(max_shapes)
    if key not in sdata.shapes:
        return None
    gdf = sdata.shapes[key]
    geoms = gdf.geometry.to_numpy()
    keep = np.array(
        [
            g is not None and not g.is_empty and g.geom_type in ("Polygon", "MultiPolygon")
            for g in geoms
        ],
        dtype=bool,
    )
    if not keep.any():
        return None
    import shapely

    mpp, note = _resolve_mpp(sdata)
    m = element_to_he_px(sdata, key)
    index = np.flatnonzero(keep)
    n = len(index)
    notes = [note] if note else []
    label = name or key.replace("_", " ")
    if n > max_shapes:
        centres = shapely.get_coordinates(shapely.centroid(geoms[index]))
        middle = np.median(centres, axis=0)
        nearest = np.argsort(np.hypot(*(centres - middle).T), kind="stable")[:max_shapes]
        index = np.sort(index[nearest])
        notes.append(
            f"{label}: showing {len(index):,} of {n:,} outlines (those nearest the middle "
            "of the tissue; every outline is in the data)"
        )
    chosen = [
        max(g.geoms, key=lambda p: p.area) if g.geom_type == "MultiPolygon" else g
        for g in geoms[index]
    ]
    rings = shapely.get_exterior_ring(np.asarray(chosen, dtype=object))
    coords, owner = shapely.get_coordinates(rings, return_index=True)
    coords = _apply(m, coords)[:, ::-1]
    ends = np.cumsum(np.bincount(owner, minlength=len(chosen)))
    # shapely rings are closed: drop each ring's repeated last vertex
    polys = [coords[a : b - 1] for a, b in zip(np.r_[0, ends[:-1]], ends, strict=True)]
    meta = _base_meta(sdata_path, key, mpp)
    meta.update({"n_total": n, "n_shown": len(index), "obs_index": index})
    if notes:
        meta["note"] = "; ".join(notes)
    kwargs: dict[str, Any] = {
        "name": label,
        "scale": (mpp, mpp),
        "translate": (0.0, 0.0),
        "units": _units(note),
        "shape_type": "polygon",
        "edge_color": edge_color,
        "face_color": "transparent",
        "edge_width": EDGE_WIDTH_UM / mpp,
        "metadata": meta,
    }
    if len(gdf.index):
        kwargs["features"] = {"cell_id": gdf.index.astype(str).to_numpy()[index]}
    return polys, kwargs, "shapes"


def sdata_layers(
    sdata: SpatialData,
    *,
    sdata_path: str | os.PathLike[str] | None = None,
    name_prefix: str = "",
    max_points: int | None = None,
    max_shapes: int | None = None,
    nuclei: bool = False,
) -> list[LayerData]:
    """All the layers for a canonical SpatialData: H&E, cell boundaries (and nuclei if
    asked), cells. Elements that are absent are skipped."""
    prefix = f"{name_prefix} " if name_prefix else ""
    layers: list[LayerData] = []
    if HE_IMAGE in sdata.images:
        layers.append(he_image_layer(sdata, sdata_path=sdata_path, name=f"{prefix}H&E"))
    keys = ["cell_boundaries"] + (["nucleus_boundaries"] if nuclei else [])
    for key, colour in zip(keys, ("#ffd400", "#00e5ff"), strict=False):
        layer = boundaries_layer(
            sdata,
            key=key,
            sdata_path=sdata_path,
            max_shapes=max_shapes,
            name=f"{prefix}{key.replace('_', ' ')}",
            edge_color=colour,
        )
        if layer is not None:
            layers.append(layer)
    cells = cells_layer(sdata, sdata_path=sdata_path, max_points=max_points, name=f"{prefix}cells")
    if cells is not None:
        layers.append(cells)
    if not layers:
        raise SigmmaError("nothing to show: no he_image, cell table or boundaries", path=sdata_path)
    return layers


def layer_notes(layers: list[LayerData]) -> list[str]:
    """The notes (thinning, unknown pixel size) of a list of layer data, deduplicated."""
    notes: list[str] = []
    for layer in layers:
        if len(layer) > 1:
            note = layer[1].get("metadata", {}).get("note")
            if note and note not in notes:
                notes.append(note)
    return notes
