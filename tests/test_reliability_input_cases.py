"""Bad input a tired user brings at 2 a.m. (issue 18): each case through the real CLI (or
the real reader), ending in one stderr line naming the file and the problem, exit code 2,
and nothing half-written; or, where going on is right, a warning.

Cases: embed on a slide with no whole tile, and with an alignment that shrinks the H&E
1e5-fold; ``pixel_size`` 1e6 / Infinity / NaN / a string in ``experiment.xenium``; YAML
configs with ``batch_size: 2.5``, ``embed_dim: -3``, ``split_fractions`` summing to 2.7, an
empty file, a list, a string number, a wrong tile size, a tissue fraction > 1, a non-mapping
``model``, broken YAML, ``data: 5``; ``sample --out`` onto an existing file and onto a
non-empty folder; RGBA / 4-channel / 16-bit / grayscale / not-a-TIFF H&E; ``embed`` over a
folder with one corrupt bundle; ``--out`` that is the data bundle, or inside it; every cell
off the H&E (an alignment of another section); a bundle with one cell; duplicate gene
names; duplicate cell ids; NaN centroids; a bundle with zero cells; ``embed`` onto an
existing store (``--overwrite``); a full disk while writing a sample and an embed store;
a bundle still being copied (truncated ``cells.parquet``); mixed output versions (a count
matrix of another run); a renamed H&E file; an empty alignment CSV; a run folder without
checkpoints; a truncated retrieval index.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_sigmma.errors import SigmmaError
from napari_sigmma.train.config import TrainConfig

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def ckpt(tiny_trained_run: TrainConfig) -> Path:
    """The last checkpoint of the session's finished 1-epoch tiny run."""
    return Path(tiny_trained_run.run_dir) / "checkpoints" / "last.pt"


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    from napari_sigmma.cli import main

    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def _one_line(code: int, err: list[str], name: str | Path, *words: str) -> str:
    assert code == 2, err
    assert len(err) == 1, err
    assert "error:" in err[0] and str(name) in err[0], err
    for w in words:
        assert w in err[0], err
    return err[0]


