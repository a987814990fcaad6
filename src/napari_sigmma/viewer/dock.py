"""The main SIGMMA dock widget: model state, device, and the entry points to the work.

Every slow step runs in a napari generator worker with a progress bar and a Cancel button:
opening data (``Open data…``: a Xenium bundle, HEST sample, SpatialData ``.zarr`` or slide,
read and turned into layers off the main thread), loading a checkpoint (read with
``weights_only``, model built, hashed) and preparing the live view (slide, grid, engine).
Cancel sets the task's event, checked between those steps (and ``worker.quit()`` stops it at
its next yield); closing the dock or the window cancels and waits, so no thread outlives it.
A checkpoint that cannot be loaded (missing, corrupt, or a pickle that would run code) is
refused with an error naming the file; the previous model and the data layers stay.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_sigmma.device import DEVICE_CHOICES
from napari_sigmma.viewer.session import session_for, show_scale_bar
from napari_sigmma.viewer.tasks import TaskRunner

if TYPE_CHECKING:
    import napari

    from napari_sigmma.viewer.controller import LiveController

NO_MODEL_TEXT = (
    "No model loaded. The data layers work as usual; to see what SIGMMA learned, "
    "load a checkpoint here or train one (napari-sigmma train, or the training widget)."
)
NO_SLIDE_TEXT = (
    "Live SIGMMA needs an H&E layer opened by this plugin (File > Open a Xenium bundle, a "
    "HEST sample or a SpatialData .zarr, or File > Open Sample > SIGMMA)."
)


def find_he_layer(viewer: napari.Viewer) -> Any | None:
    """The H&E image layer the plugin's reader added (metadata ``element == "he_image"``)."""
    for layer in viewer.layers:
        meta = getattr(layer, "metadata", {}) or {}
        if meta.get("element") == "he_image" and meta.get("sdata_path"):
            return layer
    return None


