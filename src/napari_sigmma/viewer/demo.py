"""``napari-sigmma demo``: napari on the embedded sample with the plugin's widgets.

With ``screenshots`` set, the viewer is shown (a screenshot needs a real, shown window; under
Xvfb that is a virtual screen), screenshots are written there, and the program exits.
"""

from __future__ import annotations

import os
from pathlib import Path


def _process_events(seconds: float = 0.5) -> None:
    import time

    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def save_window_screenshot(viewer: object, path: Path) -> Path:
    """Write a screenshot of the whole napari window (canvas and docks) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _process_events(0.5)
    viewer.screenshot(str(path), canvas_only=False, flash=False)  # type: ignore[attr-defined]
    return path


def run_demo(
    *,
    out: str | os.PathLike[str] | None = None,
    screenshots: str | os.PathLike[str] | None = None,
    train_epochs: int | None = None,
) -> int:
    """Open napari on the embedded sample with the SIGMMA dock.

    Parameters
    ----------
    out
        Cache folder for the generated sample (default: the project cache).
    screenshots
        If given, write screenshots here and exit instead of handing over to the user.
    train_epochs
        Epochs for the demo model when it has to be trained.

    Returns
    -------
    int
        Process exit code.
    """
    import napari

    from napari_sigmma.io.sample import embedded_sample

    sample = embedded_sample(cache_dir=out)
    viewer = napari.Viewer(title="napari-sigmma demo", show=True)
    viewer.window.resize(1500, 950) if hasattr(viewer.window, "resize") else None
    viewer.open(str(sample), plugin="napari-sigmma")
    viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA")
    if screenshots is None:
        napari.run()
        return 0
    folder = Path(screenshots)
    written = [save_window_screenshot(viewer, folder / "01_sample_and_dock.png")]
    for path in written:
        print(f"screenshot: {path}")
    viewer.close()
    return 0
