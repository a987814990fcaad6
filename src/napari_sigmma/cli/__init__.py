"""The ``napari-sigmma`` command: the parser in :mod:`.main`, one module per subcommand."""

from __future__ import annotations

from napari_sigmma.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
