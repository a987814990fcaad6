"""What the benchmarks measure of the host: memory of this process, and a display.

The one home of RSS measurement: ``rss_mb`` reads ``/proc/self/status``; ``peak_rss_mb`` is
the peak since this process started its program (``VmHWM``; ``ru_maxrss`` only where there
is no ``/proc``).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


def rss_mb(field: str = "VmRSS") -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process, MB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak RSS of this process since it started its program, MB.

    ``VmHWM`` where there is one: ``ru_maxrss`` is not reset by ``exec``, so in a child
    started from a big parent it reports the parent's RSS at the fork.
    """
    peak = rss_mb("VmHWM")
    if peak == peak:  # not NaN
        return peak
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def ensure_display(screen: str = "1400x1000x24") -> Any:
    """Start an Xvfb server when there is no display (Linux, headless); returns it."""
    if sys.platform != "linux" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    import shutil
    import subprocess

    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        return None
    for num in range(90, 120):
        if Path(f"/tmp/.X11-unix/X{num}").exists():
            continue
        proc = subprocess.Popen(
            [xvfb, f":{num}", "-screen", "0", screen, "-nolisten", "tcp"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(50):
            if Path(f"/tmp/.X11-unix/X{num}").exists():
                os.environ["DISPLAY"] = f":{num}"
                os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
                return proc
            time.sleep(0.1)
        proc.terminate()
    return None


def run_module_json(
    module: str, *args: object, timeout: float | None = None, what: str = "child"
) -> dict[str, Any]:
    """Run ``python -m module args…`` in a fresh process and return the JSON object its last
    stdout line holds (the benchmarks' children measure first-time imports and their own
    RSS). A failing child raises ``RuntimeError`` with the end of its stderr."""
    import json
    import subprocess

    res = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"the {what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
