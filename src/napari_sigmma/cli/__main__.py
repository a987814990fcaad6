"""``python -m napari_sigmma.cli``: the same command as ``napari-sigmma``."""

from __future__ import annotations

import sys

from napari_sigmma.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
