"""SpatialData ``.zarr`` stores: write and read back, with errors that name the folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = [
    "EMBED_TABLE_PREFIX",
    "embed_tables",
    "is_embed_sdata",
    "is_sdata_store",
    "linked_he_image",
    "merge_stores",
    "prepare_target",
    "read_sdata",
    "swap_in",
    "write_sdata",
]

#: Top-level groups a SpatialData store may have.
ELEMENT_GROUPS = ("images", "labels", "points", "shapes", "tables")
#: Tables of tile embeddings in a ``napari-sigmma embed`` store: ``tile_embeddings`` (one
#: slide) or ``tile_embeddings_0``, ``_1``, … (a folder of slides).
EMBED_TABLE_PREFIX = "tile_embeddings"


def _root_attrs(path: Path) -> dict | None:
    """Attributes of the zarr group at ``path`` (v2 ``.zattrs`` or v3 ``zarr.json``)."""
    v3 = path / "zarr.json"
    if v3.is_file():
        try:
            meta = json.loads(v3.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("node_type") != "group":
            return None
        return dict(meta.get("attributes") or {})
    if (path / ".zgroup").is_file():
        attrs = path / ".zattrs"
        if not attrs.is_file():
            return {}
        try:
            return dict(json.loads(attrs.read_text()))
        except (OSError, ValueError):
            return None
    return None


def is_sdata_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a SpatialData zarr store (nothing is loaded)."""
    p = Path(path)
    if not p.is_dir():
        return False
    attrs = _root_attrs(p)
    if attrs is None:
        return False
    if "spatialdata_attrs" in attrs:
        return True
    # stores written before spatialdata recorded its version: recognise the element groups
    return any(_root_attrs(p / g) is not None for g in ELEMENT_GROUPS)


def _reads_from(sdata: SpatialData, store: Path) -> bool:
    """Whether some lazy element of ``sdata`` reads its data from inside ``store``."""
    from spatialdata import get_dask_backing_files

    root = store.resolve()
    files: set[str] = set()
    for _, _, element in sdata.gen_spatial_elements():
        try:
            files.update(get_dask_backing_files(element))
        except (AttributeError, TypeError):
            # spatialdata cannot follow every store (tifffile's); look for zarr roots itself
            files.update(_zarr_roots(element))
    for f in files:
        try:
            Path(f).resolve().relative_to(root)
        except ValueError:
            continue
        return True
    return False


def _zarr_roots(element: object) -> set[str]:
    from xarray import DataArray, DataTree

    arrays = []
    if isinstance(element, DataTree):
        arrays = [node[name].data for node in element.values() for name in node.data_vars]
    elif isinstance(element, DataArray):
        arrays = [element.data]
    roots: set[str] = set()
    for arr in arrays:
        for value in dict(getattr(arr, "dask", {})).values():
            store = getattr(value, "store", None)
            root = getattr(store, "root", None)
            if root is not None:
                roots.add(str(root))
    return roots


