"""viewer layer of napari-sigmma: the only package that imports napari and Qt.

Importing it blocks ``triton`` (unless ``SIGMMA_ALLOW_TRITON=1``): with software OpenGL
(Mesa llvmpipe, e.g. under Xvfb or on remote desktops) a GL context loads Mesa's LLVM, and
importing triton afterwards, which torch does lazily on first use of ``torch._dynamo``
(torch_geometric triggers it), loads triton's own LLVM and segfaults the process. Triton
only serves ``torch.compile`` kernels, which the plugin does not use; torch treats a blocked
triton as not installed.
"""

from __future__ import annotations

import os
import sys


def _block_triton() -> None:
    if os.environ.get("SIGMMA_ALLOW_TRITON") == "1" or "triton" in sys.modules:
        return
    sys.modules["triton"] = None  # type: ignore[assignment]  # import raises ImportError


_block_triton()
