"""Spatially blocked train / validation / test split of tiles.

Neighbouring tiles share tissue structures, so a random tile-level split leaks: a test tile's
neighbour sits in the training set. Here tiles are grouped into square blocks of
``block × block`` grid cells per slide and whole blocks go to one split, so only tiles on a
block border ever touch a tile of another split. With several slides, ``by_slide=True``
assigns whole slides instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sigmma.errors import SigmmaError

SPLITS = ("train", "val", "test")


@dataclass
class SlideSplit:
    """Split of the tiles of one slide (in the order they were given)."""

    name: str
    tile_ids: list[str]
    split: list[str]
    block: list[str]
    hash: str = ""

    def indices(self, which: str) -> np.ndarray:
        """Positions (in :attr:`tile_ids` order) of the tiles in split ``which``."""
        return np.array([i for i, s in enumerate(self.split) if s == which], dtype=np.int64)


@dataclass
class TileSplit:
    """Split of the tiles of every slide of a run (saved as ``split.json``)."""

    slides: list[SlideSplit]
    block: int = 4
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    by_slide: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def slide(self, name: str) -> SlideSplit:
        for s in self.slides:
            if s.name == name:
                return s
        raise KeyError(name)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(SPLITS, 0)
        for s in self.slides:
            for v in s.split:
                out[v] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "block": int(self.block),
            "fractions": [float(f) for f in self.fractions],
            "seed": int(self.seed),
            "by_slide": bool(self.by_slide),
            "counts": self.counts(),
            "slides": [
                {
                    "name": s.name,
                    "hash": s.hash,
                    "tile_ids": list(s.tile_ids),
                    "split": list(s.split),
                    "block": list(s.block),
                }
                for s in self.slides
            ],
            **({"extra": self.extra} if self.extra else {}),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``split.json`` (atomically: temp file then rename)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TileSplit:
        try:
            d = json.loads(Path(path).read_text())
            slides = [
                SlideSplit(
                    name=str(s["name"]),
                    tile_ids=[str(t) for t in s["tile_ids"]],
                    split=[str(v) for v in s["split"]],
                    block=[str(b) for b in s["block"]],
                    hash=str(s.get("hash", "")),
                )
                for s in d["slides"]
            ]
            return cls(
                slides=slides,
                block=int(d["block"]),
                fractions=tuple(float(f) for f in d["fractions"]),  # type: ignore[arg-type]
                seed=int(d["seed"]),
                by_slide=bool(d.get("by_slide", False)),
                extra=dict(d.get("extra", {})),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SigmmaError(f"cannot read the split file: {err}", path=path) from err


def _greedy_assign(sizes: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Assign groups (in the given order) to the split that lags its target most."""
    total = float(sizes.sum())
    target = fractions * total
    have = np.zeros(len(fractions))
    out = np.empty(len(sizes), dtype=np.int64)
    for g, n in enumerate(sizes):
        lag = np.where(target > 0, (target - have) / np.maximum(target, 1e-12), -np.inf)
        s = int(np.argmax(lag))  # ties: the first split (train, then val, then test)
        out[g] = s
        have[s] += n
    return out


def block_split(
    slides: list[tuple[str, np.ndarray, np.ndarray, list[str]]],
    *,
    block: int = 4,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    by_slide: bool = False,
    hashes: list[str] | None = None,
) -> TileSplit:
    """Split tiles into train / val / test by whole spatial blocks (or whole slides).

    Parameters
    ----------
    slides
        One ``(name, rows, cols, tile_ids)`` per slide: the grid position and id of each
        tile taking part (typically the tiles with enough cells).
    block
        Block side in tiles (default 4: 4×4 tiles = 512 µm at 256 px × 0.5 µm/px).
    fractions
        Target fractions of tiles for train, val, test (normalised to sum 1).
    seed
        Seed of the block shuffle.
    by_slide
        Assign whole slides (needs at least as many slides as non-zero fractions).

    Returns
    -------
    TileSplit
        Per slide: the split and block id of every tile. Blocks are visited in a seeded
        random order and each goes to the split furthest below its target, so every split
        with a non-zero fraction gets at least one block when there are enough blocks.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise SigmmaError(f"split fractions must be three non-negative numbers, got {fractions}")
    fr = fr / fr.sum()
    if int(block) < 1:
        raise SigmmaError(f"split block size must be ≥ 1 tile, got {block}")
    rng = np.random.default_rng(int(seed))
    names = [s[0] for s in slides]
    if len(set(names)) != len(names):
        raise SigmmaError(f"slide names must be unique for the split, got {names}")

    group_keys: list[str] = []
    tile_group: list[np.ndarray] = []
    block_ids: list[list[str]] = []
    for name, rows, cols, _ids in slides:
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        if by_slide:
            bid = [name] * len(rows)
        else:
            bid = [f"{name}:b{r}_{c}" for r, c in zip(rows // block, cols // block, strict=True)]
        block_ids.append(bid)
    if by_slide:
        n_needed = int((fr > 0).sum())
        if len(slides) < n_needed:
            raise SigmmaError(f"split by slide needs at least {n_needed} slides, got {len(slides)}")
    for bid in block_ids:
        for b in dict.fromkeys(bid):
            group_keys.append(b)
    key_index = {k: i for i, k in enumerate(group_keys)}
    sizes = np.zeros(len(group_keys), dtype=np.int64)
    for bid in block_ids:
        g = np.array([key_index[b] for b in bid], dtype=np.int64)
        tile_group.append(g)
        np.add.at(sizes, g, 1)
    order = rng.permutation(len(group_keys))
    assigned = np.empty(len(group_keys), dtype=np.int64)
    assigned[order] = _greedy_assign(sizes[order], fr)

    out = []
    for k, (name, _rows, _cols, ids) in enumerate(slides):
        split = [SPLITS[int(assigned[g])] for g in tile_group[k]]
        out.append(
            SlideSplit(
                name=name,
                tile_ids=[str(t) for t in ids],
                split=split,
                block=block_ids[k],
                hash=(hashes[k] if hashes else ""),
            )
        )
    return TileSplit(
        slides=out,
        block=int(block),
        fractions=tuple(float(f) for f in fr),  # type: ignore[arg-type]
        seed=int(seed),
        by_slide=bool(by_slide),
    )
