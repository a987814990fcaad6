"""Spatially blocked train/val/test split."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from napari_sigmma.errors import SigmmaError
from napari_sigmma.tiles.split import TileSplit, block_split


def _slide(name: str, n_rows: int, n_cols: int, drop: float = 0.0, seed: int = 0):
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rr.ravel(), cc.ravel()
    keep = np.random.default_rng(seed).random(rows.size) >= drop
    rows, cols = rows[keep], cols[keep]
    return name, rows, cols, [f"r{r}_c{c}" for r, c in zip(rows, cols, strict=True)]


def test_no_block_straddles_two_splits():
    slides = [_slide("a", 30, 30, drop=0.2), _slide("b", 17, 23, drop=0.1, seed=1)]
    sp = block_split(slides, block=4, seed=3)
    for (name, rows, cols, _ids), s in zip(slides, sp.slides, strict=True):
        per_block = defaultdict(set)
        for r, c, v, b in zip(rows, cols, s.split, s.block, strict=True):
            per_block[(r // 4, c // 4)].add(v)
            assert b == f"{name}:b{r // 4}_{c // 4}"
        assert all(len(v) == 1 for v in per_block.values())
    counts = sp.counts()
    total = sum(counts.values())
    assert total == sum(len(s[1]) for s in slides)
    # Whole blocks of ≤ 16 tiles: the fractions are met to within a couple of blocks.
    assert abs(counts["train"] / total - 0.7) < 0.05
    assert abs(counts["val"] / total - 0.15) < 0.05
    assert abs(counts["test"] / total - 0.15) < 0.05


def test_neighbours_rarely_cross_the_split():
    name, rows, cols, ids = _slide("a", 40, 40)
    sp = block_split([(name, rows, cols, ids)], block=4, seed=0)
    lab = dict(zip(zip(rows.tolist(), cols.tolist(), strict=True), sp.slides[0].split, strict=True))
    pairs = cross = 0
    for (r, c), v in lab.items():
        for nb in ((r + 1, c), (r, c + 1)):
            if nb in lab:
                pairs += 1
                cross += lab[nb] != v
    # A random tile split would cross ~46 % of neighbour pairs; blocks of 4 at most 25 %.
    assert cross / pairs < 0.25


def test_split_is_seeded_and_round_trips(tmp_path):
    slides = [_slide("a", 12, 12)]
    a = block_split(slides, seed=7)
    b = block_split(slides, seed=7)
    c = block_split(slides, seed=8)
    assert a.slides[0].split == b.slides[0].split
    assert a.slides[0].split != c.slides[0].split
    a.save(tmp_path / "split.json")
    back = TileSplit.load(tmp_path / "split.json")
    assert back.slides[0].split == a.slides[0].split
    assert back.slides[0].tile_ids == a.slides[0].tile_ids
    assert back.block == 4 and back.seed == 7
    assert set(back.slides[0].indices("val")) == {
        i for i, v in enumerate(a.slides[0].split) if v == "val"
    }


def test_every_split_gets_a_block_when_there_are_three():
    sp = block_split([_slide("a", 4, 12)], block=4, seed=0)
    assert sorted(set(sp.slides[0].split)) == ["test", "train", "val"]


def test_split_by_slide():
    slides = [_slide(n, 5, 5) for n in "abcdef"]
    sp = block_split(slides, by_slide=True, seed=1)
    for s in sp.slides:
        assert len(set(s.split)) == 1
    assert {s.split[0] for s in sp.slides} == {"train", "val", "test"}
    with pytest.raises(SigmmaError, match="at least 3 slides"):
        block_split(slides[:2], by_slide=True)


def test_bad_fractions_raise():
    with pytest.raises(SigmmaError):
        block_split([_slide("a", 4, 4)], fractions=(1.0, -0.1, 0.1))
    with pytest.raises(SigmmaError):
        block_split([_slide("a", 4, 4), _slide("a", 4, 4)])
