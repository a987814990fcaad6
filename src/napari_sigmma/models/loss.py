"""Multi-scale symmetric InfoNCE (paper §5.3).

``L_ALIGN(z_I, z_S) = ½ [L_I→S + L_S→I]`` with cosine similarity / τ; the total is the sum over
the scales used (``("macro",)`` is the single-scale ablation). The temperature is carried as a
logit scale ``log(1/τ)`` (learnable in :class:`~napari_sigmma.models.sigmma.SigmmaModel`),
clamped to ``τ ∈ [0.01, 1]`` when used.

Distributed training: when ``torch.distributed`` is initialised with more than one process,
each process's embeddings are gathered from all processes *with gradients* (functional
``all_gather_single_autograd``, or ``torch.distributed.nn.functional.all_gather`` on older
torch), and each process computes the loss of its
own queries against all candidates of the global batch (labels offset by ``rank · B``). All
processes must then use the same local batch size (``drop_last=True``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from napari_sigmma.errors import SigmmaError

if TYPE_CHECKING:
    import torch

MAX_LOGIT_SCALE = math.log(100.0)  # τ ≥ 0.01
MIN_LOGIT_SCALE = 0.0  # τ ≤ 1


def _dist_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes along dim 0, keeping gradients (identity when
    not distributed)."""
    import torch

    _, world = _dist_world()
    if world == 1:
        return x
    import torch.distributed as dist

    try:  # torch ≥ 2.10: functional collective with autograd (backward = reduce-scatter sum)
        from torch.distributed._functional_collectives import all_gather_single_autograd
    except ImportError:
        all_gather_single_autograd = None
    if all_gather_single_autograd is not None:
        out = all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
        return out.wait() if hasattr(out, "wait") else out
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def logit_scale_value(logit_scale: torch.Tensor | float) -> torch.Tensor:
    """``1/τ`` from a (possibly learnable) ``log(1/τ)``, clamped to τ ∈ [0.01, 1]."""
    import torch

    ls = logit_scale if isinstance(logit_scale, torch.Tensor) else torch.tensor(logit_scale)
    return ls.clamp(MIN_LOGIT_SCALE, MAX_LOGIT_SCALE).exp()


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b``.

    Parameters
    ----------
    a, b
        ``(N, D)``; row ``i`` of ``a`` is paired with row ``i`` of ``b``, all other rows are
        negatives.
    logit_scale
        ``log(1/τ)`` (clamped, see module notes).
    gather
        Use the embeddings of all processes as candidates when distributed.

    Returns
    -------
    torch.Tensor
        Scalar ``½ (CE(a→b) + CE(b→a))``, averaged over this process's rows.
    """
    import torch
    import torch.nn.functional as F

    if a.ndim != 2 or a.shape != b.shape:
        raise SigmmaError(f"paired embeddings must both be (N, D), got {a.shape} and {b.shape}")
    dtype = torch.promote_types(a.dtype, torch.float32)  # fp32 at least, fp64 kept
    a = F.normalize(a.to(dtype), dim=-1)
    b = F.normalize(b.to(dtype), dim=-1)
    scale = logit_scale_value(logit_scale).to(device=a.device, dtype=dtype)
    rank, world = _dist_world() if gather else (0, 1)
    if world > 1:
        a_all, b_all = gather_with_grad(a), gather_with_grad(b)
    else:
        a_all, b_all = a, b
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    logits_ab = scale * a @ b_all.t()
    logits_ba = scale * b @ a_all.t()
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


def multiscale_loss(
    img: dict[str, torch.Tensor],
    st: dict[str, torch.Tensor],
    scales: tuple[str, ...] | list[str],
    logit_scale: torch.Tensor | float,
    *,
    gather: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L = Σ_scale L_ALIGN(img[scale], st[scale])``.

    Returns
    -------
    total, parts
        The differentiable total and ``{scale: float}`` per-scale values (for logging).
    """
    if not scales:
        raise SigmmaError("at least one scale is needed for the loss")
    total = None
    parts: dict[str, float] = {}
    for s in scales:
        if s not in img or s not in st:
            raise SigmmaError(f"scale {s!r} missing from the embeddings for the loss")
        term = info_nce(img[s], st[s], logit_scale, gather=gather)
        parts[s] = float(term.detach())
        total = term if total is None else total + term
    return total, parts
