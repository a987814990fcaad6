"""The one error type the project raises for bad input."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable


class SigmmaError(Exception):
    """A problem with user input (a file, a folder, a setting) that the user can fix.

    Parameters
    ----------
    problem
        What is wrong, in words a user understands.
    path
        The file or folder the problem is about, if any.

    Notes
    -----
    ``str(err)`` is ``"<path>: <problem>"`` so that CLI messages and napari notifications
    always name the file.
    """

    def __init__(self, problem: str, *, path: str | os.PathLike[str] | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class Cancelled(Exception):
    """Raised inside a long task when its cancel flag was set (not an error to report)."""


#: What long tasks accept as ``cancel``: a ``threading.Event`` (or anything with
#: ``is_set()``), a callable returning True once the task should stop, or ``None`` (never
#: cancelled).
CancelLike = threading.Event | Callable[[], bool] | None


def is_cancelled(cancel: CancelLike) -> bool:
    """True when ``cancel`` (Event, callable or ``None``) says stop."""
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    if is_set is not None:
        return bool(is_set())
    return bool(cancel())


def check_cancel(cancel: CancelLike) -> None:
    """Raise :class:`Cancelled` when ``cancel`` says stop (call between chunks of work)."""
    if is_cancelled(cancel):
        raise Cancelled()


#: terminal colour codes some libraries put into their exception text
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def foreign_reason(err: BaseException, *, limit: int = 160) -> str:
    """One clean line saying why a third-party reader refused a file, for a SigmmaError.

    Terminal colour codes are removed and only the first line is kept. torch's refusal of a
    pickle with code in it (``weights_only``) is replaced by what it means, because its own
    text, cut to one line, reads as advice to load the file unsafely.
    """
    import pickle

    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
        return "it holds Python objects beyond tensors and plain values"
    text = _ANSI.sub("", str(err)).strip()
    first = (text.splitlines() or [""])[0].strip()
    stop = first.find(". ")
    if 0 < stop < limit:  # one whole sentence rather than a cut one
        first = first[: stop + 1]
    if len(first) > limit:
        first = first[: limit - 1].rstrip() + "…"
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
