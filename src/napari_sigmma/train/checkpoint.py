"""Checkpoints: the one lookup rule from a path to a checkpoint file."""

from __future__ import annotations

import os
from pathlib import Path

from napari_sigmma.errors import SigmmaError


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or a run folder (its ``best.pt``, else ``last.pt``)."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "checkpoints" / "best.pt", p / "checkpoints" / "last.pt"):
            if cand.is_file():
                return cand
        raise SigmmaError("no checkpoints/best.pt or last.pt in this run folder", path=p)
    if not p.is_file():
        raise SigmmaError("checkpoint not found", path=p)
    return p
