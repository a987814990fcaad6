"""One H&E slide paired with its cells: the object every later step of the tile layer reads.

:class:`PairedSlide` pulls together, from a SpatialData object in the canonical layout
(``docs/INTERFACES.md``), what tiling and graph building need: a lazy pyramid reader over
``images["he_image"]`` (the same duck type as :class:`napari_sigmma.io.wsi.Slide`), the
slide's µm/px, the cell centroids in H&E level-0 pixels, and the counts.

Coordinate chain: cells are in µm; spatialdata-io maps µm to the ``global`` frame with
``Scale(1/pixel_size)``; the H&E image maps its level-0 pixels to ``global`` with an affine
``A``. Hence ``he_px = inv(A) @ (um / pixel_size)``. Readers that know the composite matrix
store it as ``table.uns["sigmma"]["um_to_he_px"]`` (3×3), which wins when present.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp

IMAGE_KEY = "he_image"
TABLE_KEY = "table"
CELL_SHAPES = ("cell_circles", "cell_boundaries", "nucleus_boundaries")


def _graph_source(arr: Any) -> Any:
    """The one array a dask array's graph reads from (a materialized single-key layer
    holding an object with ``shape``, ``dtype`` and slicing), or ``None``."""
    found = []
    for layer in getattr(getattr(arr, "dask", None), "layers", {}).values():
        if type(layer).__name__ != "MaterializedLayer" or len(layer) != 1:
            continue
        value = next(iter(layer.values()))
        if (
            all(hasattr(value, a) for a in ("shape", "dtype", "__getitem__"))
            and len(value.shape) == 3
        ):
            found.append(value)
    return found[0] if len(found) == 1 else None


class SdataImage:
    """Lazy pyramid reader over a multiscale SpatialData image (``DataTree``, ``(c, y, x)``).

    Exposes the :class:`napari_sigmma.io.wsi.Slide` duck type: ``levels`` (dask arrays
    ``(H, W, 3)`` uint8), ``mpp`` (µm/px of level 0), ``downsamples``, ``shape`` and
    ``read_region``.

    Parameters
    ----------
    image
        ``sdata.images[...]``: a multiscale ``DataTree`` or a single-scale ``DataArray``.
    mpp
        µm per level-0 pixel.
    """

    def __init__(self, image: Any, mpp: float, *, path: str | None = None) -> None:
        self.path = path
        self.mpp = float(mpp)
        arrays = []
        if hasattr(image, "children") and len(image.children):
            # DataTree: scale0, scale1, ... each holding one DataArray.
            names = sorted(image.children, key=lambda s: int(s.replace("scale", "") or 0))
            for name in names:
                node = image[name]
                var = next(iter(node.data_vars.values())) if hasattr(node, "data_vars") else node
                arrays.append(var)
        else:
            arrays.append(image)
        self.levels = [self._to_hwc(a) for a in arrays]
        h0, w0 = self.levels[0].shape[:2]
        self.shape = (int(h0), int(w0))
        # Mean of both axes, as io.wsi.Slide does (odd sizes round differently per axis).
        self.downsamples = [
            float((h0 / lvl.shape[0] + w0 / lvl.shape[1]) / 2) for lvl in self.levels
        ]
        self._memory: dict[int, np.ndarray] = {}
        self._direct: dict[int, Any] = {}

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.levels)

    def level_shape(self, level: int) -> tuple[int, int]:
        """``(H, W)`` of a level."""
        return int(self.levels[level].shape[0]), int(self.levels[level].shape[1])

    def thumbnail_level(self, min_side: int = 1024) -> int:
        """The coarsest level whose longer side is still at least ``min_side`` pixels."""
        from napari_sigmma.io.wsi import coarsest_level

        return coarsest_level([self.level_shape(k) for k in range(len(self.levels))], min_side)

    @staticmethod
    def _to_hwc(arr: Any) -> Any:
        import dask.array as da

        dims = tuple(getattr(arr, "dims", ("c", "y", "x")))
        data = getattr(arr, "data", arr)
        if not isinstance(data, da.Array):
            data = da.from_array(np.asarray(data), chunks=(-1, 1024, 1024))
        if dims == ("c", "y", "x"):
            data = data.transpose(1, 2, 0)
        elif dims != ("y", "x", "c"):
            raise SigmmaError(f"H&E image has dims {dims}; expected (c, y, x)")
        n_c = data.shape[2]
        if n_c == 1:
            data = da.concatenate([data] * 3, axis=2)
        elif n_c == 4:
            data = data[:, :, :3]
        elif n_c != 3:
            raise SigmmaError(f"H&E image has {n_c} channels; expected RGB")
        if data.dtype != np.uint8:
            data = da.clip(data, 0, 255).astype(np.uint8)
        return data

    def level_mpp(self, level: int) -> float:
        """µm per pixel of pyramid ``level``."""
        return self.mpp * self.downsamples[level]

    def best_level(self, target_mpp: float) -> int:
        """The coarsest level that is still at least as fine as ``target_mpp``.

        Reading from a finer level and shrinking keeps detail; when every level is coarser
        than the target, level 0 (the finest) is used and upsampled.
        """
        best = 0
        for i in range(len(self.levels)):
            if self.level_mpp(i) <= target_mpp * (1 + 1e-3):
                best = i
        return best

    def hold_level(self, level: int, max_bytes: int = 512 * 2**20) -> bool:
        """Load ``level`` into memory once (when small) so many reads skip dask overhead."""
        if level in self._memory:
            return True
        lvl = self.levels[level]
        if lvl.size > max_bytes:
            return False
        self._memory[level] = np.asarray(lvl.compute())
        return True

    def release(self, level: int | None = None) -> None:
        """Drop a level (default: all levels) held in memory by :meth:`hold_level`."""
        if level is None:
            self._memory.clear()
        else:
            self._memory.pop(level, None)

    def read_region(self, x: int, y: int, w: int, h: int, *, level: int = 0) -> np.ndarray:
        """Read ``(h, w, 3)`` uint8 at level coordinates; outside the image is white."""
        x, y, w, h = int(x), int(y), int(w), int(h)
        out = np.full((max(h, 0), max(w, 0), 3), 255, dtype=np.uint8)
        src = self._memory.get(level)
        lvl = self.levels[level] if src is None else src
        hh, ww = lvl.shape[:2]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, ww), min(y + h, hh)
        if x1 > x0 and y1 > y0:
            if src is not None:
                block = lvl[y0:y1, x0:x1]
            elif (direct := self._direct_reader(level)) is not None:
                block = direct(y0, y1, x0, x1)
            else:
                block = lvl[y0:y1, x0:x1].compute()
            out[y0 - y : y1 - y, x0 - x : x1 - x] = np.asarray(block)
        return out

    def _direct_reader(self, level: int) -> Any:
        """A reader of ``[y0:y1, x0:x1]`` that slices the level's source array (the zarr
        view of the TIFF) without dask, or ``None``.

        Every dask compute optimises the array's whole graph: on a 100k × 100k px level
        (38,416 chunks) that is ~20 ms per tile read, four times the decoding. The source
        array is found in the graph, and the reader is used only if it returns the same
        pixels as the dask array on two probe regions; otherwise reads stay with dask.
        """
        if level in self._direct:
            return self._direct[level]
        lvl = self.levels[level]
        reader = None
        src = _graph_source(lvl)
        hh, ww = lvl.shape[:2]
        if src is not None and src.dtype == np.uint8:
            if tuple(src.shape) == (hh, ww, 3):

                def reader(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
                    return np.asarray(src[y0:y1, x0:x1])

            elif tuple(src.shape) == (3, hh, ww):

                def reader(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
                    return np.moveaxis(np.asarray(src[:, y0:y1, x0:x1]), 0, -1)

        if reader is not None:
            n = 64
            probes = [(0, 0), (max(0, hh // 2 - n // 2), max(0, ww // 2 - n // 2))]
            for py, px in probes:
                box = (py, min(py + n, hh), px, min(px + n, ww))
                want = np.asarray(lvl[box[0] : box[1], box[2] : box[3]].compute())
                if not np.array_equal(reader(*box), want):
                    reader = None
                    break
        self._direct[level] = reader
        return reader

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """A small RGB view of the slide and its downsample factor from level 0."""
        for i in range(len(self.levels)):
            lvl = self.levels[i]
            if max(lvl.shape[:2]) <= max_side:
                return np.asarray(lvl.compute()), self.downsamples[i]
        lvl = self.levels[-1]
        step = math.ceil(max(lvl.shape[:2]) / max_side)
        return np.asarray(lvl[::step, ::step].compute()), self.downsamples[-1] * step


class ArrayImage(SdataImage):
    """The :class:`SdataImage` duck type over in-memory numpy arrays (no dask, no
    SpatialData): slides made in memory, e.g. by the synthetic generator for benchmarks.

    Parameters
    ----------
    levels
        ``(H, W, 3)`` uint8 array, or a list of them (level 0 first, each coarser).
    mpp
        µm per level-0 pixel.
    """

    def __init__(self, levels: Any, mpp: float, *, path: str | None = None) -> None:
        arrays = [levels] if isinstance(levels, np.ndarray) else list(levels)
        if not arrays:
            raise SigmmaError("an image needs at least one level")
        checked = []
        for a in arrays:
            a = np.asarray(a)
            if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
                raise SigmmaError(f"image levels must be (H, W, 3) uint8, got {a.shape} {a.dtype}")
            checked.append(a)
        self.path = path
        self.mpp = float(mpp)
        self.levels = checked
        h0, w0 = checked[0].shape[:2]
        self.shape = (int(h0), int(w0))
        self.downsamples = [float((h0 / a.shape[0] + w0 / a.shape[1]) / 2) for a in checked]
        self._memory = dict(enumerate(checked))  # always held: read_region slices directly
        self._direct = {}

    def hold_level(self, level: int, max_bytes: int = 512 * 2**20) -> bool:
        return True

    def release(self, level: int | None = None) -> None:
        """Nothing to release: the arrays are the image."""

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        for i, lvl in enumerate(self.levels):
            if max(lvl.shape[:2]) <= max_side:
                return lvl, self.downsamples[i]
        lvl = self.levels[-1]
        step = math.ceil(max(lvl.shape[:2]) / max_side)
        return lvl[::step, ::step], self.downsamples[-1] * step


@dataclass
class PairedSlide:
    """An H&E slide and its cells in one pixel frame (H&E level 0).

    Attributes
    ----------
    name
        Slide name (used in split files and caches).
    image
        Lazy pyramid reader (:class:`SdataImage`, the ``Slide`` duck type).
    he_mpp
        µm per H&E level-0 pixel.
    cells_px
        ``(N, 2)`` float64 cell centroids ``(x, y)`` in H&E level-0 pixels.
    counts
        ``(N, G)`` CSR raw counts (float32).
    genes
        Gene names (columns of ``counts``).
    cell_ids
        ``(N,)`` cell id strings.
    obs
        The table's ``obs`` (cell metadata, e.g. ``cell_type``).
    node_features
        ``(N, F)`` user-supplied node features (from ``obsm[node_obsm]``) or ``None``.
    um_to_he_px
        3×3 matrix mapping µm to H&E level-0 pixels.
    he_to_global
        3×3 matrix mapping H&E level-0 pixels to the ``global`` frame (for writing
        results back next to the original data).
    """

    name: str
    image: SdataImage
    he_mpp: float
    cells_px: np.ndarray
    counts: sp.csr_matrix
    genes: list[str]
    cell_ids: np.ndarray
    obs: pd.DataFrame
    node_features: np.ndarray | None = None
    um_to_he_px: np.ndarray = field(default_factory=lambda: np.eye(3))
    he_to_global: np.ndarray = field(default_factory=lambda: np.eye(3))
    source: str | None = None
    _hash: str | None = field(default=None, repr=False)

    @property
    def n_cells(self) -> int:
        return int(self.cells_px.shape[0])

    @classmethod
    def from_sdata(
        cls,
        sdata: Any,
        *,
        name: str | None = None,
        node_obsm: str | None = None,
        image_key: str = IMAGE_KEY,
        table_key: str = TABLE_KEY,
        he_mpp: float | None = None,
    ) -> PairedSlide:
        """Build the paired view of a canonical SpatialData object.

        Parameters
        ----------
        sdata
            SpatialData with ``images["he_image"]`` and (optionally) ``tables["table"]``.
        name
            Slide name; default the sdata path's stem or ``"slide"``.
        node_obsm
            Key of ``table.obsm`` holding precomputed node features (e.g. a Novae latent);
            ``None`` to compute PCA features later.
        he_mpp
            Override for the H&E µm/px (otherwise derived from the transforms).

        Raises
        ------
        SigmmaError
            When the image is missing, the table lacks centroids, or ``node_obsm`` is absent.
        """
        path = str(sdata.path) if getattr(sdata, "path", None) else None
        if image_key not in sdata.images:
            raise SigmmaError(
                f"no H&E image {image_key!r} in the SpatialData object "
                f"(images: {list(sdata.images)})",
                path=path,
            )
        img_el = sdata.images[image_key]
        he_to_global = _element_affine(img_el)
        table = sdata.tables.get(table_key) if hasattr(sdata, "tables") else None
        um_to_he, he_mpp = _he_frame(sdata, table, he_to_global, he_mpp, path)

        image = SdataImage(img_el, he_mpp, path=path)
        if name is None:
            from napari_sigmma.io import slide_name

            name = slide_name(path)

        cells_px, counts, genes, cell_ids, obs, feats = _table_cells(
            table, um_to_he, node_obsm, path
        )
        return cls(
            name=name,
            image=image,
            he_mpp=float(he_mpp),
            cells_px=np.ascontiguousarray(cells_px, dtype=np.float64),
            counts=counts,
            genes=genes,
            cell_ids=cell_ids,
            obs=obs,
            node_features=feats,
            um_to_he_px=um_to_he,
            he_to_global=he_to_global,
            source=path,
        )

    @classmethod
    def from_arrays(
        cls,
        image: Any,
        he_mpp: float,
        cells_px: np.ndarray,
        counts: Any,
        genes: list[str],
        *,
        name: str = "slide",
        cell_ids: np.ndarray | None = None,
        obs: pd.DataFrame | None = None,
        node_features: np.ndarray | None = None,
    ) -> PairedSlide:
        """A paired slide from in-memory arrays (no SpatialData, no dask).

        Parameters
        ----------
        image
            ``(H, W, 3)`` uint8 H&E (or a list of pyramid levels), or an :class:`ArrayImage`.
        he_mpp
            µm per H&E pixel.
        cells_px
            ``(N, 2)`` cell centroids ``(x, y)`` in H&E pixels.
        counts
            ``(N, G)`` counts (dense or sparse).
        genes
            ``G`` gene names.
        """
        import pandas as pd
        import scipy.sparse as sp

        img = image if isinstance(image, SdataImage) else ArrayImage(image, he_mpp)
        xy = np.ascontiguousarray(np.asarray(cells_px, dtype=np.float64).reshape(-1, 2))
        X = sp.csr_matrix(counts, dtype=np.float32)
        if X.shape[0] != xy.shape[0] or X.shape[1] != len(genes):
            raise SigmmaError(
                f"counts {X.shape} do not match {xy.shape[0]} cells × {len(genes)} genes"
            )
        n = xy.shape[0]
        ids = np.asarray([f"cell-{i}" for i in range(n)], dtype=object)
        return cls(
            name=str(name),
            image=img,
            he_mpp=float(he_mpp),
            cells_px=xy,
            counts=X,
            genes=[str(g) for g in genes],
            cell_ids=ids if cell_ids is None else np.asarray(cell_ids),
            obs=pd.DataFrame(index=pd.RangeIndex(n)) if obs is None else obs,
            node_features=node_features,
            um_to_he_px=np.diag([1.0 / he_mpp, 1.0 / he_mpp, 1.0]),
        )

    def content_hash(self) -> str:
        """A short hash of what the slide holds (image shape and thumbnail, cells, genes).

        Used to key caches (pre-extracted tiles, backbone features), so a cache is never
        reused for a different slide with the same name.
        """
        if self._hash is None:
            h = hashlib.sha1()
            head = (self.image.shape, len(self.image.levels), round(self.he_mpp, 6))
            h.update(repr(head).encode())
            coarsest = self.image.levels[-1]
            step = max(1, math.ceil(max(coarsest.shape[:2]) / 256))
            small = coarsest[::step, ::step]
            small = small.compute() if hasattr(small, "compute") else small  # dask or numpy
            h.update(np.ascontiguousarray(small).tobytes())
            h.update(np.round(self.cells_px, 3).tobytes())
            h.update("\n".join(self.genes).encode())
            if self.counts.shape[0]:
                h.update(np.asarray(self.counts.sum(axis=1)).astype(np.float64).tobytes())
            self._hash = h.hexdigest()[:16]
        return self._hash


def _element_affine(element: Any) -> np.ndarray:
    """3×3 matrix (x, y) of ``element``'s transformation to ``global`` (identity if none)."""
    from spatialdata.transformations import get_transformation

    try:
        t = get_transformation(element, to_coordinate_system="global")
    except Exception:
        t = None
    if t is None:
        return np.eye(3)
    m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), float)
    return m


