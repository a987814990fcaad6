"""napari-sigmma: SIGMMA multi-scale H&E / spatial-transcriptomics alignment in napari.

Importing this package is cheap: heavy libraries (torch, timm, spatialdata, napari) are
imported inside the functions that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from napari_sigmma.errors import SigmmaError

__all__ = ["SigmmaError", "__version__"]
