"""What an evaluation produces, and how it is written: the result type and the JSON writer
(NaN and inf become null, numpy scalars plain numbers)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class EvalResult:
    """Metrics plus what the plots need (predictions of the headline embedding)."""

    metrics: dict[str, Any]
    probe: Any  # ProbeResult of the headline embedding
    frozen_probe: Any = None
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def _clean(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN
    return v


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (NaN → null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=1))
    os.replace(tmp, path)
