"""npe2 hooks named in ``napari.yaml``: readers and sample data.

Readers return ``None`` for paths that are not theirs (so napari asks another plugin),
and a reader callable otherwise. A problem with the file itself (a
:class:`~napari_sigmma.errors.SigmmaError`) becomes an error notification naming the
file; the reader then returns napari's "nothing to add" value and the viewer carries on.
Notes about thinned layers are shown as info notifications.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_sigmma.errors import SigmmaError

__all__ = [
    "DASK_CACHE_MAX_BYTES",
    "SYNTHETIC_SEED",
    "SYNTHETIC_SIZE",
    "bound_dask_cache",
    "embedded_sample_data",
    "get_folder_reader",
    "get_slide_reader",
    "read_path",
    "synthetic_sample_data",
]

PathOrPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
ReaderFunction = Callable[[PathOrPaths], list[tuple[Any, ...]]]

#: The synthetic sample offered in File > Open Sample is small so it opens quickly.
SYNTHETIC_SIZE = 2048
SYNTHETIC_SEED = 0
#: Bound on napari's opportunistic dask cache once a lazy (dask) layer is opened. napari
#: sizes that cache at 25 % of the machine's RAM (``settings.application.dask.cache``);
#: panning over a whole slide fills it with decoded tiles, so RSS grows by gigabytes.
#: 512 MB still holds ~40 full-screen level-0 views for revisits.
DASK_CACHE_MAX_BYTES = 512 * 2**20
#: napari's "the file was read but there is nothing to add" value.
_NOTHING = [(None,)]


def _single(path: PathOrPaths) -> str | None:
    """The one path napari hands over, or ``None`` for a stack of several."""
    if isinstance(path, str | os.PathLike):
        return os.fspath(path)
    paths = list(path)
    return os.fspath(paths[0]) if len(paths) == 1 else None


def _notify(message: str, *, error: bool = False) -> None:
    from napari.utils.notifications import show_error, show_info

    (show_error if error else show_info)(message)


def layers_for(
    path: str | os.PathLike[str], *, cancel: Any = None
) -> list[tuple[Any, dict[str, Any], str]]:
    """Read ``path`` with :func:`napari_sigmma.io.load_any` and build its layers (may raise).

    ``cancel`` (Event or callable) is checked between the read and the layers: a cancelled
    read raises :class:`~napari_sigmma.errors.Cancelled`. When a layer is lazy (dask), napari's
    opportunistic dask cache is bounded (:func:`bound_dask_cache`).
    """
    from napari_sigmma.errors import check_cancel
    from napari_sigmma.io import load_any
    from napari_sigmma.viewer.layers import sdata_layers

    p = Path(path)
    sdata = load_any(p, cancel=cancel)
    check_cancel(cancel)
    layers = sdata_layers(sdata, sdata_path=str(p), name_prefix=_display_name(p))
    if _has_dask(layers):
        # lazy slides: keep napari's tile cache from growing to a quarter of the RAM
        bound_dask_cache()
    return layers


def _display_name(path: Path) -> str:
    """``slide.ome.tif`` -> ``slide``, ``sample.zarr`` -> ``sample``, folders as named."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".svs", ".ndpi", ".zarr"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def bound_dask_cache(max_bytes: int = DASK_CACHE_MAX_BYTES) -> int:
    """Shrink napari's global opportunistic dask cache to at most ``max_bytes``.

    A smaller cache (or a disabled one: size 0) is left alone. The napari setting itself is
    not changed (nothing is written to the user's settings file): changing the cache size
    in napari's preferences, or creating another viewer window, applies the setting again.

    Returns
    -------
    int
        The cache's size in bytes afterwards.
    """
    from napari.utils import resize_dask_cache
    from napari.utils._dask_utils import _DASK_CACHE

    current = int(_DASK_CACHE.cache.available_bytes)
    # 1 byte is napari's "not created yet" value: it would become 25 % of the RAM
    if current == 1 or current > max_bytes:
        resize_dask_cache(int(max_bytes))
    return int(_DASK_CACHE.cache.available_bytes)


def _has_dask(layers: list[tuple[Any, ...]]) -> bool:
    import dask

    for layer in layers:
        data = layer[0]
        items = data if isinstance(data, list | tuple) else [data]
        if any(dask.is_dask_collection(a) for a in items):
            return True
    return False


def read_path(path: PathOrPaths) -> list[tuple[Any, ...]]:
    """The reader napari calls: layers, or a notification when the file is bad."""
    from napari_sigmma.viewer.layers import layer_notes

    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    out: list[tuple[Any, ...]] = []
    for p in paths:
        try:
            layers = layers_for(p)
        except SigmmaError as err:
            _notify(f"napari-sigmma could not open it: {err}", error=True)
            continue
        for note in layer_notes(layers):
            _notify(note)
        out.extend(layers)
    return out or _NOTHING


def get_slide_reader(path: PathOrPaths) -> ReaderFunction | None:
    """Reader for whole-slide image files (``.svs``, ``.tif``, ``.ome.tif``, ``.ndpi``)."""
    from napari_sigmma.io.wsi import is_slide_file

    if isinstance(path, str | os.PathLike):
        paths = [os.fspath(path)]
    else:
        paths = [os.fspath(p) for p in path]
    if not paths or not all(is_slide_file(p) and not os.path.isdir(p) for p in paths):
        return None
    return read_path


def get_folder_reader(path: PathOrPaths) -> ReaderFunction | None:
    """Reader for a Xenium bundle, a HEST-1k folder or a SpatialData ``.zarr`` store.

    A ``.zarr`` folder that is not a SpatialData store is left to other readers.
    """
    from napari_sigmma.io import detect_kind
    from napari_sigmma.io.store import is_sdata_store

    single = _single(path)
    if single is None or not os.path.isdir(single):
        return None
    kind = detect_kind(single)
    if kind == "zarr" and not is_sdata_store(single):
        return None
    if kind in ("zarr", "xenium", "hest"):
        return read_path
    return None


# ----------------------------------------------------------------------------- samples


def embedded_sample_data() -> list[tuple[Any, ...]]:
    """File > Open Sample > embedded: the CMU-1 H&E with its simulated Xenium bundle."""
    from napari_sigmma.samples.embedded import embedded_sample

    return _sample_layers(embedded_sample())


def synthetic_sample_data() -> list[tuple[Any, ...]]:
    """File > Open Sample > synthetic: a small procedural paired sample, written once."""
    from napari_sigmma.samples.cmu import cache_root
    from napari_sigmma.samples.synthetic import write_synthetic_sample

    out = cache_root() / f"synthetic_{SYNTHETIC_SIZE}_seed{SYNTHETIC_SEED}"
    if not (out / "experiment.xenium").is_file():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        written = Path(write_synthetic_sample(partial, size=SYNTHETIC_SIZE, seed=SYNTHETIC_SEED))
        shutil.rmtree(out, ignore_errors=True)
        written.rename(out)
    return _sample_layers(out)


def _sample_layers(path: str | os.PathLike[str]) -> list[tuple[Any, ...]]:
    from napari_sigmma.viewer.layers import layer_notes

    layers = layers_for(path)
    for note in layer_notes(layers):
        _notify(note)
    return list(layers)
