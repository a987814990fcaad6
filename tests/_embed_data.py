"""One tiny SIGMMA run on the embedded sample, trained once per test session and shared by
the embedding tests (test_analysis_embedzarr, test_ecosystem_embedstore)."""

from __future__ import annotations

from pathlib import Path

from _train_data import tiny_cfg


def tiny_embedded_run(embedded_bundle: Path, cache: Path):  # type: ignore[no-untyped-def]
    """``(cfg, checkpoint)``: the real trainer, one epoch, every tile in training; trained
    into ``cache/tiny-embedded-run`` unless a finished run is there already."""
    from napari_sigmma.train.loop import train

    root = Path(cache) / "tiny-embedded-run"
    cfg = tiny_cfg(
        embedded_bundle, root / "run", root / "features", epochs=1, batch_size=8,
        grad_accum=1, split_fractions=(1.0, 0.0, 0.0),
    )  # fmt: skip
    ckpt = root / "run" / "checkpoints" / "last.pt"
    done = root / ".complete"
    if not (done.is_file() and ckpt.is_file()):
        assert train(cfg).status == "completed"
        done.write_text("1")
    return cfg, ckpt
