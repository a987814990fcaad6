"""The embedding engine behind the live viewer (no Qt): batches, device, caches.

:class:`EmbeddingEngine` turns tile ids of one slide into :class:`TileResult` objects:

1. tiles already encoded come from the memory LRU, then from the disk cache (``.npz`` per
   tile under ``<cache>/<slide key>/<checkpoint hash>/``), with no model call;
2. the others are encoded in batches: the tiles' images are read and their cell graphs
   built, then *one* backbone forward takes all ``21 × B`` crops of the batch (the last
   block's attention is captured in that same forward for ViTs), the image heads and
   per-crop projections follow, and one graph-encoder forward takes the batch's graphs;
3. every new result is written through to both caches and yielded per batch, so a caller
   (the viewer's worker thread) can show results as they come and stop between batches.

The model runs under :func:`napari_sigmma.device.autocast` (bf16 on CUDA) and in
``inference_mode``; results are float32 numpy arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.analysis.clusters import ClusterSet, fit_clusters  # re-exported
from napari_sigmma.constants import CROP_SLICES, SCALES
from napari_sigmma.errors import CancelLike, SigmmaError, is_cancelled
from napari_sigmma.live.cache import (
    DiskCache,
    MemoryLRU,
    TileResult,
    default_cache_root,
    iter_chunks,
)
from napari_sigmma.live.visible import clip_box, visible_indices, visible_tiles

if TYPE_CHECKING:
    import torch

    from napari_sigmma.analysis.genehead import GeneHead
    from napari_sigmma.tiles.dataset import GraphSettings
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.graphs import TileCells
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide

__all__ = [
    "ClusterSet",
    "EmbeddingEngine",
    "TileResult",
    "clip_box",
    "file_hash",
    "fit_clusters",
    "model_hash",
    "visible_indices",
    "visible_tiles",
]


def file_hash(path: str | os.PathLike[str], *, length: int = 16) -> str:
    """SHA-1 of a file's bytes (e.g. a checkpoint), shortened."""
    h = hashlib.sha1()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    except OSError as err:
        raise SigmmaError(f"cannot read checkpoint: {err}", path=path) from err
    return h.hexdigest()[:length]


def model_hash(model: Any, *, length: int = 16) -> str:
    """SHA-1 of a model's state dict (names, shapes and values), shortened."""
    import torch

    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        arr = t.detach().cpu().contiguous()
        h.update(f"{tuple(arr.shape)}{arr.dtype}".encode())
        h.update(arr.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]


@dataclass
class PreparedBatch:
    """A batch ready for the model: grid indices, uint8 images and the cell graphs."""

    indices: list[int]
    images: np.ndarray  # (B, S, S, 3) uint8
    cells: list[TileCells]  # per tile, from the one tile-graph builder
    graph: Any | None  # PyG Batch of the tiles with enough cells
    graph_tiles: list[int]  # positions (in ``indices``) of the tiles in ``graph``
    seconds: float = 0.0


