"""DistributedDataParallel on CPU: two gloo processes train two steps together."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from _train_data import tiny_cfg
from napari_sigmma.train.checkpoint import load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, cfg_dict: dict, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    import json

    from napari_sigmma.train.config import TrainConfig
    from napari_sigmma.train.loop import train

    written: list[str] = []

    class Record:
        def on_checkpoint(self, path):
            written.append(str(path))

    # Per-rank checksum of the trained parameters after every optimiser step (recorded
    # around AdamW.step: the ranks' shards differ, so only synchronised gradients keep
    # the replicas equal).
    checksums: list[float] = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            checksums.append(
                float(sum(p.double().sum() for g in self.param_groups for p in g["params"]))
            )
        return out

    torch.optim.AdamW.step = step
    res = train(TrainConfig.from_dict(cfg_dict), callbacks=Record())
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "status": res.status,
                "steps": res.global_step,
                "losses": res.step_losses,
                "checkpoints": written,
                "checksums": checksums,
            }
        )
    )


def test_ddp_two_gloo_processes(synthetic_small, tmp_path):
    import json

    cfg = tiny_cfg(
        synthetic_small,
        tmp_path / "run",
        tmp_path / "cache",
        epochs=1,
        grad_accum=1,
        max_steps_per_epoch=2,
    )
    mp.spawn(
        _worker,
        args=(2, _free_port(), cfg.to_dict(), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["status"] == r1["status"] == "completed"
    assert r0["steps"] == r1["steps"] == 2
    # Logged losses are averaged over the ranks, so both report the same numbers.
    assert r0["losses"] == r1["losses"]
    # The replicas stay identical after every step (DDP averages the gradients), and the
    # steps do change them.
    assert len(r0["checksums"]) == len(r1["checksums"]) == 2
    assert r0["checksums"] == r1["checksums"]
    assert r0["checksums"][0] != r0["checksums"][1]
    # Only rank 0 writes files.
    assert r0["checkpoints"] and not r1["checkpoints"]
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["world_size"] == 2 and ck["global_step"] == 2
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert sorted(leftovers) == ["best.pt", "last.pt"]
