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

import numpy as np

from napari_sigmma.errors import SigmmaError

__all__ = [
    "DASK_CACHE_MAX_BYTES",
    "SYNTHETIC_SEED",
    "SYNTHETIC_SIZE",
    "bound_dask_cache",
    "embed_store_layers",
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
    from napari_sigmma.io.store import is_embed_sdata
    from napari_sigmma.viewer.layers import sdata_layers

    p = Path(path)
    sdata = load_any(p, cancel=cancel)
    check_cancel(cancel)
    if is_embed_sdata(sdata):  # a `napari-sigmma embed` store: tiles, cells, linked H&E
        layers = embed_store_layers(sdata, sdata_path=str(p), name_prefix=_display_name(p))
    else:
        layers = sdata_layers(sdata, sdata_path=str(p), name_prefix=_display_name(p))
    if _has_dask(layers):
        # lazy slides: keep napari's tile cache from growing to a quarter of the RAM
        bound_dask_cache()
    return layers


#: Clusters the embedding-store reader colours tiles and cells by (k-means, seed 0).
EMBED_CLUSTERS = 8


def embed_store_layers(
    sdata: Any,
    *,
    sdata_path: str | None = None,
    name_prefix: str = "",
    color_by: str | None = None,
    n_clusters: int = EMBED_CLUSTERS,
    max_points: int = 200_000,
    seed: int = 0,
) -> list[tuple[Any, dict[str, Any], str]]:
    """Layers of a ``napari-sigmma embed`` store: the linked H&E, tiles, cells.

    Tiles are squares (a points layer with square symbols a tile wide: fast at 100k+ tiles)
    and cells are points, both in H&E level-0 pixels scaled to µm like every layer of the
    plugin. Every ``obs`` column of the tile / cell table is a layer feature, plus
    ``cluster``: k-means (``n_clusters``, ``seed``) of the unit-length ``he_macro`` (tiles)
    or ``st_macro`` (cells) embeddings. Tiles are coloured by ``color_by`` (default
    ``cluster``), cells by ``color_by`` when they have it, else ``cell_type``, else
    ``cluster``; any other column is a ``layer.face_color = "<column>"`` away. With several
    slides in one store, the first slide's layers are visible and the others hidden.
    """
    from napari_sigmma.io.store import EMBED_TABLE_PREFIX, embed_tables, linked_he_image
    from napari_sigmma.viewer.layers import he_image_layer

    prefix = f"{name_prefix} " if name_prefix else ""
    layers: list[tuple[Any, dict[str, Any], str]] = []
    for k, key in enumerate(embed_tables(sdata)):
        suffix = key[len(EMBED_TABLE_PREFIX) :]
        table = sdata.tables[key]
        uns = dict(table.uns.get("sigmma") or {})
        mpp = float(uns.get("he_mpp") or 1.0)
        name = f"{prefix}{uns.get('slide', '')}{suffix}".strip() or "embeddings"
        notes: list[str] = []
        image, why = linked_he_image(sdata, key)
        if image is not None:
            from spatialdata import SpatialData

            view = SpatialData(images={"he_image": image})
            view.attrs["sigmma"] = {"he_mpp": mpp}
            data, kwargs, kind = he_image_layer(
                view, sdata_path=str(uns.get("source")), name=f"{name} H&E"
            )
            kwargs["visible"] = k == 0
            layers.append((data, kwargs, kind))
        elif why:
            notes.append(why)
        tiles = sdata.shapes.get(f"tiles{suffix}")
        if tiles is not None:
            b = np.asarray(tiles.geometry.bounds.to_numpy(), dtype=np.float64)  # x0 y0 x1 y1
            centres = np.c_[(b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2]
            side = float(np.median(b[:, 2] - b[:, 0])) if len(b) else 1.0
            feats = _obs_features(table, "he_macro", n_clusters, seed)
            meta = {"sdata_path": sdata_path, "element": f"tiles{suffix}", "table": key,
                    "he_mpp": mpp, "sigmma_kind": "embed_tiles"}  # fmt: skip
            if notes:
                meta["note"] = f"{name}: " + "; ".join(notes)
            layers.append(
                (
                    centres,
                    {
                        "name": f"{name} tiles",
                        "symbol": "square",
                        "size": side,
                        "scale": (mpp, mpp),
                        "translate": (0.0, 0.0),
                        "border_width": 0.0,
                        "opacity": 0.45,
                        "features": feats,
                        "face_color": _colour_column(feats, color_by, ()),
                        "face_color_cycle": _palette(),
                        "metadata": meta,
                        "visible": k == 0,
                    },
                    "points",
                )
            )
        ckey = f"cell_embeddings{suffix}"
        if ckey in sdata.tables:
            ctab = sdata.tables[ckey]
            xy = np.asarray(ctab.obsm["spatial"], dtype=np.float64)[:, :2]
            index = np.arange(len(xy))
            cmeta: dict[str, Any] = {"sdata_path": sdata_path, "element": f"cells{suffix}",
                                     "table": ckey, "he_mpp": mpp, "n_total": len(xy)}  # fmt: skip
            if len(xy) > max_points:
                rng = np.random.default_rng(seed)
                index = np.sort(rng.choice(len(xy), size=max_points, replace=False))
                cmeta["note"] = f"{name} cells: showing {len(index):,} of {len(xy):,}"
            cmeta.update({"n_shown": len(index), "obs_index": index})
            feats = _obs_features(ctab, "st_macro", n_clusters, seed).iloc[index]
            layers.append(
                (
                    xy[index][:, ::-1],
                    {
                        "name": f"{name} cells",
                        "size": 7.0 / mpp,
                        "scale": (mpp, mpp),
                        "translate": (0.0, 0.0),
                        "border_width": 0.0,
                        "opacity": 0.8,
                        "features": feats.reset_index(drop=True),
                        "face_color": _colour_column(feats, color_by, ("cell_type",)),
                        "face_color_cycle": _palette(),
                        "metadata": cmeta,
                        "visible": k == 0,
                    },
                    "points",
                )
            )
    if not layers:
        raise SigmmaError("nothing to show: the embedding store has no tiles", path=sdata_path)
    return layers


def _obs_features(table: Any, rep: str, n_clusters: int, seed: int) -> Any:
    """The table's obs columns (no ``region``) plus ``cluster`` of its ``rep`` embeddings."""
    import pandas as pd

    feats = table.obs.drop(columns=["region"], errors="ignore").reset_index(drop=True)
    labels = np.full(table.n_obs, -1, dtype=np.int64)
    if rep in table.obsm:
        x = np.asarray(table.obsm[rep], dtype=np.float32)
        ok = np.isfinite(x).all(axis=1) if x.ndim == 2 and x.shape[1] else np.zeros(0, bool)
        if ok.sum() >= 2:
            from sklearn.cluster import KMeans

            k = int(min(n_clusters, ok.sum()))
            labels[ok] = KMeans(k, n_init=3, random_state=seed).fit_predict(x[ok])
    feats["cluster"] = pd.Categorical(labels)
    return feats


def _palette() -> list[list[float]]:
    """The plugin's categorical palette (cluster i has one colour in every layer)."""
    from napari_sigmma.analysis.clusters import PALETTE

    return [[*map(float, rgb), 1.0] for rgb in PALETTE]


def _colour_column(feats: Any, color_by: str | None, preferred: tuple[str, ...]) -> str:
    if color_by and color_by in feats:
        return color_by
    return next((c for c in preferred if c in feats), "cluster")


def _display_name(path: Path) -> str:
    """``slide.ome.tif`` -> ``slide``, ``sample.zarr`` -> ``sample``, folders as named."""
    name = path.name
    from napari_sigmma.constants import SLIDE_SUFFIXES

    for suffix in (".ome.tiff", ".ome.tif", *SLIDE_SUFFIXES, ".zarr"):
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

    # napari's public call: without arguments it returns the cache as it is (creating it
    # at its default size, an empty cache, when none exists yet)
    cache = resize_dask_cache()
    if int(cache.cache.available_bytes) > max_bytes:
        cache = resize_dask_cache(int(max_bytes))
    return int(cache.cache.available_bytes)


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
    """Reader for whole-slide image files (``constants.SLIDE_SUFFIXES``: the TIFF family
    through tifffile, NDPI / MIRAX / SCN / BIF / VMS / DICOM / … through OpenSlide)."""
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