@dataclass
class EngineStats:
    """Counters a caller (or a test) can read."""

    forward_batches: int = 0
    encoded_tiles: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    prepare_seconds: float = 0.0
    forward_seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class EmbeddingEngine:
    """Encode the tiles of one slide with a SIGMMA model, with memory and disk caches.

    Parameters
    ----------
    model
        A :class:`~napari_sigmma.models.sigmma.SigmmaModel` (moved to ``device``, eval mode).
    paired, grid
        The slide and its tile grid.
    featurizer
        Node-feature transform the model was trained with (saved with the run); required
        for the graph side (``None``: image side only).
    graph_settings
        How tile cell graphs are built (as in training).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, … or a ``torch.device``.
    cache_dir
        Root of the disk cache (``None``: memory only). See
        :func:`napari_sigmma.live.cache.default_cache_root`.
    checkpoint_hash
        Identifies the weights in cache keys (default: a hash of the model's state dict).
    batch_size
        Tiles per forward (``21 × batch_size`` backbone inputs).
    memory_items, memory_bytes
        Bounds of the in-memory LRU.
    gene_head
        Ridge head for predicted genes (optional).
    attention
        Capture the last block's attention (ViT backbones).
    run
        Run folder / checkpoint path, recorded as provenance in layer metadata.
    edge_mode, edge_samples
        How the edge sampler builds the graphs
        (:func:`napari_sigmma.models.edges.set_edge_mode`; None = the model's mode, by
        default ``expected``). Set on the model (shared by engines of the same model) and
        part of the cache keys; change it later with :meth:`set_edge_mode`.
    """

    def __init__(
        self,
        model: Any,
        paired: PairedSlide,
        grid: TileGrid,
        *,
        featurizer: NodeFeaturizer | None = None,
        graph_settings: GraphSettings | None = None,
        device: Any = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        checkpoint_hash: str | None = None,
        batch_size: int = 4,
        memory_items: int = 4096,
        memory_bytes: int = 512 * 2**20,
        gene_head: GeneHead | None = None,
        attention: bool = True,
        run: str = "",
        edge_mode: str | None = None,
        edge_samples: int = 8,
    ) -> None:
        import torch

        from napari_sigmma.device import resolve_device
        from napari_sigmma.models.edges import set_edge_mode
        from napari_sigmma.tiles.dataset import GraphSettings

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = model.to(self.device).eval()
        if edge_mode is not None:
            set_edge_mode(self.model, edge_mode, n_samples=edge_samples)
        self._cache_dir = cache_dir
        self._memory_bounds = (memory_items, memory_bytes)
        self.paired = paired
        self.grid = grid
        self.featurizer = featurizer
        self.graph_settings = graph_settings or GraphSettings()
        self.batch_size = max(1, int(batch_size))
        self.gene_head = gene_head
        self.attention = bool(attention) and self.is_vit
        self.run = str(run)
        self.checkpoint_hash = checkpoint_hash or model_hash(model)
        self.slide_key = f"{paired.name}-{self._slide_hash()}"
        self.memory = MemoryLRU(memory_items, memory_bytes)
        self.disk = (
            DiskCache(cache_dir, self.slide_key, self.checkpoint_hash) if cache_dir else None
        )
        self.stats = EngineStats()
        self._index = {t: i for i, t in enumerate(grid.tile_ids)}
        self._lock = threading.RLock()
        self._node_x: np.ndarray | None = None
        self._counts = None
        self._per_tile: list[np.ndarray] | None = None

    # -- identity -------------------------------------------------------------------------
    @property
    def backbone(self) -> Any:
        return self.model.backbone

    @property
    def edge_mode(self) -> dict[str, Any] | None:
        """The model's edge-sampler evaluation settings (``None``: no cell graph)."""
        from napari_sigmma.models.edges import get_edge_mode

        return get_edge_mode(self.model)

    def set_edge_mode(self, mode: str, *, n_samples: int = 8, rate: float | None = None) -> None:
        """Switch the edge sampler's evaluation mode; results cached under the former mode
        are no longer served (the cache keys include it)."""
        from napari_sigmma.models.edges import set_edge_mode

        with self._lock:
            set_edge_mode(self.model, mode, n_samples=n_samples, rate=rate)
            self.slide_key = f"{self.paired.name}-{self._slide_hash()}"
            self.memory = MemoryLRU(*self._memory_bounds)
            if self._cache_dir:
                self.disk = DiskCache(self._cache_dir, self.slide_key, self.checkpoint_hash)

    @property
    def is_vit(self) -> bool:
        return bool(getattr(self.model.backbone, "is_vit", False))

    @property
    def uses_graph(self) -> bool:
        return self.featurizer is not None and bool(getattr(self.model.cfg, "use_graph", True))

    def _slide_hash(self) -> str:
        h = hashlib.sha1()
        h.update(self.paired.content_hash().encode())
        g = self.grid
        h.update(json.dumps([g.tile_px, round(g.target_mpp, 6), round(g.slide_mpp, 6)]).encode())
        h.update(np.asarray(g.rows, np.int64).tobytes() + np.asarray(g.cols, np.int64).tobytes())
        gs = self.graph_settings
        h.update(repr((gs.method, gs.k, gs.radius_um, gs.max_dist_um, gs.min_cells)).encode())
        if getattr(gs, "micro_blocks", False):  # G_micro built per micro block (new default)
            h.update(b"micro_blocks")
        mode = self.edge_mode
        if mode is not None:  # graph results depend on how the sampler builds the graphs
            h.update(repr(sorted(mode.items())).encode())
        if self.featurizer is not None:
            for k, v in self.featurizer.to_arrays().items():
                h.update(k.encode())
                h.update(np.asarray(v).tobytes() if isinstance(v, np.ndarray) else repr(v).encode())
        h.update(b"attention" if self.attention else b"")
        return h.hexdigest()[:12]

    def provenance(self) -> dict[str, str]:
        """What layer metadata records about where results come from."""
        return {
            "run": self.run,
            "checkpoint_hash": self.checkpoint_hash,
            "slide": self.paired.name,
            "source": str(self.paired.source or ""),
            "backbone": str(getattr(self.model.cfg, "backbone", "")),
        }

    def index_of(self, tile_id: str) -> int:
        try:
            return self._index[tile_id]
        except KeyError as err:
            raise SigmmaError(
                f"unknown tile id {tile_id!r} for slide {self.paired.name!r}"
            ) from err

    # -- caches ---------------------------------------------------------------------------
    def cached(self, tile_ids: Sequence[str]) -> list[str]:
        """The ids among ``tile_ids`` that are in memory or on disk (no model call)."""
        out = []
        for t in tile_ids:
            if t in self.memory or (self.disk is not None and self.disk.has(t)):
                out.append(t)
        return out

    def lookup(self, tile_id: str) -> TileResult | None:
        """A cached result (memory first, then disk, promoted to memory), or ``None``."""
        res = self.memory.get(tile_id)
        if res is not None:
            self.stats.memory_hits += 1
            return res
        if self.disk is not None:
            res = self.disk.get(tile_id)
            if res is not None:
                self.stats.disk_hits += 1
                self._finish([res])
                self.memory.put(res)
                return res
        return None

    def memory_results(self) -> list[TileResult]:
        """Every result currently held in memory."""
        return [r for t in self.memory.keys() if (r := self.memory.get(t)) is not None]

    # -- encoding ---------------------------------------------------------------------------
    def encode(
        self, tile_ids: Sequence[str], cancel: CancelLike = None, *, cached_first: bool = True
    ) -> Iterator[list[TileResult]]:
        """Results for ``tile_ids``: cached ones first (one list), then one list per batch.

        Parameters
        ----------
        tile_ids
            Tiles wanted, in priority order (e.g. centre first).
        cancel
            A ``threading.Event`` or a callable; checked before every batch and between the
            image and graph forwards. When set, the generator stops.
        cached_first
            Yield all cached results before encoding anything.
        """
        ids = list(dict.fromkeys(tile_ids))
        for t in ids:
            self.index_of(t)
        todo: list[str] = []
        hits: list[TileResult] = []
        for t in ids:
            res = self.lookup(t)
            if res is None:
                todo.append(t)
            else:
                hits.append(res)
        if hits and cached_first:
            yield hits
        chunks = list(iter_chunks(todo, self.batch_size))
        if not chunks:
            return
        self._ensure_cells()  # once, before a prefetch thread can race for it
        # the next batch is read and its graphs built in a helper thread while the model
        # runs on this one (tile decoding and most of numpy/scipy release the GIL)
        ahead: _Prefetch | None = None
        try:
            for n, chunk in enumerate(chunks):
                if is_cancelled(cancel):
                    return
                # a result may have arrived meanwhile (another worker on the same engine)
                chunk = [t for t in chunk if t not in self.memory]
                if ahead is not None:
                    prep = ahead.result()
                    ahead = None
                elif chunk:
                    prep = self.prepare([self._index[t] for t in chunk])
                else:
                    continue
                if n + 1 < len(chunks) and not is_cancelled(cancel):
                    nxt = [t for t in chunks[n + 1] if t not in self.memory]
                    if nxt:
                        ahead = _Prefetch(self.prepare, [self._index[t] for t in nxt])
                if not chunk:
                    continue
                with self._lock:
                    if is_cancelled(cancel):
                        return
                    results = self.forward(prep, cancel=cancel)
                if results is None:
                    return
                for r in results:
                    self.memory.put(r)
                    if self.disk is not None:
                        self.disk.put(r)
                yield results
        finally:
            if ahead is not None:
                ahead.join()  # no thread outlives the generator

    def encode_indices(self, indices: Sequence[int]) -> list[TileResult]:
        """Encode grid ``indices`` now, bypassing the caches (benchmarks, gene-head fits)."""
        out: list[TileResult] = []
        for chunk in iter_chunks(list(indices), self.batch_size):
            with self._lock:
                res = self.forward(self.prepare(chunk))
            out.extend(res or [])
        return out

    # -- steps ------------------------------------------------------------------------------
    def _ensure_cells(self) -> None:
        if self._per_tile is not None:
            return
        from napari_sigmma.tiles.graphs import cells_per_tile

        self._per_tile = cells_per_tile(self.paired.cells_px, self.grid)
        if self.featurizer is not None:
            from napari_sigmma.tiles.features import align_counts

            self._node_x = self.featurizer.features(self.paired)
            if self.paired.n_cells:
                self._counts = align_counts(
                    self.paired.counts, self.paired.genes, self.featurizer.genes
                )

    def prepare(self, indices: Sequence[int]) -> PreparedBatch:
        """Read the tiles and build their cell graphs (CPU work, no model) with the tile-graph
        builder training uses (:meth:`~napari_sigmma.tiles.dataset.GraphSettings.build`)."""
        from napari_sigmma.tiles.grid import read_tile

        t0 = time.perf_counter()
        self._ensure_cells()
        idx = [int(i) for i in indices]
        images = np.stack([read_tile(self.paired, self.grid, i) for i in idx])
        cells = self.graph_settings.build(
            self.paired, self.grid, indices=np.asarray(idx, np.int64), per_tile=self._per_tile
        )
        graph, graph_tiles = None, []
        if self.uses_graph:
            graph, graph_tiles = self._graph_batch(idx, cells)
        dt = time.perf_counter() - t0
        self.stats.prepare_seconds += dt
        return PreparedBatch(idx, images, cells, graph, graph_tiles, dt)

    def _graph_batch(self, idx: list[int], cells: list[TileCells]) -> tuple[Any, list[int]]:
        from torch_geometric.data import Batch

        from napari_sigmma.tiles.dataset import tile_data
        from napari_sigmma.tiles.features import tile_gene_vectors

        data, where = [], []
        for k, (i, c) in enumerate(zip(idx, cells, strict=True)):
            if not c.valid:
                continue
            if self._counts is not None:
                gv = tile_gene_vectors(self._counts, [c.cells], self.featurizer.target_sum)
            else:
                gv = np.zeros((1, len(self.featurizer.genes)), np.float32)
            data.append(tile_data(c, self._node_x, gv, index=i))
            where.append(k)
        if not data:
            return None, []
        return Batch.from_data_list(data), where

    def image_forward(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """One backbone forward over all crops: crop features, scale embeddings, per-crop
        embeddings ``(B, 21, D)`` and (ViT) the macro crop's attention ``(B, heads, h, w)``."""
        model = self.model
        with _capture_cls_attention(self.backbone, enabled=self.attention) as store:
            feats = model.backbone_features(images)
        he = model.image_heads(feats)
        crops = crop_embeddings(model, feats)
        att = None
        if self.attention:
            att = _macro_attention(
                store,
                self.backbone,
                images.shape[0],
                images.shape[-1],
                fast=bool(getattr(model.cfg, "fast_multicrop", False)),
            )
        return feats, he, crops, att

    def forward(self, prep: PreparedBatch, cancel: CancelLike = None) -> list[TileResult] | None:
        """Run the model on a prepared batch; ``None`` when cancelled between the forwards."""
        import torch

        from napari_sigmma.device import autocast, to_device

        t0 = time.perf_counter()
        dev = self.device
        with torch.inference_mode(), autocast(dev):
            # pinned, non-blocking copies (CUDA); the NHWC -> NCHW shuffle runs on the device
            imgs = to_device(torch.from_numpy(prep.images), dev)
            imgs = imgs.permute(0, 3, 1, 2).contiguous()
            graph = to_device(prep.graph, dev) if prep.graph is not None else None
            _, he, crops, att = self.image_forward(imgs)
            if is_cancelled(cancel):
                return None
            gout = None
            if graph is not None:
                gout = self.model.encode_graph(graph)
        self.stats.forward_batches += 1
        results = self._split(prep, he, crops, att, gout)
        self.stats.encoded_tiles += len(results)
        self.stats.forward_seconds += time.perf_counter() - t0
        self._finish(results)
        return results

    def _split(self, prep: PreparedBatch, he, crops, att, gout) -> list[TileResult]:
        def np32(t: Any) -> np.ndarray:
            return t.detach().float().cpu().numpy()

        he_np = {s: np32(v) for s, v in he.items()}
        crops_np = np32(crops)
        att_np = np32(att) if att is not None else None
        out = []
        for k, i in enumerate(prep.indices):
            out.append(
                TileResult(
                    tile_id=self.grid.tile_ids[i],
                    index=i,
                    he={s: he_np[s][k] for s in he_np},
                    he_crops=crops_np[k],
                    attention=att_np[k] if att_np is not None else None,
                    cell_index=np.zeros(0, np.int64),
                    cell_micro=np.zeros(0, np.int64),
                )
            )
        if gout is not None:
            self._split_graph(prep, out, gout)
        for r in out:
            r.__dict__.pop("_cells", None)
        return out

    def _split_graph(self, prep: PreparedBatch, out: list[TileResult], gout: Any) -> None:
        b = prep.graph.batch.detach().cpu().numpy()
        ptr = np.concatenate([[0], np.cumsum(np.bincount(b, minlength=len(prep.graph_tiles)))])
        emb = {s: v.detach().float().cpu().numpy() for s, v in gout.emb.items()}
        nodes = {s: v.detach().float().cpu().numpy() for s, v in gout.nodes.items()}
        cells_cat = np.concatenate([prep.cells[k].cells for k in prep.graph_tiles])
        edges: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for s, (ei, p) in gout.edges.items():
            ei = ei.detach().cpu()
            p = p.detach().float().cpu()
            keep = ei[0] < ei[1]  # each undirected edge once
            ei, p = ei[:, keep].numpy(), p[keep].numpy()
            edges[s] = (ei, p, b[ei[0]] if ei.size else np.zeros(0, np.int64))
        for g, k in enumerate(prep.graph_tiles):
            r = out[k]
            c = prep.cells[k]
            lo, hi = int(ptr[g]), int(ptr[g + 1])
            r.st = {s: emb[s][g] for s in emb}
            r.nodes = {s: nodes[s][lo:hi] for s in nodes}
            r.cell_index = np.asarray(c.cells, dtype=np.int64)
            r.cell_micro = np.asarray(c.micro, dtype=np.int64)
            r.edges = {}
            for s, (ei, p, owner) in edges.items():
                m = owner == g
                pairs = (
                    cells_cat[ei[:, m]].T.astype(np.int64)
                    if m.any()
                    else np.zeros((0, 2), np.int64)
                )
                r.edges[s] = (pairs.reshape(-1, 2), p[m].astype(np.float32))

    def _finish(self, results: Sequence[TileResult]) -> None:
        if self.gene_head is not None:
            self.gene_head.apply(results)

    def set_gene_head(self, head: GeneHead | None) -> None:
        """Use ``head`` for predicted genes (recomputed for results held in memory)."""
        self.gene_head = head
        held = self.memory_results()
        if head is not None:
            head.apply(held)
        else:
            for r in held:
                r.genes_pred = r.genes_pred_micro = None


class _Prefetch:
    """``fn(arg)`` running in a daemon thread; :meth:`result` waits and returns it (or
    raises what it raised)."""

    def __init__(self, fn: Callable[[Any], Any], arg: Any) -> None:
        self._out: Any = None
        self._err: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(fn, arg), name="sigmma-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, fn: Callable[[Any], Any], arg: Any) -> None:
        try:
            self._out = fn(arg)
        except BaseException as err:  # handed to the consumer
            self._err = err

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._err is not None:
            raise self._err
        return self._out


def crop_embeddings(model: Any, crop_feats: torch.Tensor) -> torch.Tensor:
    """``(B, 21, C)`` crop features → ``(B, 21, D)``: each crop through its scale's head.

    The macro crop's embedding equals the tile's macro embedding; micro / meso crops are
    the per-patch counterparts of the (mean-pooled) micro / meso tile embeddings.
    """
    import torch

    fn = getattr(model, "crop_embeddings", None)
    if fn is not None:
        return fn(crop_feats)
    proj = model.image.proj
    x = crop_feats.float()
    return torch.cat([proj[s](x[:, sl]) for s, sl in CROP_SLICES.items()], dim=1)


@contextlib.contextmanager
def _capture_cls_attention(backbone: Any, *, enabled: bool) -> Iterator[list]:
    """Collect the CLS row of the last block's attention in the forward that runs inside.

    Uses :func:`napari_sigmma.models.backbones.capture_last_attention`; every chunk of a
    chunked forward is kept, and only the class token's row (``(N, heads, T)``) is stored,
    so all ``21·B`` crops cost a few kB each.
    """
    if not enabled:
        yield []
        return
    from napari_sigmma.models.backbones import capture_last_attention

    npt = int(backbone.num_prefix_tokens)
    has_cls = bool(getattr(backbone.module, "has_class_token", npt > 0))

    def cls_row(attn: Any) -> Any:
        return attn[:, :, 0, :] if has_cls else attn[:, :, npt:, :].mean(dim=2)

    with capture_last_attention(backbone.module, reduce=cls_row, require=False) as store:
        yield store


def _macro_attention(store: list, backbone: Any, n_tiles: int, tile_side: int, *, fast: bool):
    """Macro-crop CLS→patch maps ``(B, heads, h, w)`` from the captured rows."""
    import torch

    if not store:
        return None
    rows = torch.cat(store, dim=0).float()
    if not fast:
        rows = rows.reshape(n_tiles, 21, rows.shape[1], rows.shape[2])[:, 20]
        side = int(backbone.input_size)
    else:
        side = int(tile_side)
    npt = int(backbone.num_prefix_tokens)
    row = rows[:, :, npt:]
    row = row / row.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    h, w = backbone.grid_size(side, side)
    return row.reshape(row.shape[0], row.shape[1], h, w)


def default_engine_cache(paired: PairedSlide) -> Path:
    """Disk-cache root for a slide: next to its data when writable."""
    return default_cache_root(paired.source)


SCALE_NAMES = SCALES
