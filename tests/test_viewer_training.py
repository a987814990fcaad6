"""Training widget in a real viewer: progress, cancel with checkpoint, resume, hand-over."""

from __future__ import annotations

import time
from pathlib import Path

import pytest


@pytest.fixture
def viewer_with_sample(make_napari_viewer, embedded_bundle: Path):
    viewer = make_napari_viewer()
    viewer.open(str(embedded_bundle), plugin="napari-sigmma")
    return viewer


def test_sci_spinbox_keeps_small_learning_rates(qtbot) -> None:
    from napari_sigmma.viewer.training import SciSpinBox

    box = SciSpinBox(1e-3)
    qtbot.addWidget(box)
    box.lineEdit().setText("1e-5")
    box.interpretText()
    assert box.value() == pytest.approx(1e-5)
    assert box.text() == "1e-05"
    box.stepBy(1)
    assert box.value() == pytest.approx(1e-4)


def test_form_errors_are_shown_not_raised(make_napari_viewer, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA training")
    widget.out.setText(str(tmp_path / "run"))
    widget.start()  # nothing opened, no folder chosen
    assert not widget.running
    assert "no data" in widget.status.text()
    for box in widget.scale_boxes.values():
        box.setChecked(False)
    widget.data.setText(str(tmp_path))
    widget.start()
    assert "at least one scale" in widget.status.text()


def test_train_cancel_resume_and_load(viewer_with_sample, qtbot, tmp_path: Path) -> None:
    viewer = viewer_with_sample
    _, widget = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA training")
    run = tmp_path / "run"
    widget.out.setText(str(run))
    widget.epochs.setValue(2)
    widget.batch.setValue(8)
    widget.fast.setChecked(True)
    widget.device.setCurrentText("cpu")
    assert widget.config().data, "the opened sample is the default data"

    widget.start()
    assert widget.running
    # the longest phases come before the first optimiser step: the widget says so at once
    assert widget.phase_label.text() and widget.phase_bar.maximum() == 0  # busy bar
    qtbot.waitUntil(lambda: len(widget.losses) >= 1, timeout=300_000)
    log = widget.progress_log
    first_step = next(i for i, e in enumerate(log) if e[0] == "step")
    before = log[:first_step]
    assert before[0][0] == "preparing"
    # the trainer's own report of the run's steps (and, with a frozen backbone, each
    # feature batch) reached the widget before the first step did
    assert any(e[0] == "steps" and e[2] > 0 for e in before), before
    assert all(b[3] <= log[first_step][3] for b in before)
    t0 = time.monotonic()
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    print(f"cancel took {time.monotonic() - t0:.2f} s")
    assert widget.error is None, widget.error
    assert widget.result.status == "cancelled"
    assert (run / "checkpoints" / "last.pt").is_file()
    steps_before = widget.result.global_step

    widget.resume_box.setChecked(True)
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=600_000)
    assert widget.error is None, widget.error
    assert widget.result.status in {"completed", "early_stopped"}
    assert widget.result.global_step > steps_before
    assert widget.epoch_bar.value() == widget.result.epoch
    # the new checkpoint reached the main dock
    _, dock = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA")
    # the dock loads a checkpoint in a worker (safely) and takes it once it loaded
    qtbot.waitUntil(lambda: not dock.busy, timeout=120_000)
    assert dock.checkpoint is not None and Path(dock.checkpoint).is_file()
    assert Path(dock.checkpoint).parent.parent == run
    assert widget.table.rowCount() >= 1


def test_close_asks_while_training(viewer_with_sample, qtbot, tmp_path: Path) -> None:
    viewer = viewer_with_sample
    _, widget = viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA training")
    widget.out.setText(str(tmp_path / "run"))
    widget.epochs.setValue(50)
    widget.fast.setChecked(True)
    widget.device.setCurrentText("cpu")
    widget.start()
    qtbot.waitUntil(lambda: widget.running, timeout=10_000)
    window = widget.window()  # the napari main window holding the dock
    window.show()  # a shown window (Xvfb), so closing it is visible
    qtbot.waitUntil(window.isVisible, timeout=10_000)
    widget.close_answer = False  # the user says "no, keep training"
    window.close()
    assert widget.running and window.isVisible()
    # let it reach an optimiser step, so "yes" has real progress to keep
    qtbot.waitUntil(lambda: bool(widget.losses), timeout=300_000)
    widget.close_answer = True  # now "yes": training stops with a checkpoint, window closes
    window.close()
    assert not widget.running
    assert not window.isVisible()
    # closed for real, as by the user; napari's Window.close() (the fixture's teardown)
    # skips a window whose _qt_window is gone, as after its own close
    del viewer.window._qt_window
    import torch

    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert last.is_file()
    ck = torch.load(last, map_location="cpu", weights_only=True)
    assert ck["global_step"] >= 1 and ck["epoch"] < 50  # stopped early, progress kept
    assert widget.result is not None and widget.result.status == "cancelled"