class SigmmaDock(QWidget):
    """Dock widget that owns the plugin's model state for one viewer.

    Parameters
    ----------
    napari_viewer
        The viewer this dock belongs to (injected by napari).
    """

    #: ``(text, done, total)`` of the running task, after each of its steps
    progressed = Signal(str, int, int)

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.checkpoint: str | None = None
        self.run: Any = None  # the loaded LiveRun of ``checkpoint``
        self.controller: LiveController | None = None
        self.session = session_for(napari_viewer)
        show_scale_bar(napari_viewer)  # layers are in µm: say so on the canvas
        self._loader: Any = None  # the worker preparing the live view
        self._model_loader: Any = None  # the worker loading a checkpoint

        self.setObjectName("sigmma-dock")
        title = QLabel("<b>SIGMMA</b> — H&amp;E ↔ spatial transcriptomics")
        self.status = QLabel(NO_MODEL_TEXT)
        self.status.setWordWrap(True)
        self.device = QComboBox()
        self.device.addItems(list(DEVICE_CHOICES))
        self.open_button = QPushButton("Open data…")
        self.open_button.setToolTip(
            "A Xenium bundle, HEST-1k sample or SpatialData .zarr folder (read in the "
            "background; Cancel stops it)"
        )
        self.open_button.clicked.connect(self._choose_data)
        self.load_button = QPushButton("Load checkpoint…")
        self.load_button.clicked.connect(self._choose_checkpoint)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.task_status = QLabel("")
        self.task_status.setWordWrap(True)
        # open data, load model, start live: one runner (progress, Cancel, wait on close)
        self.tasks = TaskRunner(
            progress_bar=self.progress, cancel_button=self.cancel_button, label=self.task_status
        )
        self.tasks.progressed.connect(self.progressed)
        self.live = QCheckBox("Live SIGMMA on the visible tiles")
        self.live.setToolTip(
            "Encode the tiles in view with the loaded model and show clusters, learned "
            "edges, attention heads and predicted genes"
        )
        self.live.toggled.connect(self._on_live_toggled)
        self.k = QSpinBox()
        self.k.setRange(2, 40)
        self.k.setValue(8)
        self.k.setToolTip("Number of clusters (k-means) at every scale")
        self.k.setValue(int(self.session.k))
        self.k.valueChanged.connect(self._on_k_spin)
        self.session.events.k.connect(self._on_session_k)
        self.live_status = QLabel("")
        self.live_status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Device", self.device)
        form.addRow("Clusters k", self.k)
        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addLayout(form)
        buttons = QHBoxLayout()
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.load_button)
        layout.addLayout(buttons)
        task_row = QHBoxLayout()
        task_row.addWidget(self.progress, 1)
        task_row.addWidget(self.cancel_button)
        layout.addLayout(task_row)
        layout.addWidget(self.task_status)
        layout.addWidget(self.status)
        layout.addWidget(self.live)
        layout.addWidget(self.live_status)
        layout.addStretch(1)
        from napari_sigmma.viewer.tasks import watch_window_close

        # closing the napari window mid-task cancels the tasks and waits for them
        self._close_filter = watch_window_close(self, self.close_workers)

    # -- tasks (workers with progress and cancel) -----------------------------------------------
    @property
    def busy(self) -> bool:
        """True while an open / load / start-live task runs or its result is not yet
        handled (on the main thread)."""
        return self.tasks.busy

    def _start_task(
        self,
        steps: Callable[..., Iterator[tuple[str, int, int]]],
        *args: Any,
        on_done: Callable[[Any], None],
        on_error: Callable[[BaseException], None],
    ) -> Any:
        """Run generator ``steps(*args, cancel)`` in a worker: it yields ``(text, done,
        total)`` progress and returns its result, handed to ``on_done`` unless cancelled."""
        return self.tasks.start(steps, *args, on_done=on_done, on_error=on_error)

    def cancel(self, *, wait: bool = False, timeout: float = 30.0) -> None:
        """Cancel every running task (open data, load model, start live); ``wait`` blocks
        until their threads have ended (at most ``timeout`` s)."""
        tasks = list(self.tasks.tasks)
        self.tasks.cancel()
        if wait:
            self.tasks.wait(timeout, tasks)

    # -- data ----------------------------------------------------------------------------------
    def _choose_data(self) -> None:
        path = QFileDialog.getExistingDirectory(
            self, "Xenium bundle, HEST-1k sample or SpatialData .zarr"
        )
        if path:
            self.open_data(path)

    def open_data(self, path: str) -> Any:
        """Read ``path`` (anything :func:`napari_sigmma.io.load_any` reads) in a worker and
        add its layers; returns the worker (Cancel stops it, nothing is added)."""

        def add(layers: list[tuple[Any, ...]]) -> None:
            from napari.layers import Layer

            from napari_sigmma.viewer.hooks import _notify
            from napari_sigmma.viewer.layers import layer_notes

            for data in layers:
                self.viewer.add_layer(Layer.create(*data))
            for note in layer_notes(layers):
                _notify(note)
            self.status.setText(f"Opened {path} ({len(layers)} layers).")

        return self._start_task(
            _open_steps,
            path,
            on_done=add,
            on_error=lambda err: self._report_error(f"could not open it: {err}"),
        )

    def _report_error(self, text: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(f"Error: {text}")
        show_error(f"napari-sigmma {text}")

    # -- model ---------------------------------------------------------------------------------
    def _choose_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "SIGMMA checkpoint", "", "PyTorch checkpoints (*.pt *.pth)"
        )
        if path:
            self.set_checkpoint(path)

    def set_checkpoint(self, path: str) -> Any:
        """Load the checkpoint at ``path`` in a worker (safe load: plain tensors only).

        On success it becomes the model: the live view restarts with it and the overlays
        of the previous model are removed (they would describe another model); on failure
        the status and a notification name the file and the previous model stays. Returns
        the worker.
        """
        for task in (self._model_loader, self._loader):
            if task is not None:
                task.cancel()  # an older model load or live start is obsolete
        self.status.setText(f"Loading model {path}…")
        self.status.setToolTip(str(path))

        def ready(run: Any) -> None:
            from napari_sigmma.viewer.session import model_label

            self._model_loader = None
            # another file, or the same file rewritten (a new run into the same folder)
            changed = self.checkpoint is not None and (
                self.checkpoint != path
                or getattr(self.run, "checkpoint_hash", None)
                != getattr(run, "checkpoint_hash", None)
            )
            self.checkpoint, self.run = path, run
            self.session.checkpoint, self.session.run = path, run
            self.status.setText(f"Model: {model_label(run, path)}")
            self.status.setToolTip(str(path))
            live = self.live.isChecked()
            if live:
                self.stop_live()
            if changed:
                self.clear_overlays()
            if live:
                self.start_live()

        def failed(err: BaseException) -> None:
            self._model_loader = None
            self._report_error(f"could not load the checkpoint: {err}")
            if self.checkpoint is not None:
                self.status.setText(self.status.text() + f" (still using {self.checkpoint})")

        task = self.tasks.start(
            _model_steps,
            path,
            on_done=ready,
            on_error=failed,
            on_finished=lambda: self._forget_model_loader(task),
        )
        self._model_loader = task
        return task.worker

    def _forget_model_loader(self, task: Any) -> None:
        if self._model_loader is task:  # cancelled: neither ready nor failed ran
            self._model_loader = None
            self.status.setText(
                f"Model: {self.session.model_name()}"
                if self.checkpoint is not None
                else NO_MODEL_TEXT
            )

    def clear_overlays(self) -> None:
        """Remove the SIGMMA overlay layers (after a model change they are stale: each
        records the run and checkpoint hash that made it; the live view, when on, draws
        new ones with the new model)."""
        stale = [
            ly
            for ly in self.viewer.layers
            if (getattr(ly, "metadata", {}) or {}).get("sigmma_kind")
        ]
        for layer in stale:
            self.viewer.layers.remove(layer)

    # -- live view -----------------------------------------------------------------------------
    def _on_live_toggled(self, on: bool) -> None:
        if on:
            self.start_live()
        else:
            self.stop_live()

    def _on_k_spin(self, k: int) -> None:
        self.session.k = int(k)  # the session forwards it to the live controller

    def _on_session_k(self, k: int) -> None:
        if self.k.value() != int(k):
            self.k.blockSignals(True)
            self.k.setValue(int(k))
            self.k.blockSignals(False)

    def _say(self, text: str) -> None:
        self.live_status.setText(text)

    def start_live(self) -> None:
        """Load the slide (and the model if needed) in a worker, then follow the camera.

        While a checkpoint is still loading, the live view starts when it is ready.
        """
        if self._model_loader is not None:
            self._say("Waiting for the model to load…")
            return
        layer = find_he_layer(self.viewer)
        if self.checkpoint is None:
            self._say(NO_MODEL_TEXT)
            self.viewer.status = NO_MODEL_TEXT
            return
        if layer is None:
            self._say(NO_SLIDE_TEXT)
            return
        self._say("Loading the model and the slide…")
        device = self.device.currentText()
        run = self.run if self.run is not None else self.checkpoint
        self._loader = self.tasks.start(
            _live_steps,
            run,
            layer.metadata["sdata_path"],
            device,
            on_done=lambda out, ly=layer: self._live_ready(ly, *out),
            on_error=lambda err: self._say(f"Could not start: {err}"),
        )

    def _live_ready(self, layer: Any, engine: Any, gene_head: Any) -> None:
        from napari_sigmma.viewer.controller import LiveController

        self._loader = None
        if not self.live.isChecked() or layer not in self.viewer.layers:
            return
        s = self.session
        self.controller = LiveController(
            self.viewer,
            layer,
            engine,
            k=int(s.k),
            gene_head=gene_head,
            genes=list(s.genes) or None,
        )
        self.controller.status_changed.connect(self._say)
        s.controller = self.controller
        if s.colour_by:  # what the cells were coloured by before (another model, say)
            self.controller.set_colour_by(s.colour_by)
        self._say(self.controller.status or "Live SIGMMA on.")

    def stop_live(self) -> None:
        """Stop the live view (workers cancelled; layers stay)."""
        if self._loader is not None:
            self._loader.cancel()
        self._loader = None
        self._close_controller()
        self._say("")

    def _close_controller(self) -> None:
        if self.controller is not None:
            if self.session.controller is self.controller:
                self.session.controller = None
            self.controller.close()
            self.controller = None

    def close_workers(self, timeout: float = 30.0) -> None:
        """Cancel every task and the live view, and wait for their threads (the dock is
        closing: what they still report is ignored)."""
        self.tasks.close(timeout)
        self._model_loader = self._loader = None
        self._close_controller()
        self.session.events.k.disconnect(self._on_session_k)

    def closeEvent(self, event: Any) -> None:
        self.close_workers()
        super().closeEvent(event)


