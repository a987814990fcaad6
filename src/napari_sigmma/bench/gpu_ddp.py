"""``bench --gpu`` part 4: distributed training, a checkpoint and a resume, one process per
rank (NCCL on CUDA, gloo on CPU).

:func:`run_ddp` starts ``world`` processes of this module (``python -m
napari_sigmma.bench.gpu_ddp``) with the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on loopback). Each rank builds the same
synthetic slide in memory and calls the trainer's public ``train(cfg, ...)`` twice: a run
cancelled after a few optimiser steps (it writes ``checkpoints/last.pt``), then
``resume=True`` to the end. Rank 0 writes a JSON report.

The trainer reads slides from files through SpatialData; here the slides come from memory
through its ``slides=`` argument (``cfg.data`` only names them), so nothing outside the
stock GPU image is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_fn() -> Any:
    """The trainer's public ``train``."""
    from napari_sigmma.train.loop import train

    return train


def _rank_main(args: argparse.Namespace) -> int:
    """One rank: cancelled run, resume, report (rank 0)."""
    import numpy as np
    import torch

    from napari_sigmma.bench.gpu_data import synthetic_paired
    from napari_sigmma.models.config import ModelConfig
    from napari_sigmma.tiles.dataset import GraphSettings, prepare_slide
    from napari_sigmma.train.config import TrainConfig

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if args.device == "cuda" else "gloo"
    out = Path(args.out)
    report: dict[str, Any] = {"rank": rank, "world_size": world, "backend": backend}
    t0 = time.perf_counter()
    import torch.distributed as dist

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # initialised here even for one process, so NCCL itself is exercised
    dist.init_process_group(backend=backend, init_method="env://")
    try:
        paired = synthetic_paired(args.size, seed=3)
        st = prepare_slide(
            paired, tile_px=256, target_mpp=0.5, min_tissue=0.0, settings=GraphSettings()
        )
        cfg = TrainConfig(
            data=["<in-memory synthetic>"],
            run_dir=str(out / "run"),
            min_tissue=0.0,
            split_block=1,
            epochs=2,
            batch_size=args.batch_size,
            warmup_steps=1,
            seed=0,
            device=args.device,
            patience=0,
            max_steps_per_epoch=args.steps,
            cache_features=False,
            model=ModelConfig(
                backbone=args.backbone,
                pretrained=False,
                img_size=args.img_size,
                embed_dim=64,
                hidden=64,
                head_hidden=128,
                finetune="last_k",
                last_k=1,
            ),
        )
        train = _train_fn()
        steps_done: list[int] = []

        def on_step(step: int, *_a: Any) -> None:
            steps_done.append(step)

        stop_at = 1  # cancel after the first optimiser step: the resume starts mid-run

        def cancel() -> bool:
            return len(steps_done) >= stop_at

        r1 = train(cfg, callbacks={"on_step": on_step}, cancel=cancel, slides=[st])
        ckpt = Path(cfg.run_dir) / "checkpoints" / "last.pt"
        report["first"] = {
            "status": r1.status,
            "global_step": int(r1.global_step),
            "checkpoint_written": ckpt.is_file(),
        }
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        report["checkpoint"] = {
            "global_step": int(saved.get("global_step", -1)),
            "steps_per_epoch": int(saved.get("steps_per_epoch") or args.steps),
            "world_size": int(saved.get("world_size", 0)),
            "bytes": ckpt.stat().st_size,
        }
        t_resume = time.perf_counter()
        r2 = train(cfg, callbacks={"on_step": on_step}, resume=True, slides=[st])
        report["resume"] = {
            "status": r2.status,
            "global_step": int(r2.global_step),
            "epoch": int(r2.epoch),
            "seconds": time.perf_counter() - t_resume,
            "last_losses": [float(v) for v in r2.step_losses[-3:]],
        }
        losses = np.asarray(r2.step_losses, dtype=np.float64)
        expected = cfg.epochs * report["checkpoint"]["steps_per_epoch"]
        report["checks"] = {
            "cancelled_with_checkpoint": r1.status == "cancelled"
            and report["first"]["checkpoint_written"],
            "resumed_to_the_end": r2.status == "completed" and int(r2.global_step) == expected,
            "losses_finite": bool(losses.size and np.isfinite(losses).all()),
        }
        report["expected_steps"] = expected
        report["ok"] = all(report["checks"].values())
    except Exception as err:  # reported, and the rank's exit code says so
        report["ok"] = False
        report["error"] = f"{type(err).__name__}: {err}"
        report["traceback"] = traceback.format_exc()[-3000:]
    finally:
        report["seconds"] = time.perf_counter() - t0
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()
    if rank == 0 or not report["ok"]:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"ddp_rank{rank}.json").write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def run_ddp(
    out: str | os.PathLike[str],
    *,
    device: str,
    world: int,
    backbone: str = "vit_tiny",
    img_size: int | None = 64,
    size: int = 1024,
    steps: int = 2,
    batch_size: int = 4,
    timeout: float = 240.0,
) -> dict[str, Any]:
    """Run the distributed check with ``world`` ranks; returns rank 0's report plus the
    exit codes of every rank."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    src = str(Path(__file__).resolve().parents[2])  # the folder holding napari_sigmma
    env_base = dict(os.environ)
    pp = env_base.get("PYTHONPATH", "")
    env_base["PYTHONPATH"] = src + (os.pathsep + pp if pp else "")
    env_base.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), OMP_NUM_THREADS="1"
    )
    cmd = [
        sys.executable,
        "-m",
        "napari_sigmma.bench.gpu_ddp",
        "--out",
        str(out),
        "--device",
        device,
        "--backbone",
        backbone,
        "--size",
        str(size),
        "--steps",
        str(steps),
        "--batch-size",
        str(batch_size),
    ]
    if img_size:
        cmd += ["--img-size", str(img_size)]
    procs = []
    t0 = time.perf_counter()
    for r in range(world):
        env = dict(env_base, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    codes, tails = [], []
    for p in procs:
        try:
            so, _ = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            so, _ = p.communicate()
        codes.append(p.returncode)
        tails.append((so or b"").decode(errors="replace")[-1500:])
    rep_path = out / "ddp_rank0.json"
    report: dict[str, Any] = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
    report["exit_codes"] = codes
    report["wall_seconds"] = time.perf_counter() - t0
    report["ok"] = bool(report.get("ok")) and all(c == 0 for c in codes)
    if not report["ok"]:
        report["output_tails"] = tails
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="napari_sigmma.bench.gpu_ddp")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="vit_tiny")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    return _rank_main(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
