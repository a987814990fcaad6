"""One worker runner for every SIGMMA widget: progress, cancel, wait, dask-pool release.

Each widget (the dock, retrieval, training, the live controller) owns a :class:`TaskRunner`.
:meth:`TaskRunner.start` runs ``fn(*args, cancel)`` in a napari worker thread (a
``GeneratorWorker`` when ``fn`` is a generator function: it yields progress or batches,
``worker.quit()`` stops it at its next yield) and keeps a :class:`Task` until the main thread
has handled its end. Cancel sets the task's event (checked by the work between steps) and
quits the worker. As the worker's run ends, in the worker thread itself (direct
connections), dask's thread pool of that thread is released
(:func:`napari_sigmma.io.release_thread_dask_pool`) and the task's ``done`` event is set,
so :meth:`TaskRunner.wait` blocks without an event loop. After :meth:`TaskRunner.close`
(the widget or window is closing) nothing a late worker reports reaches the widget.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, Qt, Signal

from napari_sigmma.io import release_thread_dask_pool

#: What a progress-yielding generator yields: ``(text, done, total)``; ``total == 0``
#: shows a busy bar.
Progress = tuple[str, int, int]


class Task:
    """One running piece of work: its worker, cancel event and done event.

    Attributes
    ----------
    worker
        The napari ``GeneratorWorker`` / ``FunctionWorker``.
    cancel_event
        Set by :meth:`cancel`; the work checks it between steps.
    done
        Set in the worker thread as its run ends.
    tag
        Free label (``"encode"``, ``"refit"``, …) so a runner can cancel one kind of task.
    """

    def __init__(
        self, worker: Any, cancel_event: threading.Event, tag: str, generator: bool = True
    ) -> None:
        self.worker = worker
        self.generator = generator
        self.cancel_event = cancel_event
        self.done = threading.Event()
        self.tag = tag

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        """Ask the work to stop at its next check (and a generator at its next yield)."""
        self.cancel_event.set()
        if self.generator:  # a quit FunctionWorker would only drop its return value
            try:
                self.worker.quit()
            except RuntimeError:  # already deleted
                pass


class TaskRunner(QObject):
    """Runs a widget's background work and shows its progress.

    Parameters
    ----------
    progress_bar, cancel_button, label
        Optional widgets the runner drives: the bar shows the last ``(text, done, total)``
        reported, the label its text, the button is enabled while a task with
        ``show=True`` runs; both are reset when the last such task ends.
    """

    #: ``(text, done, total)`` of every progress report
    progressed = Signal(str, int, int)
    #: emitted (main thread) when the last task has ended
    idle = Signal()

    def __init__(
        self,
        *,
        progress_bar: Any = None,
        cancel_button: Any = None,
        label: Any = None,
    ) -> None:
        super().__init__()
        self.tasks: list[Task] = []
        self.closed = False
        self.progress_bar = progress_bar
        self.cancel_button = cancel_button
        self.label = label
        self._shown: set[Task] = set()
        if cancel_button is not None:
            cancel_button.setEnabled(False)
            cancel_button.clicked.connect(lambda *_: self.cancel())

    # -- running ---------------------------------------------------------------------------
    def start(
        self,
        fn: Callable[..., Any],
        *args: Any,
        on_yield: Callable[[Any], None] | None = None,
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_cancelled: Callable[[], None] | None = None,
        on_finished: Callable[[], None] | None = None,
        tag: str = "",
        show: bool = True,
        progress: bool | None = None,
        keep_result: bool = False,
    ) -> Task:
        """Run ``fn(*args, cancel)`` in a worker thread.

        Parameters
        ----------
        fn
            A function or generator function; ``cancel`` (a :class:`threading.Event`) is
            passed as its last argument.
        on_yield
            Each yielded item (main thread). Default for progress generators: the bar.
        on_done
            The return value, unless the task was cancelled or the runner closed.
        on_error
            An exception other than a cancellation.
        on_cancelled
            The task was cancelled (its event set, a :class:`Cancelled` raised, or the
            generator quit). Default: the label says "Cancelled.".
        on_finished
            Always, last (main thread), unless the runner was closed.
        tag
            Label for :meth:`cancel` (``tag=``).
        show
            Drive the progress bar and Cancel button for this task.
        progress
            Treat yielded items as ``(text, done, total)`` progress (default: when
            ``on_yield`` is not given).
        keep_result
            Hand the return value to ``on_done`` even after a cancel (work that stops
            cleanly and reports how far it got, like the trainer).
        """
        from napari.qt.threading import FunctionWorker, GeneratorWorker

        from napari_sigmma.errors import Cancelled

        cancel = threading.Event()
        gen = inspect.isgeneratorfunction(fn)
        worker = (GeneratorWorker if gen else FunctionWorker)(fn, *args, cancel)
        task = Task(worker, cancel, tag, generator=gen)
        as_progress = on_yield is None if progress is None else progress

        def yielded(item: Any) -> None:
            if self.closed:
                return
            if as_progress:
                self.report(*item)
            if on_yield is not None:
                on_yield(item)

        def returned(out: Any) -> None:
            if self.closed or on_done is None or (cancel.is_set() and not keep_result):
                return
            on_done(out)

        def errored(err: BaseException) -> None:
            if self.closed:
                return
            if isinstance(err, Cancelled) or cancel.is_set():
                self._cancelled(on_cancelled)
            elif on_error is not None:
                on_error(err)
            else:
                self.say(f"Failed: {err}")

        def aborted() -> None:
            if not self.closed:
                self._cancelled(on_cancelled)

        if gen:
            worker.yielded.connect(yielded)
            worker.aborted.connect(aborted)
        worker.returned.connect(returned)
        worker.errored.connect(errored)
        # in the worker thread as its run ends: free dask's pool for this thread, then mark
        # it done (wait() needs no event loop)
        worker.finished.connect(release_thread_dask_pool, Qt.ConnectionType.DirectConnection)
        worker.finished.connect(task.done.set, Qt.ConnectionType.DirectConnection)
        worker.finished.connect(lambda: self._ended(task, on_finished))
        self.tasks.append(task)
        if show:
            self._shown.add(task)
            if self.progress_bar is not None:
                self.progress_bar.setRange(0, 0)
                self.progress_bar.setVisible(True)
            if self.cancel_button is not None:
                self.cancel_button.setEnabled(True)
        worker.start()
        return task

    def _cancelled(self, on_cancelled: Callable[[], None] | None) -> None:
        if on_cancelled is not None:
            on_cancelled()
        else:
            self.say("Cancelled.")

    def _ended(self, task: Task, on_finished: Callable[[], None] | None) -> None:
        if task in self.tasks:
            self.tasks.remove(task)
        self._shown.discard(task)
        if self.closed:
            return
        if on_finished is not None:
            on_finished()
        if not self._shown:
            if self.progress_bar is not None:
                self.progress_bar.setVisible(False)
            if self.cancel_button is not None:
                self.cancel_button.setEnabled(False)
        if not self.tasks:
            self.idle.emit()

    # -- progress --------------------------------------------------------------------------
    def report(self, text: str, done: int, total: int) -> None:
        """Show ``(text, done, total)`` on the bar and label and emit :attr:`progressed`."""
        if self.closed:
            return
        if self.progress_bar is not None:
            self.progress_bar.setVisible(True)
            self.progress_bar.setRange(0, int(total))
            self.progress_bar.setValue(int(done))
        self.say(text)
        self.progressed.emit(str(text), int(done), int(total))

    def say(self, text: str) -> None:
        if self.label is not None and not self.closed:
            self.label.setText(text)

    # -- state -----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while a task runs or its end is not yet handled on the main thread."""
        return bool(self.tasks)

    @property
    def running(self) -> bool:
        """True while a task's thread has not finished its run."""
        return any(not t.done.is_set() for t in self.tasks)

    def find(self, tag: str) -> list[Task]:
        return [t for t in self.tasks if t.tag == tag]

    # -- stopping --------------------------------------------------------------------------
    def cancel(self, task: Task | None = None, *, tag: str | None = None) -> None:
        """Cancel ``task``, the tasks tagged ``tag``, or (neither given) every task."""
        if task is not None:
            targets = [task]
        elif tag is not None:
            targets = self.find(tag)
        else:
            targets = list(self.tasks)
        for t in targets:
            t.cancel()
        if targets and task is None and tag is None:
            self.say("Cancelling…")

    def wait(self, timeout: float = 30.0, tasks: list[Task] | None = None) -> bool:
        """Block until the tasks' threads have ended (at most ``timeout`` s in all);
        True when they all did."""
        pending = list(self.tasks if tasks is None else tasks)
        end = time.monotonic() + timeout
        for t in pending:
            t.done.wait(max(0.0, end - time.monotonic()))
        if pending:
            from qtpy.QtCore import QThreadPool

            # ``done`` is set as the runnable's last slot runs; let it return to the pool
            QThreadPool.globalInstance().waitForDone(1000)
        return all(t.done.is_set() for t in pending)

    def close(self, timeout: float = 30.0) -> None:
        """Cancel every task, wait for their threads, and ignore what they still report."""
        tasks = list(self.tasks)
        self.closed = True
        for t in tasks:
            t.cancel()
        self.wait(timeout, tasks)
        self.tasks.clear()
        self._shown.clear()


