"""Distributed training: process-group set-up, rank helpers and the DDP wrapper.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised from ``env://``
(NCCL on CUDA, gloo on CPU). Every rank draws the same epoch permutation and takes its
``rank::world`` share (:func:`napari_sigmma.train.data.epoch_batches`); the InfoNCE
negatives are gathered across ranks by the loss
(:func:`napari_sigmma.models.loss.gather_with_grad`). Rank 0 alone writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Dist:
    """This process's place in the (possibly one-process) training job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # we initialised the process group (and tear it down)

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and calls the callbacks."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _reduce(self, value: float, dtype: Any, op: str) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=dtype)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return float(t.item())

    def any_flag(self, flag: bool) -> bool:
        """True when ``flag`` is set on any rank (keeps all ranks in step)."""
        if self.world == 1:
            return flag
        import torch

        return bool(self._reduce(1.0 if flag else 0.0, torch.int64, "MAX"))

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        if self.world == 1:
            return value
        import torch

        return self._reduce(value, torch.float64, "SUM") / self.world

    def teardown(self) -> None:
        """Destroy the process group if this object created it."""
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False


def setup_distributed(device_name: str) -> Dist:
    """Join (or initialise, from ``env://``) the process group of a ``torchrun`` job."""
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    name = str(device_name or "auto").lower()
    use_cuda = torch.cuda.is_available() and (name == "auto" or name.startswith("cuda"))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return Dist(dist.get_rank(), dist.get_world_size(), local, True)


def rank_device(device: Any, dd: Dist) -> Any:
    """The device of this rank: ``cuda:<LOCAL_RANK>`` under multi-GPU DDP, else ``device``."""
    import torch

    if device.type == "cuda" and dd.world > 1:
        device = torch.device("cuda", dd.local_rank)
        torch.cuda.set_device(device)
    return device


def wrap_ddp(model: Any, device: Any, dd: Dist) -> Any:
    """``DistributedDataParallel(model)`` on several ranks, else ``None``."""
    if dd.world <= 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )
