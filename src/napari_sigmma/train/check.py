"""Check data, slides, configs, run folders and checkpoints before a long job
(``napari-sigmma check PATH``; the dock can offer the same): every problem found, each with
what to do, without training or embedding anything.

What is checked, by what ``path`` is:

- a **Xenium bundle / HEST folder / SpatialData .zarr**: the folder check and the reader
  (the first damaged file is named), then the pairing: whole tiles at the default tiling,
  cells in the table, cells on the H&E (:func:`pairing_problems`);
- a **slide** (``.svs``, ``.tif``, …): opens as 8-bit RGB with a µm/px, has a whole tile;
- a **YAML config**: every value (:func:`napari_sigmma.train.config.config_problems`) and
  that its data paths exist;
- a **checkpoint** (``.pt``): :func:`napari_sigmma.train.checkpoint.load_checkpoint`
  (format, finite weights, metadata) and that its weights build its model;
- a **run folder**: its ``config.yaml``, ``split.json``, ``checkpoints/last.pt`` and
  ``best.pt``;
- a **folder of data sets**: each of them.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_sigmma.errors import SigmmaError

#: Cells that must lie on the H&E before a data set is worth training on (fewer: a note).
FEW_CELLS = 10


@dataclass
class Finding:
    """One problem (or, with ``note``, a warning that does not stop a job)."""

    path: str
    problem: str
    todo: str
    note: bool = False

    def __str__(self) -> str:
        kind = "note" if self.note else "problem"
        return f"{kind}: {self.path}: {self.problem}\n  what to do: {self.todo}"


def pairing_problems(paired: Any, grid: Any, *, has_table: bool) -> tuple[list[str], list[str]]:
    """Why a paired slide cannot be embedded or trained on (problems), and what looks
    wrong without stopping (notes): no whole tile; a cell table with no cells, or with no
    cell on the H&E image (a wrong alignment, or an H&E of another section); only a
    handful of cells on it."""
    problems: list[str] = []
    notes: list[str] = []
    if len(grid) == 0:
        problems.append(
            f"no tiles: no whole {grid.tile_px}-px tile at {grid.target_mpp} µm/px with enough "
            "tissue fits on the H&E image (too small, blank, or an alignment with the wrong "
            "scale)"
        )
    if not has_table:
        return problems, notes
    n = int(paired.n_cells)
    if n == 0:
        problems.append(
            "the cell table has no cells: nothing to pair with the H&E (to embed the image "
            "alone, give the H&E file instead)"
        )
        return problems, notes
    xy = np.asarray(paired.cells_px, dtype=np.float64)
    h, w = paired.image.shape
    inside = int(((xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < w) & (xy[:, 1] < h)).sum())
    if inside == 0:
        problems.append(
            f"none of the {n} cells lies on the H&E image ({w} x {h} px): the alignment "
            "does not put the cells on this slide (wrong alignment file, or an H&E of "
            "another section)"
        )
    elif inside < FEW_CELLS:
        notes.append(
            f"only {inside} of {n} cells lie on the H&E image: the ST embeddings describe "
            "almost nothing"
        )
    return problems, notes


# ----------------------------------------------------------------------------- per kind

_DATA_TODO = (
    "re-copy or re-export the file named (a partial copy or another run's file), or fix "
    "the value named"
)
_SLIDE_TODO = "give an 8-bit RGB H&E slide with its µm/px (or pass it with mpp=)"
_CONFIG_TODO = "change the value in the YAML (keys left out keep their defaults)"
_CKPT_TODO = (
    "use another checkpoint (the run folder's best.pt / last.pt), or retrain; a damaged "
    "file cannot be repaired"
)


def _err_finding(err: SigmmaError, fallback: str | os.PathLike[str], todo: str) -> Finding:
    return Finding(err.path or os.fspath(fallback), err.problem, todo)


def _check_data(path: Path) -> list[Finding]:
    from napari_sigmma.io import detect_kind, load_any
    from napari_sigmma.tiles.grid import make_tile_grid
    from napari_sigmma.tiles.paired import PairedSlide
    from napari_sigmma.train.config import TrainConfig

    kind = detect_kind(path)
    out: list[Finding] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if kind == "slide":
                from napari_sigmma.io.wsi import open_slide

                open_slide(path).close()
            sdata = load_any(path)
            paired = PairedSlide.from_sdata(sdata)
            d = TrainConfig()
            grid = make_tile_grid(
                paired, tile_px=d.tile_px, target_mpp=d.target_mpp, min_tissue=d.min_tissue
            )
        except SigmmaError as err:
            out.append(_err_finding(err, path, _SLIDE_TODO if kind == "slide" else _DATA_TODO))
            grid = None
    seen: set[str] = set()
    for w in caught:  # the readers' own notes name the file (third-party noise does not)
        msg = str(w.message)
        if not (issubclass(w.category, UserWarning) and path.name in msg):
            continue
        for prefix in (f"{os.fspath(path)}: ", f"{path.name}: "):  # the Finding names it
            msg = msg.removeprefix(prefix)
        if msg not in seen:  # the same note from two readers of one file
            seen.add(msg)
            out.append(Finding(os.fspath(path), msg, "nothing, if expected", note=True))
    if grid is None:
        return out
    problems, notes = pairing_problems(paired, grid, has_table=kind != "slide")
    todo = (
        "check the H&E alignment file (and that the H&E is of the same section), or give "
        "a larger slide"
    )
    out += [Finding(os.fspath(path), p, todo) for p in problems]
    out += [Finding(os.fspath(path), n, "check the alignment", note=True) for n in notes]
    return out


def _check_config(path: Path) -> list[Finding]:
    import yaml

    from napari_sigmma.train.config import TrainConfig, config_problems

    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        why = str(err).replace("\n", " ")
        return [Finding(os.fspath(path), f"not a readable YAML file ({why})", _CONFIG_TODO)]
    if not isinstance(d, dict):
        try:
            TrainConfig.from_yaml(path)
        except SigmmaError as err:
            return [_err_finding(err, path, _CONFIG_TODO)]
    out = [Finding(os.fspath(path), p, _CONFIG_TODO) for p in config_problems(d)]
    try:
        TrainConfig.from_dict(d, path=path)
    except SigmmaError as err:
        if not out:  # unknown keys and the like, past the value checks
            out.append(_err_finding(err, path, _CONFIG_TODO))
    data = d.get("data") if isinstance(d, dict) else None
    for p in [data] if isinstance(data, str) else data if isinstance(data, list) else []:
        if isinstance(p, str) and not Path(p).exists():
            out.append(Finding(p, "data path not found", "fix the path under 'data:'"))
    return out


def _check_checkpoint(path: Path) -> list[Finding]:
    from napari_sigmma.train.checkpoint import load_checkpoint, model_from_checkpoint

    try:
        ckpt = load_checkpoint(path)
        model_from_checkpoint(ckpt, path=path)
    except SigmmaError as err:
        return [_err_finding(err, path, _CKPT_TODO)]
    return []


def _check_run(path: Path) -> list[Finding]:
    out: list[Finding] = []
    cfg = path / "config.yaml"
    if cfg.is_file():
        out += _check_config(cfg)
    else:
        out.append(Finding(os.fspath(cfg), "missing", "give the run folder a training wrote"))
    split = path / "split.json"
    if split.exists():
        try:
            s = json.loads(split.read_text())
            if not isinstance(s, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            out.append(
                Finding(
                    os.fspath(split),
                    f"not a readable split ({err})",
                    "delete it: the split is recomputed from the config",
                )
            )
    ckpts = [path / "checkpoints" / n for n in ("last.pt", "best.pt")]
    have = [c for c in ckpts if c.is_file()]
    if not have:
        out.append(
            Finding(
                os.fspath(path / "checkpoints"),
                "no checkpoint (last.pt or best.pt)",
                "train (or resume) this run first, or give a finished run folder",
            )
        )
    for c in have:
        out += _check_checkpoint(c)
    return out


def check_path(path: str | os.PathLike[str]) -> list[Finding]:
    """Every problem (and note) found in ``path``: a data set, a slide, a YAML config, a
    checkpoint, a run folder, or a folder of data sets (see the module notes)."""
    from napari_sigmma.io import detect_kind

    p = Path(path)
    if not p.exists():
        return [Finding(os.fspath(p), "not found", "check the path (typo, unmounted drive?)")]
    if p.is_file() and p.suffix.lower() in (".yaml", ".yml"):
        return _check_config(p)
    if p.is_file() and p.suffix.lower() in (".pt", ".pth", ".ckpt"):
        return _check_checkpoint(p)
    if p.is_file() and p.name == "experiment.xenium":
        return _check_data(p.parent)
    if p.is_dir() and ((p / "config.yaml").is_file() or (p / "checkpoints").is_dir()):
        return _check_run(p)
    if detect_kind(p) is not None:
        return _check_data(p)
    if p.is_dir():
        subs = [c for c in sorted(p.iterdir()) if detect_kind(c) is not None]
        if not subs:
            return [
                Finding(
                    os.fspath(p),
                    "no data set, slide, config, checkpoint or run folder here",
                    "give a Xenium bundle, a HEST folder, a .zarr, a slide, a YAML config, "
                    "a checkpoint or a run folder",
                )
            ]
        out: list[Finding] = []
        for c in subs:
            out += _check_data(c)
        return out
    return [
        Finding(
            os.fspath(p),
            "not a file napari-sigmma knows (slide, YAML config or checkpoint)",
            "give a slide (.svs, .tif, .ome.tif, …), a .yaml config or a .pt checkpoint",
        )
    ]