# -- worker steps (generators: yield progress, check the cancel event between steps) ----------
def _open_steps(path: str, cancel: threading.Event) -> Iterator[tuple[str, int, int]]:
    """Worker: read ``path`` and build its layer data."""
    from napari_sigmma.viewer.hooks import layers_for

    yield f"Reading {path}…", 0, 1
    layers = layers_for(path, cancel=cancel)
    yield f"Read {path}", 1, 1
    return layers


def _model_steps(path: str, cancel: threading.Event) -> Iterator[tuple[str, int, int]]:
    """Worker: the checkpoint's :class:`~napari_sigmma.live.run.LiveRun`."""
    from napari_sigmma.live.run import load_live_run

    yield f"Loading model {path}…", 0, 1
    run = load_live_run(path, cancel=cancel)
    yield f"Loaded model {path}", 1, 1
    return run


def _live_steps(
    run: Any, sdata_path: str, device: str, cancel: threading.Event
) -> Iterator[tuple[str, int, int]]:
    """Worker: run (a LiveRun, or a checkpoint to load), slide, grid, engine (disk cache
    next to the data); returns ``(engine, gene_head)``."""
    from napari_sigmma.errors import check_cancel
    from napari_sigmma.io import load_any, slide_name
    from napari_sigmma.live.cache import default_cache_root
    from napari_sigmma.live.run import load_live_run
    from napari_sigmma.tiles.paired import PairedSlide

    if not hasattr(run, "engine"):
        yield "Loading the model…", 0, 3
        run = load_live_run(run, cancel=cancel)
    yield "Reading the slide…", 1, 3
    sdata = load_any(sdata_path, cancel=cancel)
    paired = PairedSlide.from_sdata(sdata, name=slide_name(sdata_path))
    check_cancel(cancel)
    yield "Preparing the tile grid and the engine…", 2, 3
    engine = run.engine(paired, device=device, cache_dir=default_cache_root(sdata_path))
    check_cancel(cancel)
    yield "Live view ready", 3, 3
    return engine, run.gene_head
