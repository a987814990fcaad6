"""What training reads: data paths expanded into data sets (more of the data preparation
moves here as the trainer is split)."""

from __future__ import annotations

import os
from pathlib import Path

from napari_sigmma.errors import SigmmaError


def expand_data(path: str | os.PathLike[str]) -> list[Path]:
    """A data path, or — for a plain folder — the data sets directly inside it."""
    from napari_sigmma.io import detect_kind

    p = Path(path)
    if not p.exists():
        raise SigmmaError("not found", path=p)
    if detect_kind(p) is not None:
        return [p.resolve()]
    if p.is_dir():
        found = sorted(c.resolve() for c in p.iterdir() if detect_kind(c) is not None)
        if found:
            return found
    # Let the reader explain what is wrong with it.
    return [p.resolve()]
