"""Device choice in one place: CUDA, then MPS, then CPU; bf16 autocast only on CUDA.

GPU hygiene lives here too: TF32 matmuls wherever float32 runs on CUDA (switched on when
:func:`resolve_device` hands out a CUDA device), pinned host memory and non-blocking
host-to-device copies (:func:`to_device`), and a float32 region inside bf16 autocast
(:func:`float32_region`) for sums and softmaxes that bf16 would spoil.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

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
            enable_tf32()
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SigmmaError(f"device {name!r} requested but CUDA is not available")
        enable_tf32()
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


def enable_tf32() -> None:
    """Let float32 matmuls and convolutions on CUDA use TF32 tensor cores (Ampere and
    newer; ~10 mantissa bits in the products, float32 accumulation). Idempotent."""
    import torch

    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def pinned(x: torch.Tensor) -> torch.Tensor:
    """``x`` in page-locked host memory when CUDA is present (else ``x`` itself), so a
    copy to the GPU can run asynchronously."""
    import torch

    if x.device.type != "cpu" or not torch.cuda.is_available() or x.is_pinned():
        return x
    return x.pin_memory()


def to_device(x: Any, device: torch.device) -> Any:
    """Copy a tensor (or anything with ``.to``, e.g. a PyG ``Batch``) to ``device``.

    Host tensors bound for CUDA are pinned first and copied with ``non_blocking=True``:
    the copy is queued on the current stream and the host does not wait for it.
    """
    import torch

    if device.type != "cuda":
        return x.to(device)
    if isinstance(x, torch.Tensor):
        return pinned(x).to(device, non_blocking=True)
    if hasattr(x, "apply"):  # PyG Data / Batch: pin every tensor attribute
        x = x.apply(pinned)
    return x.to(device, non_blocking=True)


def float32_region(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast off for the block (inputs must be cast to float32 by the caller): for the
    graph encoder's scatter sums and softmaxes, which bf16 (8 mantissa bits) would round."""
    import torch

    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    if kind not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, enabled=False)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only; elsewhere a no-op)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