def _um_to_global(sdata: Any, table: Any) -> np.ndarray:
    """µm → global: the transformation of the cell shapes the table annotates."""
    candidates: list[str] = []
    attrs = table.uns.get("spatialdata_attrs", {}) if hasattr(table, "uns") else {}
    region = attrs.get("region") if isinstance(attrs, dict) else None
    if isinstance(region, str):
        candidates.append(region)
    elif isinstance(region, list | tuple):
        candidates.extend(str(r) for r in region)
    candidates.extend(CELL_SHAPES)
    for key in candidates:
        if key in sdata.shapes:
            return _element_affine(sdata.shapes[key])
    sig = table.uns.get("sigmma", {})
    if isinstance(sig, dict) and sig.get("pixel_size"):
        s = 1.0 / float(sig["pixel_size"])
        return np.diag([s, s, 1.0])
    warnings.warn(
        "no cell shapes to read the µm→global transform from; assuming µm = global units",
        stacklevel=3,
    )
    return np.eye(3)


def _he_frame(
    sdata: Any, table: Any, he_to_global: np.ndarray, he_mpp: float | None, path: str | None
) -> tuple[np.ndarray, float]:
    """The µm → H&E px affine and the H&E µm/px of a SpatialData slide: from the table's
    ``uns["sigmma"]``, else its transforms, else ``attrs["sigmma"]``; ``he_mpp`` given wins."""
    um_to_he = None
    if table is not None:
        sig = table.uns.get("sigmma", {}) if hasattr(table, "uns") else {}
        if isinstance(sig, dict) and sig.get("um_to_he_px") is not None:
            um_to_he = np.asarray(sig["um_to_he_px"], dtype=np.float64).reshape(3, 3)
        else:
            um_to_global = _um_to_global(sdata, table)
            um_to_he = np.linalg.inv(he_to_global) @ um_to_global
        if he_mpp is None and isinstance(sig, dict) and sig.get("he_mpp"):
            he_mpp = float(sig["he_mpp"])
    attrs_sig = getattr(sdata, "attrs", {}).get("sigmma", {})
    if he_mpp is None and um_to_he is None and isinstance(attrs_sig, dict):
        if attrs_sig.get("he_mpp"):
            he_mpp = float(attrs_sig["he_mpp"])
    if he_mpp is None:
        if um_to_he is None:
            raise SigmmaError(
                "cannot tell the H&E µm/px without a cell table; pass he_mpp", path=path
            )
        he_mpp = 1.0 / math.sqrt(abs(np.linalg.det(um_to_he[:2, :2])))
    if um_to_he is None:
        um_to_he = np.diag([1.0 / he_mpp, 1.0 / he_mpp, 1.0])
    return um_to_he, he_mpp


