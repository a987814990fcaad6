"""Validation during training: retrieval recalls on held-out tiles and the choice of the
best checkpoint.

The validation score is the mean Recall@5% over scales and both directions (HE→ST, ST→HE).
:class:`BestSelector` decides when a new score is a new best (see its docstring for why a
margin is required).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_sigmma.tiles.dataset import PairedTileDataset


def encode_entries(
    model: Any,
    dataset: PairedTileDataset,
    *,
    device: Any,
    batch_size: int = 32,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """HE and ST embeddings ``{scale: (N, D)}`` of every item of ``dataset`` (eval mode)."""
    import torch

    from napari_sigmma.device import autocast
    from napari_sigmma.tiles.dataset import make_loader

    was_training = model.training
    model.eval()
    he: dict[str, list[np.ndarray]] = {}
    st: dict[str, list[np.ndarray]] = {}
    n = len(dataset)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    with torch.no_grad():
        for x, gb, _ in make_loader(dataset, batches):
            x, gb = x.to(device), gb.to(device)
            with autocast(device):
                img = model.image_heads(x) if x.ndim == 3 else model.encode_image(x)
                out = model.encode_graph(gb)
            for k, v in img.items():
                if k in ("micro", "meso", "macro"):
                    he.setdefault(k, []).append(v.float().cpu().numpy())
            for k, v in out.emb.items():
                st.setdefault(k, []).append(v.float().cpu().numpy())
    model.train(was_training)
    return (
        {k: np.concatenate(v) for k, v in he.items()},
        {k: np.concatenate(v) for k, v in st.items()},
    )


def evaluate_retrieval(
    model: Any, dataset: PairedTileDataset, *, device: Any, batch_size: int = 32
) -> dict[str, float]:
    """Recall@5/10/15% both directions per scale, and ``score`` = mean Recall@5%."""
    from napari_sigmma.metrics import retrieval_metrics

    if len(dataset) < 2:
        return {}
    he, st = encode_entries(model, dataset, device=device, batch_size=batch_size)
    m = retrieval_metrics(he, st)
    scales = [s for s in model.cfg.scales if s in he and s in st]
    at5 = [m[f"{s}/{d}@5"] for s in scales for d in ("he2st", "st2he")]
    m["score"] = float(np.mean(at5)) if at5 else float("nan")
    m["n_tiles"] = len(dataset)
    return m


@dataclass
class BestSelector:
    """Which validation is the best so far, without chasing noise on small validation sets.

    The score ``p`` (mean Recall@5% over scales and directions) is, for each of its terms,
    a binomial proportion over the ``n`` validation tiles: its standard error is about
    ``sqrt(p (1 - p) / n)`` — 0.05 at ``n = 40`` and ``p = 0.15``, as large as the gains
    of a whole epoch late in training. Picking the plain maximum therefore often picks a
    lucky draw, and resets early-stopping's patience on noise. A new score counts as an
    improvement only when it beats the best so far by ``z`` standard errors of that best
    (``p`` clipped to ``[1/n, 1 - 1/n]`` so a score of 0 or 1 still has a margin). With a
    large validation set the margin vanishes (0.01 at ``n = 1000``), so real gains are
    still taken; the first validation is always a best.

    Attributes
    ----------
    z
        The margin in standard errors (1.0).
    score, epoch
        The best score so far and its epoch (``None`` before the first validation).
    bad_evals
        Validations since the last improvement (early stopping's patience counter).
    """

    z: float = 1.0
    score: float | None = None
    epoch: int | None = None
    bad_evals: int = 0

    def margin(self, n: int) -> float:
        """The improvement a new score needs over the best, on ``n`` validation tiles."""
        if self.score is None or n <= 0:
            return 0.0
        p = min(max(float(self.score), 1.0 / n), 1.0 - 1.0 / n)
        return self.z * math.sqrt(p * (1.0 - p) / n)

    def update(self, score: float, n: int, epoch: int) -> bool:
        """Record a validation; True when it is the new best."""
        if not math.isfinite(score):
            self.bad_evals += 1
            return False
        if self.score is None or score > self.score + self.margin(n):
            self.score, self.epoch, self.bad_evals = float(score), int(epoch), 0
            return True
        self.bad_evals += 1
        return False

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (``best``)."""
        return {"score": self.score, "epoch": self.epoch, "bad_evals": self.bad_evals}

    @classmethod
    def from_dict(cls, d: dict[str, Any], z: float = 1.0) -> BestSelector:
        """Inverse of :meth:`to_dict`."""
        return cls(z, d.get("score"), d.get("epoch"), int(d.get("bad_evals", 0)))
