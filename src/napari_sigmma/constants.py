"""Facts the whole package shares, each defined once: scale names and crop geometry, slide
suffixes, the control-probe pattern.

Plain Python only (no numpy, no torch): every floor imports from here.
"""

from __future__ import annotations

import re

#: The three scales of SIGMMA, finest first (paper §5: micro 4×4, meso 2×2, macro 1×1).
SCALES: tuple[str, ...] = ("micro", "meso", "macro")

#: Blocks per side of each scale's grid over a tile (b = 4, 2, 1).
SCALE_BLOCKS: dict[str, int] = {"micro": 4, "meso": 2, "macro": 1}

#: Paper-exact multi-crop: the 16 micro, 4 meso and 1 macro crops of a tile, in this order.
CROP_SLICES: dict[str, slice] = {
    "micro": slice(0, 16),
    "meso": slice(16, 20),
    "macro": slice(20, 21),
}
#: Encoder inputs per tile in paper-exact multi-crop (16 + 4 + 1).
N_CROPS = 21

#: Slide suffixes read with tifffile (the TIFF family: Aperio SVS, pyramidal / OME-TIFF).
#: A ``.tif`` / ``.tiff`` that OpenSlide recognises as Philips, Ventana or Trestle goes to
#: OpenSlide instead (``io.wsi.slide_backend`` looks inside).
TIFF_SLIDE_SUFFIXES: tuple[str, ...] = (".svs", ".tif", ".tiff")
#: Slide suffixes read with OpenSlide (openslide-python + openslide-bin): formats tifffile
#: does not read, or not well: Hamamatsu NDPI / VMS / VMU, MIRAX, Leica SCN, Ventana BIF,
#: Sakura SVSLIDE, DICOM WSI (any ``.dcm`` file of the series), Zeiss CZI.
OPENSLIDE_SUFFIXES: tuple[str, ...] = (
    ".ndpi",
    ".vms",
    ".vmu",
    ".mrxs",
    ".scn",
    ".bif",
    ".svslide",
    ".dcm",
    ".czi",
)
#: Every file suffix read as a whole-slide image (``io.wsi.open_slide``).
SLIDE_SUFFIXES: tuple[str, ...] = (*TIFF_SLIDE_SUFFIXES, *OPENSLIDE_SUFFIXES)

#: Suffixes a data path's name drops in its slide name (the trainer's rule, kept because old
#: ``split.json`` files hold names made by it): ``sample.zarr`` → ``sample``.
NAME_SUFFIXES: tuple[str, ...] = (".zarr", *SLIDE_SUFFIXES)

#: Feature names that are controls, not genes, whatever their declared type: negative control
#: probes and codewords, blank / unassigned / deprecated codewords, genomic and intergenic
#: controls (Xenium panels of every version, HEST-1k transcripts). Never a prediction target.
CONTROL_PATTERN = re.compile(
    r"^(BLANK|Blank-|NegControl|NegPrb|Neg_Control|Unassigned|Deprecated|GenomicControl"
    r"|Intergenic|antisense)",
    re.IGNORECASE,
)


def is_control(name: str) -> bool:
    """True for a control probe / codeword name (see :data:`CONTROL_PATTERN`)."""
    return bool(CONTROL_PATTERN.match(str(name)))