def _table_cells(
    table: Any, um_to_he: np.ndarray, node_obsm: str | None, path: str | None
) -> tuple[np.ndarray, Any, list[str], np.ndarray, Any, np.ndarray | None]:
    """Cell centroids (H&E px), counts (CSR), genes, cell ids, obs and node features of the
    cell table (all empty without one)."""
    import scipy.sparse as sp

    if table is None:
        cells_px = np.zeros((0, 2))
        counts = sp.csr_matrix((0, 0), dtype=np.float32)
        genes: list[str] = []
        cell_ids = np.zeros(0, dtype=object)
        import pandas as pd

        obs = pd.DataFrame()
        feats = None
    else:
        if "spatial" not in table.obsm:
            raise SigmmaError("cell table has no obsm['spatial'] centroids (µm)", path=path)
        xy_um = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
        n = xy_um.shape[0]
        hom = np.c_[xy_um, np.ones(n)]
        cells_px = (hom @ um_to_he.T)[:, :2]
        X = table.X
        counts = sp.csr_matrix(X, dtype=np.float32) if X is not None else None
        if counts is None:
            raise SigmmaError("cell table has no counts matrix X", path=path)
        genes = [str(g) for g in table.var_names]
        obs = table.obs.copy()
        if "cell_id" in obs:
            cell_ids = obs["cell_id"].astype(str).to_numpy()
        else:
            cell_ids = np.asarray(table.obs_names.astype(str))
        feats = None
        if node_obsm is not None:
            if node_obsm not in table.obsm:
                raise SigmmaError(
                    f"node feature key {node_obsm!r} not in table.obsm (have: {list(table.obsm)})",
                    path=path,
                )
            feats = np.asarray(table.obsm[node_obsm], dtype=np.float32)
    return cells_px, counts, genes, cell_ids, obs, feats
