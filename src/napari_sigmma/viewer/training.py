"""Training dock widget: a form over :func:`napari_sigmma.train.loop.train`.

The trainer runs in a napari ``thread_worker``; its callbacks (called in the worker thread)
emit Qt signals, which Qt queues to the main thread, where the progress bars and the live
plot update. Cancel sets the trainer's cancel event: it stops after the current step and
writes a checkpoint. While a run is going, closing the napari window asks first.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_sigmma.constants import SCALES
from napari_sigmma.device import DEVICE_CHOICES

if TYPE_CHECKING:
    import napari

BACKBONES = ("efficientnet_lite0", "vit_tiny", "vit_small", "resnet50", "uni", "uni2-h")


class SciSpinBox(QDoubleSpinBox):
    """A float spin box that shows and accepts scientific notation (``1e-05``).

    Qt's (and magicgui's) default float box rounds to 2 decimals, which turns a
    fine-tuning learning rate into 0.
    """

    def __init__(self, value: float = 1e-3, *, minimum: float = 1e-9, maximum: float = 10.0):
        super().__init__()
        self.setDecimals(12)
        self.setRange(minimum, maximum)
        self.setValue(value)
        self.setKeyboardTracking(False)

    def textFromValue(self, value: float) -> str:
        return f"{value:.3g}"

    def valueFromText(self, text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int) -> tuple[Any, str, int]:
        from qtpy.QtGui import QValidator

        try:
            float(text)
            return (QValidator.State.Acceptable, text, pos)
        except ValueError:
            partial = text.lower().rstrip("e+-.") or "0"
            try:
                float(partial)
                return (QValidator.State.Intermediate, text, pos)
            except ValueError:
                return (QValidator.State.Invalid, text, pos)

    def stepBy(self, steps: int) -> None:
        # step by decades: 1e-4 -> 1e-3 -> 1e-2
        self.setValue(self.value() * (10.0**steps))


class _Bridge(QObject):
    """Carries trainer callbacks from the worker thread to the main thread."""

    step = Signal(int, int, float, object)
    epoch = Signal(int, object)
    checkpoint = Signal(str)
    phase = Signal(str, int, int)  # (phase, done, total) before the first step


class _Callbacks:
    def __init__(self, bridge: _Bridge) -> None:
        self.bridge = bridge

    def on_features(self, done: int, total: int) -> None:
        self.bridge.phase.emit("features", int(done), int(total))

    def on_train_start(self, total_steps: int, done_steps: int) -> None:
        self.bridge.phase.emit("steps", int(done_steps), int(total_steps))

    def on_step(self, step: int, epoch: int, loss: float, parts: dict[str, float]) -> None:
        self.bridge.step.emit(step, epoch, float(loss), dict(parts))

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.bridge.epoch.emit(epoch, dict(metrics))

    def on_checkpoint(self, path: Path) -> None:
        self.bridge.checkpoint.emit(str(path))


class TrainingWidget(QWidget):
    """Launch training or fine-tuning of SIGMMA from napari.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.setObjectName("sigmma-training")
        self._task: Any = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.losses: list[tuple[int, float]] = []
        self.val: dict[str, list[tuple[int, float]]] = {s: [] for s in SCALES}
        self.close_answer: bool | None = None  # tests set this instead of clicking
        self.switch_answer: bool | None = None  # "use the new model?" (tests set it)
        #: ``(phase, done, total, seconds since start)`` of every progress report: the
        #: preparation, each feature pre-computation batch, the step count, each step
        self.progress_log: list[tuple[str, int, int, float]] = []
        self._t_start = 0.0
        self._phase_t0: dict[str, tuple[float, int]] = {}
        self._bridge = _Bridge()
        self._bridge.step.connect(self._on_step)
        self._bridge.epoch.connect(self._on_epoch)
        self._bridge.checkpoint.connect(self._on_checkpoint)
        self._bridge.phase.connect(self._on_phase)
        self._build()
        from napari_sigmma.viewer.tasks import TaskRunner, watch_window_close

        self.tasks = TaskRunner(cancel_button=self.cancel_button)
        # closing the napari window while training runs asks first (a "no" keeps it open)
        self._close_watch = watch_window_close(self, self._on_window_close)

    # ------------------------------------------------------------------ form
    def _build(self) -> None:
        self.data = QLineEdit()
        self.data.setPlaceholderText("Xenium / HEST folder or .zarr (default: the opened one)")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_data)
        data_row = QHBoxLayout()
        data_row.addWidget(self.data)
        data_row.addWidget(browse)

        self.backbone = QComboBox()
        self.backbone.addItems(list(BACKBONES))
        self.backbone_ckpt = QLineEdit()
        self.backbone_ckpt.setPlaceholderText("backbone weights (UNI pytorch_model.bin), optional")
        self.finetune = QComboBox()
        self.finetune.addItems(["frozen", "last_k", "full"])
        self.last_k = QSpinBox()
        self.last_k.setRange(1, 48)
        self.last_k.setValue(2)
        self.scale_boxes = {s: QCheckBox(s) for s in SCALES}
        scales_row = QHBoxLayout()
        for box in self.scale_boxes.values():
            box.setChecked(True)
            scales_row.addWidget(box)
        self.use_graph = QCheckBox("cell graph")
        self.use_graph.setChecked(True)
        self.sparsify = QCheckBox("edge sparsification")
        self.sparsify.setChecked(True)
        abl_row = QHBoxLayout()
        abl_row.addWidget(self.use_graph)
        abl_row.addWidget(self.sparsify)
        self.fast = QCheckBox("fast multi-crop (one pass per tile)")
        self.fast.setToolTip(
            "Beyond the paper: one backbone pass per tile with token pooling per micro/meso/"
            "macro region instead of 21 resized crops (about 20x fewer backbone inputs)"
        )
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 10_000)
        self.epochs.setValue(3)
        self.batch = QSpinBox()
        self.batch.setRange(2, 4096)
        self.batch.setValue(16)
        self.lr = SciSpinBox(1e-3)
        self.tile_px = QComboBox()
        self.tile_px.addItems(["256", "224", "512"])
        self.mpp = QDoubleSpinBox()
        self.mpp.setDecimals(3)
        self.mpp.setRange(0.05, 10.0)
        self.mpp.setValue(0.5)
        self.device = QComboBox()
        self.device.addItems(list(DEVICE_CHOICES))
        self.out = QLineEdit(str(Path.home() / "sigmma-runs" / "run"))
        self.resume_box = QCheckBox("resume the run in this folder")

        form = QFormLayout()
        form.addRow("Data", data_row)
        form.addRow("Backbone", self.backbone)
        form.addRow("Weights", self.backbone_ckpt)
        form.addRow("Fine-tuning", self.finetune)
        form.addRow("Last k blocks", self.last_k)
        form.addRow("Scales", scales_row)
        form.addRow("Ablations", abl_row)
        form.addRow("", self.fast)
        form.addRow("Epochs", self.epochs)
        form.addRow("Batch size", self.batch)
        form.addRow("Learning rate", self.lr)
        form.addRow("Tile px", self.tile_px)
        form.addRow("µm / px", self.mpp)
        form.addRow("Device", self.device)
        form.addRow("Output folder", self.out)
        form.addRow("", self.resume_box)

        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(lambda: self.cancel(wait=False))
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)

        self.epoch_bar = QProgressBar()
        self.epoch_bar.setFormat("epoch %v / %m")
        # the current phase (preparing data, pre-computing features, optimiser steps)
        self.phase_bar = QProgressBar()
        self.phase_bar.setFormat("%v / %m")
        self.phase_label = QLabel("")
        self.phase_label.setWordWrap(True)
        self.step_label = QLabel("")
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.6), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax_loss = self.figure.add_subplot(121)
        self.ax_val = self.figure.add_subplot(122)
        self._draw_plot()

        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["scale", "HE→ST R@5%", "ST→HE R@5%"])

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.phase_label)
        layout.addWidget(self.phase_bar)
        layout.addWidget(self.epoch_bar)
        layout.addWidget(self.step_label)
        layout.addWidget(self.status)
        layout.addWidget(self.canvas)
        layout.addWidget(self.table)

    def _browse_data(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Xenium bundle, HEST sample or .zarr")
        if path:
            self.data.setText(path)

    def _on_window_close(self) -> bool:
        """The window is closing: ask while training runs (``False`` keeps it open)."""
        if not self.running:
            return True
        if not self.confirm_close():
            return False
        self.cancel(wait=True)
        return True

    # ------------------------------------------------------------------ config
    def _default_data(self) -> str:
        from napari_sigmma.viewer.session import opened_data_path

        return opened_data_path(self.viewer)

    def config(self) -> Any:
        """The :class:`TrainConfig` the form describes."""
        from napari_sigmma.errors import SigmmaError
        from napari_sigmma.models.config import ModelConfig
        from napari_sigmma.train.config import TrainConfig

        data = self.data.text().strip() or self._default_data()
        if not data:
            raise SigmmaError("no data: open a Xenium/HEST sample or choose a folder")
        scales = tuple(s for s, box in self.scale_boxes.items() if box.isChecked())
        if not scales:
            raise SigmmaError("choose at least one scale")
        model = ModelConfig(
            backbone=self.backbone.currentText(),
            checkpoint=self.backbone_ckpt.text().strip() or None,
            finetune=self.finetune.currentText(),
            last_k=self.last_k.value(),
            scales=scales,
            use_graph=self.use_graph.isChecked(),
            sparsify=self.sparsify.isChecked(),
            fast_multicrop=self.fast.isChecked(),
        )
        return TrainConfig(
            data=[data],
            run_dir=self.out.text().strip(),
            tile_px=int(self.tile_px.currentText()),
            target_mpp=self.mpp.value(),
            epochs=self.epochs.value(),
            batch_size=self.batch.value(),
            lr=self.lr.value(),
            device=self.device.currentText(),
            model=model,
        )

    # ------------------------------------------------------------------ run
    @property
    def running(self) -> bool:
        """True while a training worker is alive (until its end is handled)."""
        return self._task is not None

    def start(self, *, resume: bool | None = None) -> None:
        """Start (or resume) training in a background worker."""
        import time

        from napari_sigmma.errors import SigmmaError

        if self.running:
            return
        try:
            cfg = self.config()
        except SigmmaError as err:
            self._notify_error(err)
            return
        resume = self.resume_box.isChecked() if resume is None else resume
        self.result, self.error = None, None
        self.losses.clear()
        self.progress_log.clear()
        self._phase_t0.clear()
        for v in self.val.values():
            v.clear()
        self.epoch_bar.setRange(0, cfg.epochs)
        self.epoch_bar.setValue(0)
        self.status.setText(("Resuming" if resume else "Training") + f" → {cfg.run_dir}")
        callbacks = _Callbacks(self._bridge)

        def job(cancel: threading.Event) -> Any:
            from napari_sigmma.train.loop import train

            return train(cfg, callbacks=[callbacks], cancel=cancel, resume=resume)

        self._t_start = time.monotonic()
        self._task = self.tasks.start(
            job,
            on_done=self._on_done,
            on_error=self._on_error,
            on_cancelled=lambda: None,  # the trainer returns "cancelled" with a checkpoint
            keep_result=True,
            on_finished=self._on_finished,
        )
        # the first phase (reading the data, building tiles and graphs) reports nothing
        # until it ends: say so at once, with a busy bar
        self._on_phase("preparing", 0, 0)
        self.start_button.setEnabled(False)

    def cancel(self, *, wait: bool = False, timeout: float = 30.0) -> None:
        """Ask the trainer to stop after this step (it writes a checkpoint)."""
        if not self.running:
            return
        self._task.cancel_event.set()  # not quit(): the trainer saves, then returns
        self.status.setText("Cancelling after this step…")
        if wait:
            from qtpy.QtCore import QCoreApplication, QElapsedTimer

            timer = QElapsedTimer()
            timer.start()
            while self.running and timer.elapsed() < timeout * 1000:
                QCoreApplication.processEvents()
                threading.Event().wait(0.01)

    def confirm_close(self) -> bool:
        """Ask whether to stop training and close (tests preset ``close_answer``)."""
        if self.close_answer is not None:
            return self.close_answer
        answer = QMessageBox.question(
            self,
            "SIGMMA training is running",
            "Training is running. Stop it (a checkpoint is saved) and close?",
        )
        return answer == QMessageBox.StandardButton.Yes

    # ------------------------------------------------------------------ callbacks
    def _on_phase(self, phase: str, done: int, total: int) -> None:
        """Progress of a phase before the first optimiser step, with an ETA."""
        import time

        self.progress_log.append((phase, int(done), int(total), time.monotonic() - self._t_start))
        self._phase_text(phase, done, total)

    def _phase_text(self, phase: str, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        t0, d0 = self._phase_t0.setdefault(phase, (now, int(done)))
        names = {
            "preparing": "Preparing the data (reading the slide, tiles and cell graphs)…",
            "features": "Pre-computing backbone features",
            "steps": "Optimiser steps",
        }
        text = names.get(phase, phase)
        if total > 0:
            text += f": {done} / {total}"
            if done > d0 and now > t0:
                eta = (now - t0) / (done - d0) * (total - done)
                text += f", about {_duration(eta)} left"
        self.phase_label.setText(text)
        self.phase_bar.setRange(0, max(int(total), 0))
        self.phase_bar.setValue(int(done) if total > 0 else 0)

    def _on_step(self, step: int, epoch: int, loss: float, parts: dict[str, float]) -> None:
        import time

        self.progress_log.append(("step", int(step), 0, time.monotonic() - self._t_start))
        self.losses.append((step, loss))
        self.step_label.setText(f"epoch {epoch + 1}, step {step}: loss {loss:.3f}")
        if "steps" in self._phase_t0 and self.phase_bar.maximum() > 0:
            self._phase_text("steps", step, self.phase_bar.maximum())
        if len(self.losses) % 5 == 1:
            self._draw_plot()

    def _on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epoch_bar.setValue(epoch + 1)
        for s in SCALES:
            key = f"{s}/he2st@5"
            if key in metrics and math.isfinite(metrics[key]):
                self.val[s].append((epoch + 1, float(metrics[key])))
        self._draw_plot()

    def _on_checkpoint(self, path: str) -> None:
        self.status.setText(f"checkpoint: {path}")

    def _on_done(self, result: Any) -> None:
        self.result = result
        msg = f"{result.status}: {result.epoch} epoch(s), {result.global_step} steps"
        if result.status == "cancelled":
            msg += " — tick 'resume' and Start to continue"
        self.status.setText(msg)
        self._fill_table(result.test_metrics or result.val_metrics)
        ckpt = result.best_checkpoint or result.last_checkpoint
        if ckpt and result.status != "cancelled":
            self._load_into_viewer(str(ckpt))

    def _on_error(self, err: BaseException) -> None:
        self.error = err
        self._notify_error(err)

    def _on_finished(self) -> None:
        self._task = None
        self.start_button.setEnabled(True)
        self._draw_plot()

    def _notify_error(self, err: BaseException) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(f"Error: {err}")
        show_error(f"SIGMMA training: {err}")

    # ------------------------------------------------------------------ outputs
    def _draw_plot(self) -> None:
        self.ax_loss.clear()
        self.ax_val.clear()
        self.ax_loss.set_title("training loss", fontsize=8)
        self.ax_val.set_title("val HE→ST R@5%", fontsize=8)
        if self.losses:
            steps, losses = zip(*self.losses, strict=True)
            self.ax_loss.plot(steps, losses, lw=1)
        for s, pts in self.val.items():
            if pts:
                e, r = zip(*pts, strict=True)
                self.ax_val.plot(e, r, marker="o", ms=3, label=s)
        # chance for recall@5 %: a random ranking puts the partner in the top 5 % 5 % of
        # the time
        self.ax_val.axhline(0.05, color="grey", ls="--", lw=0.8, label="chance")
        self.ax_val.set_ylim(0.0, 1.0)
        self.ax_val.set_xlabel("epoch", fontsize=6)
        self.ax_loss.set_xlabel("step", fontsize=6)
        self.ax_val.legend(fontsize=6)
        for ax in (self.ax_loss, self.ax_val):
            ax.tick_params(labelsize=6)
        self.canvas.draw_idle()

    def _fill_table(self, metrics: dict[str, float]) -> None:
        rows = [s for s in SCALES if f"{s}/he2st@5" in metrics]
        self.table.setRowCount(len(rows))
        for i, s in enumerate(rows):
            self.table.setItem(i, 0, QTableWidgetItem(s))
            self.table.setItem(i, 1, QTableWidgetItem(f"{metrics[f'{s}/he2st@5']:.3f}"))
            self.table.setItem(i, 2, QTableWidgetItem(f"{metrics[f'{s}/st2he@5']:.3f}"))

    def _load_into_viewer(self, checkpoint: str) -> None:
        """Hand the new checkpoint to the main SIGMMA dock (its live overlays refresh),
        asking first when the dock already explores another model."""
        from napari_sigmma.viewer.session import session_for

        current = session_for(self.viewer).checkpoint
        if current is not None and current != checkpoint and not self.confirm_switch(checkpoint):
            self.status.setText(self.status.text() + f" — new model kept aside: {checkpoint}")
            return
        try:
            _, dock = self.viewer.window.add_plugin_dock_widget("napari-sigmma", "SIGMMA")
        except (AttributeError, KeyError, ValueError):
            return
        dock.set_checkpoint(checkpoint)

    def confirm_switch(self, checkpoint: str) -> bool:
        """Ask whether the live view should switch to the new model (tests preset
        ``switch_answer``)."""
        if self.switch_answer is not None:
            return self.switch_answer
        answer = QMessageBox.question(
            self,
            "SIGMMA training finished",
            f"Training wrote {checkpoint}.\nSwitch the live view to this model? (Its "
            "overlays of the current model are removed.)",
        )
        return answer == QMessageBox.StandardButton.Yes


def _duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min"``, ``"1 h 05 min"``."""
    s = max(0.0, float(seconds))
    if s < 90:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
