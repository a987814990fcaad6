"""A small trained model of the embedded sample, for the demo and the benchmark.

:func:`demo_model` trains, once, a SIGMMA model with a ``vit_tiny`` backbone (random init,
frozen: nothing can be downloaded, and a frozen backbone lets the trainer cache the crop
features so a few epochs take a minute on a CPU) on the embedded paired sample through the
real trainer, fits the gene head on the run's training tiles, and caches the run folder.
Later calls return the cached checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DEMO_VERSION = 2
DEMO_EPOCHS = 6


def demo_run_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the demo run lives (``<cache>/demo_model/v<version>``)."""
    from napari_sigmma.samples.cmu import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "demo_model" / f"v{DEMO_VERSION}"


def demo_model(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    epochs: int | None = None,
    device: str = "auto",
) -> Path:
    """The demo checkpoint (``best.pt``, else ``last.pt``), trained on first use.

    Parameters
    ----------
    cache_dir
        Cache root (default: the project cache, ``$SIGMMA_CACHE`` or
        ``~/.cache/napari-sigmma``); the embedded sample is generated there too.
    epochs
        Training epochs (default :data:`DEMO_EPOCHS`).
    device
        Training device.
    """
    from napari_sigmma.samples.embedded import embedded_sample

    run = demo_run_dir(cache_dir)
    done = run / ".complete"
    for name in ("best.pt", "last.pt"):
        ckpt = run / "checkpoints" / name
        if done.is_file() and ckpt.is_file():
            return ckpt
    sample = embedded_sample(cache_dir=cache_dir)
    shutil.rmtree(run, ignore_errors=True)
    ckpt = train_demo(sample, run, epochs=epochs or DEMO_EPOCHS, device=device)
    done.write_text(str(DEMO_VERSION))
    return ckpt


def train_demo(
    sample: str | os.PathLike[str], run: str | os.PathLike[str], *, epochs: int, device: str
) -> Path:
    """Train the demo configuration on ``sample`` into ``run`` and fit its gene head."""
    from napari_sigmma.io import load_any, slide_name
    from napari_sigmma.live.run import fit_run_gene_head, load_live_run
    from napari_sigmma.models.sigmma import ModelConfig
    from napari_sigmma.tiles.paired import PairedSlide
    from napari_sigmma.train.config import TrainConfig
    from napari_sigmma.train.trainer import train

    # The whole ViT is trained (one pass per tile, region-pooled crops) so the attention
    # heads the viewer shows are a trained model's, not a random initialisation's.
    model = ModelConfig(backbone="vit_tiny", pretrained=False, finetune="full", embed_dim=64,
                        hidden=64, head_hidden=128, fast_multicrop=True)  # fmt: skip
    cfg = TrainConfig(
        data=[str(sample)],
        run_dir=str(run),
        epochs=int(epochs),
        batch_size=8,
        lr=2e-3,
        backbone_lr=5e-4,
        warmup_steps=2,
        patience=epochs,
        n_pca=16,
        split_block=2,
        device=device,
        model=model,
    )
    result = train(cfg, callbacks=[_Progress(int(epochs))])
    ckpt = result.best_checkpoint or result.last_checkpoint
    if ckpt is None:
        raise RuntimeError(f"demo training wrote no checkpoint ({result.status})")
    live = load_live_run(ckpt)
    paired = PairedSlide.from_sdata(load_any(sample), name=slide_name(sample))
    fit_run_gene_head(live, paired, device=device)
    return Path(ckpt)


class _Progress:
    """Prints the demo model's training progress (first run only)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_step(self, step: int, epoch: int, loss: float, parts: dict[str, float]) -> None:
        print(f"  demo model: epoch {epoch + 1}/{self.epochs} step {step} loss {loss:.3f}",
              flush=True)  # fmt: skip

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        r = metrics.get("macro/he2st@5")
        extra = f", val HE->ST R@5% {r:.2f}" if r is not None else ""
        print(f"  demo model: epoch {epoch + 1}/{self.epochs} done{extra}", flush=True)

    def on_checkpoint(self, path: object) -> None:
        pass