# -- the window closing ----------------------------------------------------------------------
class _CloseFilter(QObject):
    """Calls ``callback`` when the watched window gets a Close event; a ``callback`` that
    returns ``False`` vetoes the close (the event is ignored)."""

    def __init__(self, callback: Callable[[], Any]) -> None:
        super().__init__()
        self._callback = callback

    def eventFilter(self, obj: QObject, event: Any) -> bool:
        from qtpy.QtCore import QEvent

        if event.type() == QEvent.Type.Close:
            try:
                veto = self._callback() is False
            except RuntimeError:  # the widget behind ``callback`` is already deleted
                veto = False
            if veto:
                event.ignore()
                return True
        return False


class WindowCloseWatch(QObject):
    """Calls ``callback`` when the top-level window holding ``widget`` is about to close.

    napari has no public "window closing" event, and a dock widget only learns which
    window holds it once napari docks it: this watches the widget's parent changes (Qt's
    public ``QWidget.window()``) and puts a close filter on the main window it lands in.
    ``callback`` returning ``False`` vetoes the close. Keep the returned object referenced
    (it is parented to ``widget``).
    """

    def __init__(self, widget: Any, callback: Callable[[], Any]) -> None:
        super().__init__(widget)
        self.widget = widget
        self.filter = _CloseFilter(callback)
        self.window: Any = None
        self._watched: list[Any] = []
        self._hook()

    def _hook(self) -> None:
        from qtpy.QtWidgets import QMainWindow

        # watch every ancestor's parent changes: napari wraps the widget in a dock widget
        # first and adds that to the main window afterwards
        node = self.widget
        while node is not None:
            if node not in self._watched:
                node.installEventFilter(self)
                self._watched.append(node)
            if isinstance(node, QMainWindow):
                break
            node = node.parent()
        # the main window (a floating dock is a window of its own: not that one)
        if not isinstance(node, QMainWindow) or node is self.window:
            return
        if self.window is not None:
            self.window.removeEventFilter(self.filter)
        self.window = node
        node.installEventFilter(self.filter)

    def eventFilter(self, obj: QObject, event: Any) -> bool:
        from qtpy.QtCore import QEvent

        if event.type() == QEvent.Type.ParentChange and obj in self._watched:
            self._hook()
        return False


def watch_window_close(widget: Any, callback: Callable[[], Any]) -> WindowCloseWatch:
    """Call ``callback`` when the window holding ``widget`` closes (see
    :class:`WindowCloseWatch`)."""
    return WindowCloseWatch(widget, callback)
