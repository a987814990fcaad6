"""A trained run, ready for the live viewer: model, node features, tiling, gene head.

:func:`load_live_run` reads a checkpoint written by :func:`napari_sigmma.train.loop.train`
(``torch.load(weights_only=True)``), rebuilds the model and its node-feature transform, and
picks up the tiling and graph settings the model was trained with, so the live engine tiles
and builds graphs exactly as training did. The gene head (``<run>/gene_head.npz``) is read
when present; :func:`fit_run_gene_head` fits it on the run's *training* tiles (from
``split.json``) and saves it there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sigmma.analysis.genehead import GENE_HEAD_FILE, GeneHead
from napari_sigmma.errors import CancelLike, SigmmaError, check_cancel

if TYPE_CHECKING:
    from napari_sigmma.live.engine import EmbeddingEngine
    from napari_sigmma.tiles.dataset import GraphSettings
    from napari_sigmma.tiles.features import NodeFeaturizer
    from napari_sigmma.tiles.grid import TileGrid
    from napari_sigmma.tiles.paired import PairedSlide


@dataclass
class LiveRun:
    """What the live viewer needs from a training run.

    Attributes
    ----------
    checkpoint
        The checkpoint file.
    run_dir
        Its run folder (``<run>/checkpoints/x.pt`` → ``<run>``), if it looks like one.
    model, featurizer
        The rebuilt :class:`~napari_sigmma.models.sigmma.SigmmaModel` and node features.
    config
        The training configuration (plain dict, as stored in the checkpoint).
    graph_settings
        Cell-graph settings of training.
    checkpoint_hash
        SHA-1 of the checkpoint file (disk-cache key).
    slides
        ``[{"name", "hash"}]`` of the training slides.
    gene_head
        The run's gene head, when ``gene_head.npz`` exists.
    """

    checkpoint: Path
    run_dir: Path | None
    model: Any
    featurizer: NodeFeaturizer
    config: dict[str, Any]
    graph_settings: GraphSettings
    checkpoint_hash: str
    slides: list[dict[str, str]]
    gene_head: GeneHead | None = None
    epoch: int | None = None  # the checkpoint's epoch (how it is named in the viewer)

    @property
    def tile_px(self) -> int:
        return int(self.config.get("tile_px", 256))

    @property
    def target_mpp(self) -> float:
        return float(self.config.get("target_mpp", 0.5))

    @property
    def min_tissue(self) -> float:
        return float(self.config.get("min_tissue", 0.25))

    @property
    def gene_head_path(self) -> Path:
        base = self.run_dir if self.run_dir is not None else self.checkpoint.parent
        return base / GENE_HEAD_FILE

    def make_grid(self, paired: PairedSlide) -> TileGrid:
        """The slide's grid with the run's tiling."""
        from napari_sigmma.tiles.grid import make_tile_grid

        return make_tile_grid(
            paired, tile_px=self.tile_px, target_mpp=self.target_mpp, min_tissue=self.min_tissue
        )

    def engine(
        self,
        paired: PairedSlide,
        grid: TileGrid | None = None,
        *,
        device: Any = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 4,
        edge_mode: str | None = None,
        **kwargs: Any,
    ) -> EmbeddingEngine:
        """An :class:`~napari_sigmma.live.engine.EmbeddingEngine` for ``paired``
        (``edge_mode``: the edge sampler's evaluation mode,
        :data:`napari_sigmma.models.edges.EDGE_MODES`; None = the model's, ``expected``)."""
        from napari_sigmma.live.engine import EmbeddingEngine

        return EmbeddingEngine(
            self.model,
            paired,
            grid if grid is not None else self.make_grid(paired),
            featurizer=self.featurizer,
            graph_settings=self.graph_settings,
            device=device,
            cache_dir=cache_dir,
            checkpoint_hash=self.checkpoint_hash,
            batch_size=batch_size,
            gene_head=self.gene_head,
            run=str(self.run_dir or self.checkpoint),
            edge_mode=edge_mode,
            **kwargs,
        )

    def train_tile_ids(self, paired: PairedSlide) -> list[str]:
        """The run's training tiles of ``paired`` (matched by content hash, then name)."""
        from napari_sigmma.tiles.split import TileSplit

        if self.run_dir is None or not (self.run_dir / "split.json").is_file():
            return []
        split = TileSplit.load(self.run_dir / "split.json")
        h = paired.content_hash()
        names = [s["name"] for s in self.slides if s.get("hash") == h] or [paired.name]
        for name in names:
            try:
                ss = split.slide(name)
            except KeyError:
                continue
            return [t for t, which in zip(ss.tile_ids, ss.split, strict=True) if which == "train"]
        return []


def load_live_run(checkpoint: str | os.PathLike[str], *, cancel: CancelLike = None) -> LiveRun:
    """Read a training checkpoint (a ``.pt`` file, or a run folder → its ``best.pt`` /
    ``last.pt``) for the live viewer.

    ``cancel`` (Event or callable) is checked between the steps (read, model, hash, gene
    head); when set, :class:`~napari_sigmma.errors.Cancelled` is raised.
    """
    from napari_sigmma.live.engine import file_hash
    from napari_sigmma.train.checkpoint import (
        graph_settings,
        load_checkpoint,
        model_from_checkpoint,
        resolve_checkpoint,
    )
    from napari_sigmma.train.config import TrainConfig

    path = Path(checkpoint)
    if path.is_dir():
        path = resolve_checkpoint(path)
    check_cancel(cancel)
    ckpt = load_checkpoint(path)
    check_cancel(cancel)
    model, featurizer = model_from_checkpoint(ckpt)
    model.eval()
    check_cancel(cancel)
    config = dict(ckpt["config"])
    cfg = TrainConfig.from_dict(config) if hasattr(TrainConfig, "from_dict") else None
    gs = graph_settings(cfg)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    run = LiveRun(
        checkpoint=path,
        run_dir=run_dir,
        model=model,
        featurizer=featurizer,
        config=config,
        graph_settings=gs,
        checkpoint_hash=file_hash(path),
        slides=[dict(s) for s in ckpt.get("slides", [])],
        epoch=int(ckpt["epoch"]) if isinstance(ckpt.get("epoch"), int) else None,
    )
    check_cancel(cancel)
    if run.gene_head_path.is_file():
        run.gene_head = GeneHead.load(run.gene_head_path)
    return run


def fit_run_gene_head(
    run: LiveRun,
    paired: PairedSlide,
    grid: TileGrid | None = None,
    *,
    device: Any = "auto",
    max_tiles: int = 512,
    save: bool = True,
    engine: EmbeddingEngine | None = None,
    seed: int = 0,
) -> GeneHead:
    """Fit the gene head on the run's training tiles of ``paired`` and save it with the run.

    Parameters
    ----------
    run
        The loaded run.
    paired, grid
        A training slide of the run (its ``split.json`` says which tiles trained).
    max_tiles
        At most this many training tiles are encoded (a random subset beyond).
    save
        Write ``<run>/gene_head.npz``.
    engine
        An engine to encode with (default: a new one, memory cache only).
    """
    from napari_sigmma.analysis.genehead import fit_gene_head

    grid = grid if grid is not None else (engine.grid if engine else run.make_grid(paired))
    ids = run.train_tile_ids(paired)
    if not ids:
        raise SigmmaError(
            "the run's split.json names no training tile of this slide: fit the gene head on "
            "a slide the model was trained on",
            path=run.run_dir or run.checkpoint,
        )
    pos = {t: i for i, t in enumerate(grid.tile_ids)}
    idx = np.array([pos[t] for t in ids if t in pos], dtype=np.int64)
    if idx.size > max_tiles:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_tiles, replace=False))
    eng = engine if engine is not None else run.engine(paired, grid, device=device)
    results = [eng.lookup(grid.tile_ids[i]) for i in idx]
    todo = [int(i) for i, r in zip(idx, results, strict=True) if r is None]
    got = [r for r in results if r is not None] + eng.encode_indices(todo)
    head = fit_gene_head(got, paired, grid, run=str(run.run_dir or run.checkpoint))
    if save:
        head.save(run.gene_head_path)
    run.gene_head = head
    return head
