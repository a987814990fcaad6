"""The "SIGMMA check" dock: ``napari-sigmma check`` in the viewer.

Before a long job a user picks a data folder, a slide, a YAML config, a run folder or a
checkpoint; the check (:func:`napari_sigmma.train.check.check_path`, the same function as
the CLI) runs in a worker (progress, Cancel) and lists every problem and note with what to
do. Each problem is also an error notification, each note a warning, both in the CLI's one
line "file: problem" form, so the viewer says what the command line says. The path field
starts at the data of the open layers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    import napari

    from napari_sigmma.train.check import Finding


class CheckWidget(QWidget):
    """Check a data set, slide, config, run folder or checkpoint without training.

    Parameters
    ----------
    napari_viewer
        The viewer (injected by napari); its layers' data folder is the default path.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        from napari_sigmma.viewer.tasks import TaskRunner, watch_window_close

        super().__init__()
        self.viewer = napari_viewer
        self.findings: list[Finding] = []
        self.setObjectName("sigmma-check")
        self.path = QLineEdit(self._default_path())
        self.path.setPlaceholderText("data folder, slide, config.yaml, run folder or .pt")
        self.folder_button = QPushButton("Folder…")
        self.folder_button.clicked.connect(self._choose_folder)
        self.file_button = QPushButton("File…")
        self.file_button.clicked.connect(self._choose_file)
        self.check_button = QPushButton("Check")
        self.check_button.setToolTip(
            "Validate without training, as `napari-sigmma check PATH`: every problem with "
            "what to do"
        )
        self.check_button.clicked.connect(lambda: self.check())
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.verdict = QLabel("")
        self.verdict.setWordWrap(True)
        self.report = QPlainTextEdit()
        self.report.setReadOnly(True)
        self.tasks = TaskRunner(
            progress_bar=self.progress, cancel_button=self.cancel_button, label=self.verdict
        )

        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        row.addWidget(self.path, 1)
        row.addWidget(self.folder_button)
        row.addWidget(self.file_button)
        layout.addLayout(row)
        task_row = QHBoxLayout()
        task_row.addWidget(self.check_button)
        task_row.addWidget(self.progress, 1)
        task_row.addWidget(self.cancel_button)
        layout.addLayout(task_row)
        layout.addWidget(self.verdict)
        layout.addWidget(self.report, 1)
        # closing the window mid-check cancels it and waits for the worker
        self._close_watch = watch_window_close(self, self.tasks.close)

    def closeEvent(self, event: Any) -> None:
        self.tasks.close()
        super().closeEvent(event)

    # ------------------------------------------------------------------ inputs
    def _default_path(self) -> str:
        from napari_sigmma.viewer.session import opened_data_path

        return opened_data_path(self.viewer)

    def _choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Data folder or run folder")
        if path:
            self.path.setText(path)

    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Slide, config or checkpoint")
        if path:
            self.path.setText(path)

    @property
    def busy(self) -> bool:
        """True while a check runs or its result is not handled yet."""
        return self.tasks.busy

    # ------------------------------------------------------------------ check
    def check(self, path: str | None = None) -> Any:
        """Check ``path`` (default: the path field) in a worker; returns the worker."""
        path = (path if path is not None else self.path.text()).strip()
        if not path:
            self.verdict.setText("Choose a data folder, slide, config, run folder or checkpoint.")
            return None
        self.path.setText(path)
        self.report.clear()
        self.findings = []
        task = self.tasks.start(
            _check_steps, path, on_done=lambda f: self._show(path, f), on_error=self._failed
        )
        return task.worker

    def _show(self, path: str, findings: list[Finding]) -> None:
        from napari.utils.notifications import show_error, show_info, show_warning

        self.findings = list(findings)
        problems = [f for f in findings if not f.note]
        notes = len(findings) - len(problems)
        self.report.setPlainText("\n".join(str(f) for f in findings) or "No problem found.")
        verdict = "OK" if not problems else f"{len(problems)} problem(s)"
        self.verdict.setText(f"{path}: {verdict}" + (f", {notes} note(s)" if notes else ""))
        for f in findings:
            (show_warning if f.note else show_error)(f"napari-sigmma check: {f.path}: {f.problem}")
        if not findings:
            show_info(f"napari-sigmma check: {path}: OK")

    def _failed(self, err: BaseException) -> None:
        from napari.utils.notifications import show_error

        self.verdict.setText(f"Check failed: {err}")
        show_error(f"napari-sigmma check failed: {err}")


def _check_steps(path: str, cancel: threading.Event) -> Iterator[tuple[str, int, int]]:
    """Worker: every finding for ``path``."""
    from napari_sigmma.train.check import check_path

    yield f"Checking {Path(path).name}…", 0, 1
    findings = check_path(path)
    yield f"Checked {Path(path).name}", 1, 1
    return findings