def _copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _embed(data: Path, ckpt: Path, out: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    argv = ["embed", "--data", str(data), "--checkpoint", str(ckpt), "--out", str(out)]
    return _cli([*argv, "--quiet", *extra], capsys)


def _alignment_csv(bundle: Path) -> Path:
    return next(bundle.glob("*_imagealignment.csv"))


def _scale_alignment(bundle: Path, factor: float, shift: float = 0.0) -> Path:
    csv = _alignment_csv(bundle)
    a = np.loadtxt(csv, delimiter=",")
    a[:2, :2] *= factor
    a[:2, 2] += shift
    np.savetxt(csv, a, delimiter=",")
    return csv


def _set_experiment(bundle: Path, text_value: str) -> Path:
    exp = bundle / "experiment.xenium"
    spec = json.loads(exp.read_text())
    spec["pixel_size"] = "__PS__"
    exp.write_text(json.dumps(spec).replace('"__PS__"', text_value))
    return exp


# ----------------------------------------------------------------------------- embed


def test_embed_on_a_slide_with_no_whole_tile(ckpt: Path, tmp_path: Path, capsys) -> None:
    for side in (1, 10):
        slide = tmp_path / f"tiny{side}.tif"
        tifffile.imwrite(
            slide,
            np.full((side, side, 3), 120, np.uint8),
            photometric="rgb",
            resolution=(25400 / 0.5, 25400 / 0.5),
            resolutionunit="INCH",
        )
        out = tmp_path / f"tiny{side}.zarr"
        code, err = _embed(slide, ckpt, out, capsys)
        _one_line(code, err, slide, "no tiles")
        assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_embed_with_an_alignment_that_shrinks_the_he(
    synthetic_small: Path, ckpt: Path, tmp_path: Path, capsys
) -> None:
    bundle = _copy_bundle(synthetic_small, tmp_path / "shrunk")
    csv = _scale_alignment(bundle, 1e-5)
    code, err = _embed(bundle, ckpt, tmp_path / "o.zarr", capsys)
    _one_line(code, err, csv, "µm/px", "alignment")
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize(
    ("value", "words"),
    [("1e6", ("between 0.001 and 100", "1000000")), ("Infinity", ("inf",)), ("NaN", ("nan",))],
)
def test_wild_pixel_size_names_experiment_xenium(
    synthetic_small: Path, ckpt: Path, tmp_path: Path, capsys, value: str, words: tuple
) -> None:
    bundle = _copy_bundle(synthetic_small, tmp_path / "ps")
    exp = _set_experiment(bundle, value)
    code, err = _embed(bundle, ckpt, tmp_path / "o.zarr", capsys)
    line = _one_line(code, err, exp, "pixel_size", *words)
    assert "he_image" not in line
    from napari_sigmma.io.xenium import check_xenium_bundle

    with pytest.raises(SigmmaError, match="pixel_size") as e:
        check_xenium_bundle(bundle)
    assert e.value.path == str(exp)


def test_pixel_size_as_text_is_refused(synthetic_small: Path, tmp_path: Path) -> None:
    from napari_sigmma.io.xenium import check_xenium_bundle

    bundle = _copy_bundle(synthetic_small, tmp_path / "pstext")
    exp = _set_experiment(bundle, '"0.2125"')
    with pytest.raises(SigmmaError, match="positive number") as e:
        check_xenium_bundle(bundle)
    assert e.value.path == str(exp)


@pytest.mark.slow  # a local dask cluster of worker processes: ~1-2 min on a busy machine
def test_embed_folder_with_one_corrupt_bundle(
    synthetic_small: Path, ckpt: Path, tmp_path: Path, capsys
) -> None:
    """A folder of two bundles, the second with a damaged count matrix: one error line
    (no dask worker tracebacks before it), exit 2, and no ``out.zarr.parts/`` left."""
    folder = tmp_path / "slides"
    folder.mkdir()
    _copy_bundle(synthetic_small, folder / "a_good")
    bad = _copy_bundle(synthetic_small, folder / "b_bad")
    h5 = bad / "cell_feature_matrix.h5"
    h5.write_bytes(h5.read_bytes()[:200])
    out = tmp_path / "out.zarr"
    code, err = _embed(folder, ckpt, out, capsys)
    _one_line(code, err, h5)
    assert not out.exists() and not (tmp_path / "out.zarr.parts").exists()


def test_embed_out_is_the_data_bundle(
    synthetic_small: Path, ckpt: Path, tmp_path: Path, capsys
) -> None:
    bundle = _copy_bundle(synthetic_small, tmp_path / "bundle")
    before = sorted(p.name for p in bundle.iterdir())
    for out in (bundle, bundle / "emb.zarr"):
        code, err = _embed(bundle, ckpt, out, capsys)
        _one_line(code, err, out, "outside the data")
        assert sorted(p.name for p in bundle.iterdir()) == before


def test_every_cell_off_the_he_is_refused(
    synthetic_small: Path, ckpt: Path, tmp_path: Path, capsys
) -> None:
    """An alignment of another section (the cells land 100,000 px away): refused, naming the
    bundle and hinting at the alignment — not an exit 0 without a cell table."""
    bundle = _copy_bundle(synthetic_small, tmp_path / "offset")
    _scale_alignment(bundle, 1.0, shift=1e5)
    out = tmp_path / "o.zarr"
    code, err = _embed(bundle, ckpt, out, capsys)
    _one_line(code, err, bundle, "none of the", "alignment")
    assert not out.exists()


def test_embed_onto_an_existing_store_says_overwrite_flag(
    synthetic_small: Path, ckpt: Path, tmp_path: Path, capsys
) -> None:
    """An existing store: refused with the CLI's own words (no ``overwrite=True``), kept
    as it was; ``--overwrite`` replaces it; a folder that is not a store is never replaced."""
    out = tmp_path / "e.zarr"
    assert _embed(synthetic_small, ckpt, out, capsys)[0] == 0
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, err = _embed(synthetic_small, ckpt, out, capsys)
    line = _one_line(code, err, out, "--overwrite", "choose another --out")
    assert "overwrite=True" not in line
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    code, err = _embed(synthetic_small, ckpt, out, capsys, "--overwrite")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} != stamp
    mine = tmp_path / "mine.zarr"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, err = _embed(synthetic_small, ckpt, mine, capsys, "--overwrite")
    _one_line(code, err, mine, "not a SpatialData store")
    assert (mine / "notes.txt").read_text() == "keep"


def test_disk_full_while_embedding_is_named(
    synthetic_small: Path, ckpt: Path, tmp_path: Path
) -> None:
    """A 256 KiB tmpfs (a private mount namespace: no root needed) for the store."""
    code, err, left = _in_small_tmpfs(
        tmp_path,
        [
            "embed",
            "--data",
            str(synthetic_small),
            "--checkpoint",
            str(ckpt),
            "--out",
            "{disk}/e.zarr",
            "--quiet",
        ],
        size_kib=256,
    )
    assert code == 2 and len(err) == 1, err  # one line: no traceback, no warnings
    assert "disk full" in err[-1] and "e.zarr" in err[-1], err
    assert left == [], left  # nothing half-written


