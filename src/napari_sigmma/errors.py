"""The one error type the project raises for bad input."""

from __future__ import annotations

import os


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