def write_sdata(
    sdata: SpatialData, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``sdata`` to a ``.zarr`` folder.

    Parameters
    ----------
    sdata
        What to write (lazy images are computed chunk by chunk while writing).
    path
        Target folder; must end in ``.zarr``.
    overwrite
        Replace an existing store. Only SpatialData stores are ever removed; another
        folder in the way is an error.

    Returns
    -------
    Path of the store.

    Raises
    ------
    SigmmaError
        Wrong suffix, target exists (without ``overwrite``) or is not a SpatialData store,
        or the store is the one ``sdata`` is read from.
    """
    p, tmp = prepare_target(path, overwrite=overwrite)
    if p.exists() and _reads_from(sdata, p):
        raise SigmmaError(
            "cannot overwrite the store the data is being read from; write elsewhere", path=p
        )
    try:
        sdata.write(tmp)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SigmmaError(f"could not write the SpatialData store ({err})", path=p) from err
    swap_in(tmp, p)
    sdata.path = p
    return p


def prepare_target(path: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[Path, Path]:
    """Check that a SpatialData store may be written at ``path``; returns it and an empty
    temporary path beside it to write into first (then :func:`swap_in`).

    Raises
    ------
    SigmmaError
        Wrong suffix, target exists (without ``overwrite``) or is not a SpatialData store.
    """
    p = Path(path)
    if p.suffix != ".zarr":
        raise SigmmaError("a SpatialData store's name must end in .zarr", path=p)
    if p.exists():
        if not overwrite:
            raise SigmmaError("already exists; pass overwrite=True to replace it", path=p)
        if not is_sdata_store(p):
            raise SigmmaError(
                "exists and is not a SpatialData store; refusing to overwrite it", path=p
            )
    tmp = p.with_name(f".{p.stem}.partial.zarr")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    except OSError as err:
        raise SigmmaError(f"cannot write here ({err.strerror or err})", path=p) from err
    return p, tmp


def swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the complete store ``tmp``: only now is an old store removed, so
    a failed or cancelled write leaves it as it was."""
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def merge_stores(
    parts: list[str | os.PathLike[str]], path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Merge SpatialData stores with distinct element names into one, by moving folders.

    No element is loaded: each part's element folders (``shapes/tiles_0``,
    ``tables/tile_embeddings_0``, …) are moved into the new store and its metadata is
    consolidated again, so merging the embeddings of many large slides costs no memory.
    The parts are consumed (moved); on failure the target is untouched.

    Raises
    ------
    SigmmaError
        A part that is not a SpatialData store, two parts with an element of the same
        name, or a bad target (see :func:`prepare_target`).
    """
    import warnings

    import zarr

    p, tmp = prepare_target(path, overwrite=overwrite)
    srcs = [Path(q) for q in parts]
    for q in srcs:
        if not is_sdata_store(q):
            raise SigmmaError("not a SpatialData store", path=q)
    if not srcs:
        raise SigmmaError("nothing to merge", path=p)
    try:
        shutil.move(srcs[0], tmp)
        root = zarr.open_group(str(tmp), mode="r+", use_consolidated=False)
        for q in srcs[1:]:
            for group in ELEMENT_GROUPS:
                if not (q / group).is_dir():
                    continue
                root.require_group(group)
                for child in sorted((q / group).iterdir()):
                    if not child.is_dir():
                        continue
                    dest = tmp / group / child.name
                    if dest.exists():
                        raise SigmmaError(f"element {group}/{child.name} is in two parts", path=q)
                    shutil.move(child, dest)
            shutil.rmtree(q)  # what is left is the part's empty groups and root metadata
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
            zarr.consolidate_metadata(str(tmp))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise SigmmaError(f"could not merge the stores ({err})", path=p) from err
        raise
    swap_in(tmp, p)
    return p


def read_sdata(path: str | os.PathLike[str]) -> SpatialData:
    """Read a SpatialData ``.zarr`` store (images stay lazy).

    Raises
    ------
    SigmmaError
        Missing path, not a folder, or not a SpatialData store.
    """
    import spatialdata

    p = Path(path)
    if not p.exists():
        raise SigmmaError("not found", path=p)
    if not p.is_dir():
        raise SigmmaError("not a folder (a SpatialData .zarr store was expected)", path=p)
    if not is_sdata_store(p):
        raise SigmmaError(
            "not a SpatialData store (no zarr group with images/, shapes/, tables/, ...)",
            path=p,
        )
    try:
        sdata = spatialdata.read_zarr(p)
    except Exception as err:
        raise SigmmaError(f"could not read the SpatialData store ({err})", path=p) from err
    return sdata


# ----------------------------------------------------------------------------- embed stores


def embed_tables(sdata: SpatialData) -> list[str]:
    """Names of the tile-embedding tables of a ``napari-sigmma embed`` store, sorted."""
    return sorted(k for k in sdata.tables if str(k).startswith(EMBED_TABLE_PREFIX))


def is_embed_sdata(sdata: SpatialData) -> bool:
    """Whether ``sdata`` is what ``napari-sigmma embed`` writes (tile embeddings, no H&E
    image and no cell table of its own)."""
    return bool(embed_tables(sdata)) and "table" not in sdata.tables


def linked_he_image(sdata: SpatialData, table: str | None = None) -> tuple[object | None, str]:
    """The H&E an embedding store was made from, opened lazily from the path it records.

    The store links the H&E rather than including it: a slide is gigabytes and the
    embeddings megabytes, and the H&E is already on disk beside its Xenium / HEST / slide
    data. ``uns["sigmma"]["source"]`` of the tile table is the data path the embeddings
    were made from (absolute); the H&E is its ``*he_image.ome.tif`` (Xenium), ``wsis/<id>``
    slide (HEST-1k), the slide file itself, or the ``he_image`` of a ``.zarr`` store. It is
    given the store's own H&E-pixel → ``global`` transformation
    (``uns["sigmma"]["he_to_global"]``), so the tiles and cells overlay it.

    Parameters
    ----------
    sdata
        An embedding store (see :func:`is_embed_sdata`).
    table
        Which tile-embedding table's source (default: the first).

    Returns
    -------
    (element, note)
        A multiscale image element and ``""``, or ``None`` and a sentence saying why
        (no source recorded, the source moved, no H&E in it).
    """
    import numpy as np
    from spatialdata.transformations import Affine, set_transformation

    tables = embed_tables(sdata)
    key = table or (tables[0] if tables else None)
    if key is None or key not in sdata.tables:
        return None, "not an embedding store"
    uns = sdata.tables[key].uns.get("sigmma") or {}
    source = uns.get("source")
    if not source:
        return None, "the store records no source data, so no H&E is shown"
    src = Path(str(source))
    if not src.exists():
        return None, f"the H&E it was made from is no longer at {src}: tiles shown without it"
    he_to_global = uns.get("he_to_global")
    matrix = np.asarray(he_to_global if he_to_global is not None else np.eye(3), float)
    transform = Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))
    try:
        element = _he_element(src, uns, transform)
    except SigmmaError as err:
        return None, f"the H&E could not be opened ({err})"
    if element is None:
        return None, f"no H&E image in {src}"
    set_transformation(element, {"global": transform}, set_all=True)
    return element, ""


def _he_element(src: Path, uns: dict, transform: object) -> object | None:
    from napari_sigmma.io import detect_kind
    from napari_sigmma.io.wsi import open_slide, slide_image_element

    kind = detect_kind(src)
    if kind == "zarr":
        import spatialdata

        images = spatialdata.read_zarr(src, selection=("images",)).images
        return images.get("he_image")
    he_file: Path | None = None
    if kind == "slide":
        he_file = src
    elif kind == "xenium":
        from napari_sigmma.io.xenium_format import HE_IMAGE_SUFFIX

        found = sorted(p for p in src.glob(f"*{HE_IMAGE_SUFFIX}") if not p.name.startswith("._"))
        he_file = found[0] if found else None
    elif kind == "hest":
        from napari_sigmma.io.hest import WSI_DIR, find_hest_samples

        ids = find_hest_samples(src)
        want = str(uns.get("sample_id") or uns.get("slide") or "")
        sample = want if want in ids else (ids[0] if len(ids) == 1 else None)
        if sample is not None:
            he_file = next(
                (f for f in sorted((src / WSI_DIR).iterdir()) if f.name.startswith(sample + ".")),
                None,
            )
    if he_file is None:
        return None
    return slide_image_element(open_slide(he_file), transform)
