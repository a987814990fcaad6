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
    "is_sdata_store",
    "merge_stores",
    "prepare_target",
    "read_sdata",
    "swap_in",
    "write_sdata",
]

#: Top-level groups a SpatialData store may have.
ELEMENT_GROUPS = ("images", "labels", "points", "shapes", "tables")


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
