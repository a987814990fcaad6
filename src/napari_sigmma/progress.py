"""Progress bars (tqdm, on stderr) for long command-line steps.

Off by default, so the library, the viewer and the tests print nothing; a CLI subcommand
turns them on with :func:`set_enabled` (``napari-sigmma … --quiet`` leaves them off). Steps
make a :class:`Bar` and feed it counts; a disabled bar does nothing.
"""

from __future__ import annotations

import sys
from typing import Any

_enabled = False


def set_enabled(on: bool) -> None:
    """Show (``True``) or hide progress bars from now on, for this process."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    """Whether progress bars are shown."""
    return _enabled


class Bar:
    """A tqdm bar on stderr when bars are enabled, else a no-op; a context manager.

    ``bar.update(n)`` advances by ``n``; ``bar(done, total)`` sets the position (the
    ``progress(done, total)`` callback form several steps take).
    """

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "it") -> None:
        self._bar: Any = None
        if _enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True
            )

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __call__(self, done: int, total: int | None = None) -> None:
        if self._bar is None:
            return
        if total is not None and self._bar.total != total:
            self._bar.total = total
        self._bar.update(max(0, int(done) - self._bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