# ----------------------------------------------------------------------------- readers


def test_duplicate_gene_names_are_refused(synthetic_small: Path, tmp_path: Path) -> None:
    import h5py

    from napari_sigmma.io.xenium import check_xenium_bundle

    bundle = _copy_bundle(synthetic_small, tmp_path / "dupgenes")
    h5 = bundle / "cell_feature_matrix.h5"
    with h5py.File(h5, "r+") as f:
        names = f["matrix/features/name"]
        names[1] = names[0]
        first = names[0].decode()
    with pytest.raises(SigmmaError, match=f"duplicate gene names.*{first}") as e:
        check_xenium_bundle(bundle)
    assert e.value.path == str(h5)


def _rewrite_cells(bundle: Path, change) -> Path:  # type: ignore[no-untyped-def]
    import pandas as pd

    path = bundle / "cells.parquet"
    df = pd.read_parquet(path)
    change(df)
    df.to_parquet(path)
    return path


def test_duplicate_cell_ids_are_refused(synthetic_small: Path, tmp_path: Path) -> None:
    from napari_sigmma.io import load_any

    bundle = _copy_bundle(synthetic_small, tmp_path / "dupids")

    def dup(df) -> None:  # type: ignore[no-untyped-def]
        df.loc[1, "cell_id"] = df.loc[0, "cell_id"]

    path = _rewrite_cells(bundle, dup)
    with pytest.raises(SigmmaError, match="more than once") as e:
        load_any(bundle)
    assert e.value.path == str(path)


def test_nan_centroids_are_refused(synthetic_small: Path, tmp_path: Path) -> None:
    from napari_sigmma.io import load_any

    bundle = _copy_bundle(synthetic_small, tmp_path / "nanxy")

    def nan(df) -> None:  # type: ignore[no-untyped-def]
        df.loc[3, "x_centroid"] = np.nan

    path = _rewrite_cells(bundle, nan)
    with pytest.raises(SigmmaError, match="NaN or infinite centroids") as e:
        load_any(bundle)
    assert e.value.path == str(path)


def test_truncated_cells_parquet_of_a_bundle_still_being_copied(
    synthetic_small: Path, tmp_path: Path
) -> None:
    from napari_sigmma.io import load_any

    bundle = _copy_bundle(synthetic_small, tmp_path / "copying")
    path = bundle / "cells.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SigmmaError) as e:
        load_any(bundle)
    assert e.value.path == str(path)


def test_count_matrix_of_another_run_is_refused(synthetic_small: Path, tmp_path: Path) -> None:
    """Mixed output versions: the count matrix of another run (other cell ids)."""
    import h5py

    from napari_sigmma.io import load_any

    bundle = _copy_bundle(synthetic_small, tmp_path / "mixed")
    h5 = bundle / "cell_feature_matrix.h5"
    with h5py.File(h5, "r+") as f:
        bc = f["matrix/barcodes"]
        bc[0] = b"zzzzzzzz-9"
    with pytest.raises(SigmmaError, match="do not match") as e:
        load_any(bundle)
    assert e.value.path == str(h5)


def test_renamed_he_file_and_empty_alignment(
    synthetic_small: Path, ckpt: Path, tmp_path: Path, capsys
) -> None:
    renamed = _copy_bundle(synthetic_small, tmp_path / "renamed")
    he = next(renamed.glob("*he_image.ome.tif"))
    he.rename(renamed / "slide_final_v2.tif")
    code, err = _embed(renamed, ckpt, tmp_path / "a.zarr", capsys)
    _one_line(code, err, renamed, "no H&E image")

    empty = _copy_bundle(synthetic_small, tmp_path / "emptycsv")
    csv = _alignment_csv(empty)
    csv.write_text("")
    code, err = _embed(empty, ckpt, tmp_path / "b.zarr", capsys)
    _one_line(code, err, csv)


def test_zero_cell_bundle_is_refused(
    synthetic_small: Path, ckpt: Path, tmp_path: Path, capsys
) -> None:
    """The reader path of a bundle whose cell table is empty: refused naming cells.parquet,
    by the reader and by embed (which writes nothing)."""
    from napari_sigmma.io import load_any

    bundle = _copy_bundle(synthetic_small, tmp_path / "nocells")
    path = _rewrite_cells(bundle, lambda df: df.drop(df.index, inplace=True))
    with pytest.raises(SigmmaError, match="no cells") as e:
        load_any(bundle)
    assert e.value.path == str(path)
    code, err = _embed(bundle, ckpt, tmp_path / "z.zarr", capsys)
    _one_line(code, err, path, "no cells")
    assert not (tmp_path / "z.zarr").exists()


