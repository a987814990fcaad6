"""SIGKILL a training process again and again, resume each time (issue 8).

A tiny 3-epoch run checkpointing after every optimiser step runs in a child process that is
killed with SIGKILL: twice while a checkpoint is being written (right after its temp file
appears; the second checkpoint write of the attempt so that every attempt makes progress)
and once at a random moment after a checkpoint. After every kill ``checkpoints/last.pt``
must load (it is never a half-written file), and the run is resumed in a new process. The
final model must equal an uninterrupted in-process run with the same seed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_data import tiny_cfg
from napari_sigmma.train.checkpoint import load_checkpoint
from napari_sigmma.train.loop import train

# ~30 optimiser steps, a checkpoint after each.
CHANGES = {"ckpt_every_steps": 1, "epochs": 3, "batch_size": 2, "grad_accum": 1}

_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from _train_data import tiny_cfg
from napari_sigmma.train.loop import train
import io, os, signal, torch
# Crash harness: SIGKILL this process half-way through its n-th checkpoint write (the
# bytes written so far are flushed to the temp file), like a power cut mid-write.
n_kill = int(os.environ.get("SIGMMA_KILL_AT_SAVE", "0"))
if n_kill:
    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n_kill:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
cfg = tiny_cfg(Path({data!r}), Path({run!r}), Path({cache!r}), **{changes!r})
resume = (Path({run!r}) / "checkpoints" / "last.pt").is_file()
res = train(cfg, resume=resume)
print("DONE", res.status, res.global_step, flush=True)
"""


def _tmp_files(ckpt_dir: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(ckpt_dir) if e.name.startswith(".last.pt.")]
    except FileNotFoundError:
        return []


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _run_until_killed(
    cmd: list[str], ckpt_dir: Path, mode: str | int, rng: random.Random
) -> tuple[bool, bool]:
    """Run the child once. ``mode``: an int n = it kills itself half-way through its n-th
    checkpoint write; ``"random"`` = SIGKILL at a random moment after its first new
    checkpoint; ``"finish"`` = let it end. Returns (killed, a half-written temp file left)."""
    last = ckpt_dir / "last.pt"
    env = dict(os.environ, SIGMMA_KILL_AT_SAVE=str(mode if isinstance(mode, int) else 0))
    before = set(_tmp_files(ckpt_dir))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    start_mtime = _mtime(last)
    deadline = time.monotonic() + 240
    try:
        while mode == "random" and proc.poll() is None and time.monotonic() < deadline:
            if _mtime(last) != start_mtime:
                time.sleep(rng.uniform(0.0, 0.3))
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        out, err = proc.communicate(timeout=240)
        if proc.returncode == -signal.SIGKILL:
            return True, bool(set(_tmp_files(ckpt_dir)) - before)
        assert proc.returncode == 0, err[-3000:]
        assert "DONE completed" in out, out
        return False, False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigkill_and_resume_matches_an_uninterrupted_run(
    synthetic_small: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "features"
    ref = train(tiny_cfg(synthetic_small, tmp_path / "ref", cache, **CHANGES))
    assert ref.status == "completed" and ref.global_step >= 20

    run = tmp_path / "killed"
    ckpt_dir = run / "checkpoints"
    script = tmp_path / "child.py"
    script.write_text(
        _CHILD.format(
            tests=str(Path(__file__).parent),
            data=str(synthetic_small),
            run=str(run),
            cache=str(cache),
            changes=CHANGES,
        )
    )
    cmd = [sys.executable, str(script)]
    rng = random.Random(1234)
    plan: list[str | int] = [3, "random", 2, "random", 5]
    kills, mid_write, steps_seen = 0, 0, []
    for mode in [*plan, "finish", "finish"]:
        killed, during = _run_until_killed(cmd, ckpt_dir, mode, rng)
        if not killed:
            break
        kills += 1
        mid_write += during
        ckpt = load_checkpoint(ckpt_dir / "last.pt")  # never a half-written latest
        steps_seen.append(int(ckpt["global_step"]))
    else:
        pytest.fail("the run did not finish")
    print(f"kills: {kills} ({mid_write} mid-write); last.pt steps after kills {steps_seen}")
    assert kills == len(plan) and mid_write >= 3  # random kills may land mid-write too
    assert steps_seen == sorted(steps_seen)  # every resume made progress

    a = load_checkpoint(ref.last_checkpoint)
    b = load_checkpoint(ckpt_dir / "last.pt")
    assert b["global_step"] == a["global_step"] and b["epoch"] == a["epoch"]
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-5)
    for k, v in a["optimizer"]["state"].items():
        torch.testing.assert_close(
            b["optimizer"]["state"][k]["exp_avg"], v["exp_avg"], atol=1e-5, rtol=0
        )
