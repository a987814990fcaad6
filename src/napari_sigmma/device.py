"""Device choice in one place: CUDA, then MPS, then CPU; bf16 autocast only on CUDA."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for a user setting.

    Parameters
    ----------
    name
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"mps"``, ``"cuda"`` or
        ``"cuda:N"``.

    Raises
    ------
    SigmmaError
        When the requested device is not available on this machine.
    """
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SigmmaError(f"device {name!r} requested but CUDA is not available")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SigmmaError("device 'mps' requested but MPS is not available")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise SigmmaError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``device``: bf16 autocast on CUDA, nothing elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