def test_one_cell_bundle_warns(synthetic_small: Path, tmp_path: Path) -> None:
    from napari_sigmma.embed.folder import check_embed_input
    from napari_sigmma.io import load_any
    from napari_sigmma.tiles.grid import make_tile_grid
    from napari_sigmma.tiles.paired import PairedSlide

    paired = PairedSlide.from_sdata(load_any(synthetic_small))
    grid = make_tile_grid(paired, tile_px=256, target_mpp=0.5)
    one = PairedSlide(**{**paired.__dict__, "cells_px": paired.cells_px[:1]})
    with pytest.warns(UserWarning, match="only 1 of 1 cells"):
        check_embed_input(one, grid, synthetic_small, has_table=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_embed_input(paired, grid, synthetic_small, has_table=True)


# ----------------------------------------------------------------------------- H&E pixels


def _tif(path: Path, arr: np.ndarray, **kw) -> Path:  # type: ignore[no-untyped-def]
    tifffile.imwrite(path, arr, resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH", **kw)
    return path


def test_rgba_he_drops_alpha_with_a_note(tmp_path: Path) -> None:
    from napari_sigmma.io.wsi import open_slide

    rgba = np.zeros((300, 400, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 150, 7
    path = _tif(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    with pytest.warns(UserWarning, match="alpha channel is dropped"):
        slide = open_slide(path)
    np.testing.assert_array_equal(slide.read_region(0, 0, 8, 8), rgba[:8, :8, :3])


def test_a_note_reaches_the_terminal_as_one_line(tmp_path: Path) -> None:
    """The RGBA note as a user sees it (a fresh process, Python's default warnings): ``check``
    lists it once, naming the file once, with nothing from Python on stderr; and a note that
    a command prints while it works is one line in the CLI's own form."""
    import os
    import warnings

    from napari_sigmma.cli.main import _one_line_warnings

    rgba = np.zeros((300, 400, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 180, 7
    path = _tif(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    res = subprocess.run(
        [sys.executable, "-m", "napari_sigmma", "check", str(path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    notes = [ln for ln in res.stdout.splitlines() if "alpha channel is dropped" in ln]
    assert notes == [f"note: {path}: RGBA image: the alpha channel is dropped and the RGB "
                     "channels are used"], res.stdout  # fmt: skip
    assert not [ln for ln in res.stderr.splitlines() if ln.strip()], res.stderr

    saved = warnings.formatwarning
    try:
        _one_line_warnings("napari-sigmma embed")
        line = warnings.formatwarning(UserWarning(f"{path}: a\nnote"), UserWarning, "x.py", 3)
    finally:
        warnings.formatwarning = saved
    assert line == f"napari-sigmma embed: warning: {path}: a note\n"


@pytest.mark.parametrize(
    ("arr", "kw", "words"),
    [
        (np.zeros((4, 300, 400), np.uint8), {"photometric": "minisblack"}, "4 channels"),
        (np.zeros((300, 400, 3), np.uint16), {"photometric": "rgb"}, "uint16"),
        (np.zeros((300, 400), np.uint8), {"photometric": "minisblack"}, "grayscale"),
        (np.zeros((300, 400, 3), np.float32), {"photometric": "rgb"}, "float32"),
    ],
    ids=["fluorescence-4ch", "16-bit-rgb", "grayscale", "float"],
)
def test_non_rgb8_he_is_refused(
    tmp_path: Path, ckpt: Path, capsys, arr: np.ndarray, kw: dict, words: str
) -> None:
    path = _tif(tmp_path / "he.tif", arr, **kw)
    code, err = _embed(path, ckpt, tmp_path / "o.zarr", capsys)
    _one_line(code, err, path, words)


def test_a_jpeg_named_tif_is_refused(tmp_path: Path, ckpt: Path, capsys) -> None:
    from PIL import Image

    path = tmp_path / "scan.tif"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path, format="JPEG")
    code, err = _embed(path, ckpt, tmp_path / "o.zarr", capsys)
    _one_line(code, err, path, "TIFF")


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("yaml_text", "words"),
    [
        ("batch_size: 2.5\n", "batch_size must be a whole number"),
        ("model:\n  embed_dim: -3\n", "model.embed_dim must be in [1, 65536]"),
        ("split_fractions: [0.9, 0.9, 0.9]\n", "sum to 1"),
        ("", "the config file is empty"),
        ("- epochs: 3\n", "must be a mapping"),
        ("lr: '0.001'\n", "lr must be a number"),
        ("tile_px: 300\n", "tile_px must be one of"),
        ("min_tissue: 1.5\n", "min_tissue must be in [0, 1]"),
        ("model: 5\n", "model must be a mapping"),
        ("epochs: [3\n", "not valid YAML"),
        ("data: 5\n", "data must be a path"),
        ("model:\n  gnn_layers: [2.5, 1, 1]\n", "model.gnn_layers"),
    ],
    ids=[
        "batch-2.5",
        "embed-dim-neg",
        "fractions-2.7",
        "empty",
        "list",
        "lr-text",
        "tile-300",
        "tissue-1.5",
        "model-5",
        "broken-yaml",
        "data-5",
        "gnn-2.5",
    ],
)
def test_bad_yaml_configs_are_one_line_exit_2(
    synthetic_small: Path, tmp_path: Path, capsys, yaml_text: str, words: str
) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    run = tmp_path / "run"
    code, err = _cli(
        ["train", "--data", str(synthetic_small), "--config", str(cfg), "--out", str(run)], capsys
    )
    _one_line(code, err, cfg, words)
    assert not (run / "checkpoints").exists()


def test_config_problems_lists_every_problem() -> None:
    from napari_sigmma.train.config import config_problems

    problems = config_problems(
        {"batch_size": 2.5, "epochs": True, "model": {"embed_dim": -3, "head": "conv"}}
    )
    assert len(problems) == 4, problems
    assert config_problems(TrainConfig().to_dict()) == []


# ----------------------------------------------------------------------------- sample


def test_sample_out_onto_an_existing_file_or_bundle(
    synthetic_small: Path, tmp_path: Path, capsys
) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    code, err = _cli(["sample", "--out", str(f), "--quiet"], capsys)
    _one_line(code, err, f, "existing file")
    assert f.read_text() == "keep me"
    bundle = _copy_bundle(synthetic_small, tmp_path / "bundle")
    before = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    code, err = _cli(["sample", "--synthetic", "--out", str(bundle), "--quiet"], capsys)
    _one_line(code, err, bundle, "not empty")
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == before


def test_disk_full_while_writing_a_sample(tmp_path: Path) -> None:
    code, err, left = _in_small_tmpfs(
        tmp_path,
        ["sample", "--synthetic", "--size", "1024", "--out", "{disk}/s", "--quiet"],
        size_kib=96,
    )
    assert code == 2 and len(err) == 1, err
    assert "disk full" in err[-1] and "{disk}" not in err[-1] and "/s:" in err[-1], err
    assert left == [], left


# ----------------------------------------------------------------------------- other files


def test_run_folder_without_checkpoints(synthetic_small: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    code, err = _embed(synthetic_small, run, tmp_path / "o.zarr", capsys)
    _one_line(code, err, run)


def test_truncated_retrieval_index(tmp_path: Path) -> None:
    from napari_sigmma.retrieval.index import EmbeddingIndex

    index = EmbeddingIndex(8)
    index.add("s", np.arange(100), np.random.default_rng(0).normal(size=(100, 8)))
    path = index.save(tmp_path / "index.npz")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(SigmmaError, match="not a retrieval index") as e:
        EmbeddingIndex.load(path)
    assert e.value.path == str(path)


# ----------------------------------------------------------------------------- fixtures


def _in_small_tmpfs(tmp_path: Path, argv: list[str], *, size_kib: int):  # type: ignore[no-untyped-def]
    """Run ``napari-sigmma ARGV`` with ``{disk}`` a fresh tmpfs of ``size_kib`` KiB, in a
    private user and mount namespace (``unshare -rm``: no root needed); returns the exit
    code, the stderr lines and what is left on the tmpfs afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    args = " ".join(f"'{a.replace('{disk}', str(disk))}'" for a in argv)
    script = (
        f"mount -t tmpfs -o size={size_kib}k tmpfs '{disk}' || exit 99; "
        f"'{sys.executable}' -m napari_sigmma {args}; rc=$?; "
        f"echo LEFT-BEGIN >&2; find '{disk}' -mindepth 1 -maxdepth 1 -printf '%f\\n' >&2; "
        "echo LEFT-END >&2; exit $rc"
    )
    import os

    # Python's default warnings, as on a user's terminal: the CLI itself quiets the
    # third-party notices (cli.main.QUIET_WARNINGS), so stderr must hold the error line only
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    res = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode != 99, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    begin, end = lines.index("LEFT-BEGIN"), lines.index("LEFT-END")
    return res.returncode, lines[:begin], lines[begin + 1 : end]
