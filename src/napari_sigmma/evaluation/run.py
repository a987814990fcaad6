"""Evaluation of a trained SIGMMA model: the paper's Task 1 and Task 2 on held-out tiles.

``napari-sigmma evaluate --data DIR --checkpoint CKPT --out REPORT_DIR`` and
:func:`evaluate` (the same function) load a checkpoint, rebuild the tiles of its training
data, reuse the run's ``split.json`` (so train and test tiles are exactly the training run's)
and write into ``REPORT_DIR``:

- ``metrics.json`` (schema below), ``report.md`` and PNG plots (:mod:`.report`);
- with ``dump_embeddings``: ``embeddings.npz`` holding everything needed to recompute the
  numbers (per-scale HE and ST embeddings of the test tiles, HE embeddings of the training
  tiles, the targets, the headline predictions, the frozen-backbone features).

Task 1 (gene-expression prediction, HEST-bench protocol, :mod:`.probe`): targets are
``log1p`` of the summed raw counts of each tile's cells for the top-50 highly variable genes
chosen on the training tiles; the probe is fitted on the training tiles' HE embeddings and
scored on the test tiles. Reported: tile-level PCC / MSE (mean ± std over test tiles, the
paper's tables), per-gene PCC (the HEST benchmark's), per-gene calibration and the MSE
after a per-gene linear recalibration fitted on training tiles.

Task 2 (cross-modal retrieval, :mod:`.metrics`): Recall@5/10/15% HE→ST and ST→HE, the
candidate pool being all N test tiles and the hit window the top ``ceil(p·N)``; the chance
level ``ceil(p·N)/N`` is printed beside.

Embeddings evaluated: each scale (``micro``, ``meso``, ``macro``) and ``concat``, the
concatenation of the L2-normalised embeddings of the scales the model was trained on
(``cfg.model.scales``; for the single-scale ablation that is ``macro`` alone; its cosine
similarity is the mean of the per-scale cosine similarities). The headline (``task1`` /
``task2`` blocks) is ``macro``, the embedding of the whole tile — the paper's "HE tile
embedding", the one every variant has (single scale, BLEEP-style), with the same width for
every variant, and for the frozen backbone its features of the whole tile (the "UNI" row).
``concat`` is not the headline because its width changes with the variant, and the probe's
PCA(256) with a near-zero ridge penalty then compares different probe capacities.

Recalibration (the paper's open question 3): per gene, measured ≈ s · predicted + b fitted
on *out-of-fold* predictions of the training tiles (5-fold cross-fitting of the same probe),
then applied to the test predictions. In-sample training predictions of a ridge with a
near-zero penalty are already calibrated on the training tiles, so fitting on them would
hardly change anything; out-of-fold predictions show the shrinkage / overfitting the test
tiles will see.

The frozen backbone (the paper's "UNI" row) is evaluated on the same split: the backbone's
21 crop features mean-pooled per scale, no heads (:mod:`.baselines`). It has no ST
encoder, so its Task 2 row maps HE features to the tiles' mean log-expression with the
same ridge probe (fitted on training tiles) and retrieves by cosine between predicted and
measured expression — a linear, training-free-encoder alignment.

``metrics.json`` schema (keys always present; ``version`` 1)::

    {"task1": {"pcc_mean", "pcc_std", "mse_mean", "mse_std", "per_gene_pcc": {gene: r},
               "per_gene_pcc_mean", "calibration": {gene: {"slope", "intercept"}},
               "mse_recalibrated_mean", "embedding"},
     "task2": {"he_to_st": {"R@5%", "R@10%", "R@15%"}, "st_to_he": {...},
               "chance": {...}, "embedding", "curve": {"p", "he_to_st", "st_to_he"}},
     "n_train_tiles", "n_test_tiles", "genes": [...], "checkpoint", "data",
     "by_embedding": {name: {"task1": {...}, "task2": {...}}},
     "frozen_backbone": {"task1", "task2", "by_embedding"} | {"skipped": reason},
     "model": {...}, "variant", "label", "split": {...}, "throughput": {...}, ...}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sigmma.constants import SCALES
from napari_sigmma.errors import SigmmaError
from napari_sigmma.evaluation.results import EvalResult, write_json
from napari_sigmma.files import atomic_savez

HEADLINE = "macro"  # the embedding of the task1 / task2 blocks (see the module docstring)
PERCENTS = (0.05, 0.10, 0.15)
METRICS_VERSION = 1
TARGET_NOTE = (
    "log1p of the summed raw counts of the tile's cells, top highly variable genes chosen on "
    "the training tiles (present in >= 10% of them, control probes excluded)"
)

Log = Callable[[str], None] | None


def _say(log: Log, msg: str) -> None:
    if log is not None:
        log(msg)


def pkey(p: float) -> str:
    """``0.05`` → ``"R@5%"`` (the metrics.json key)."""
    return f"R@{round(p * 100):d}%"


# ----------------------------------------------------------------------------- pure metrics


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def concat_embedding(emb: dict[str, np.ndarray], scales: Sequence[str]) -> np.ndarray:
    """Concatenation of the L2-normalised embeddings of ``scales`` (float64).

    Its cosine similarity is the mean of the per-scale cosine similarities.
    """
    have = [s for s in scales if s in emb]
    if not have:
        raise SigmmaError(f"no embedding for any of the scales {tuple(scales)}")
    return np.hstack([unit_rows(emb[s]) for s in have])


def chance_level(n: int, p: float) -> float:
    """Expected Recall@p% of a random ranking of ``n`` candidates: ``ceil(p·n)/n``."""
    if n <= 0:
        return float("nan")
    return max(1, math.ceil(p * n - 1e-9)) / n


def retrieval_block(
    he: np.ndarray, st: np.ndarray, percents: Sequence[float] = PERCENTS
) -> dict[str, Any]:
    """Task 2 block: Recall@p% both directions, chance, and the full recall curve."""
    from napari_sigmma.metrics import partner_ranks

    n = int(he.shape[0])
    r_he = partner_ranks(he, st)
    r_st = partner_ranks(st, he)

    def at(ranks: np.ndarray, p: float) -> float:
        k = max(1, math.ceil(p * n - 1e-9))
        return float((ranks < k).mean())

    grid = [k / 100 for k in range(1, 101)]
    return {
        "he_to_st": {pkey(p): at(r_he, p) for p in percents},
        "st_to_he": {pkey(p): at(r_st, p) for p in percents},
        "chance": {pkey(p): chance_level(n, p) for p in percents},
        "n_candidates": n,
        "median_rank": {
            "he_to_st": float(np.median(r_he) + 1),
            "st_to_he": float(np.median(r_st) + 1),
        },
        "curve": {
            "p": grid,
            "he_to_st": [at(r_he, p) for p in grid],
            "st_to_he": [at(r_st, p) for p in grid],
        },
    }


def cross_fitted_recalibration(
    x_train: np.ndarray,
    y_train: np.ndarray,
    pred_test: np.ndarray,
    y_test: np.ndarray,
    *,
    seed: int = 0,
    folds: int = 5,
) -> dict[str, Any] | None:
    """Per-gene linear recalibration fitted on out-of-fold training predictions.

    The training tiles are cut into ``folds`` random folds; each fold is predicted by the
    probe fitted on the others, and per gene ``measured ≈ s · predicted + b`` is fitted on
    these out-of-fold predictions, then applied to ``pred_test``. Returns the tile-level
    MSE after recalibration (mean, std) and the per-gene ``(s, b)``; ``None`` with fewer
    than 2 tiles per fold.
    """
    from sklearn.model_selection import KFold

    from napari_sigmma.evaluation.probe import fit_probe

    n = x_train.shape[0]
    folds = min(int(folds), n // 2)
    if folds < 2:
        return None
    oof = np.empty_like(y_train, dtype=np.float64)
    for tr, va in KFold(folds, shuffle=True, random_state=seed).split(x_train):
        mu = y_train[tr].mean(axis=0)
        pipe = fit_probe(x_train[tr], y_train[tr] - mu, seed=seed)
        oof[va] = pipe.predict(x_train[va]) + mu
    adj = np.array(pred_test, dtype=np.float64, copy=True)
    coef: dict[int, tuple[float, float]] = {}
    for j in range(y_train.shape[1]):
        if np.ptp(oof[:, j]) > 0:
            s, b = np.polyfit(oof[:, j], y_train[:, j], 1)
            adj[:, j] = s * pred_test[:, j] + b
            coef[j] = (float(s), float(b))
    tile_mse = ((adj - y_test) ** 2).mean(axis=1)
    return {"mean": float(tile_mse.mean()), "std": float(tile_mse.std()), "coef": coef}


def probe_block(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    genes: list[str],
    *,
    seed: int = 0,
    recalibrate: bool = True,
) -> tuple[dict[str, Any], Any]:
    """Task 1 block (``ProbeResult.summary()``, with the cross-fitted recalibration of
    :func:`cross_fitted_recalibration` as ``mse_recalibrated_mean`` / ``_std`` and
    ``recalibration``) and the :class:`~napari_sigmma.evaluation.probe.ProbeResult`."""
    from napari_sigmma.evaluation.probe import run_probe

    x_train = np.asarray(x_train, np.float64)
    y_train = np.asarray(y_train, np.float64)
    res = run_probe(
        x_train,
        y_train,
        np.asarray(x_test, np.float64),
        np.asarray(y_test, np.float64),
        genes,
        seed=seed,
        recalibrate=False,
    )
    block = res.summary()
    block["mse_recalibrated_mean"] = None
    block["mse_recalibrated_std"] = None
    if recalibrate:
        rc = cross_fitted_recalibration(x_train, y_train, res.y_pred, y_test, seed=seed)
        if rc is not None:
            block["mse_recalibrated_mean"] = rc["mean"]
            block["mse_recalibrated_std"] = rc["std"]
            block["recalibration"] = {
                genes[j]: {"slope": s, "intercept": b} for j, (s, b) in rc["coef"].items()
            }
            res.recalibrated_mse = rc["mean"]
    return block, res


# ----------------------------------------------------------------------------- data


@dataclass
class EvalInputs:
    """Everything computed from the data and the model, before the metrics.

    Attributes
    ----------
    he_train, he_test, st_test
        ``{scale: (n, D)}`` float32 embeddings.
    frozen_train, frozen_test
        ``{scale: (n, C)}`` frozen-backbone features pooled per scale (empty when skipped).
    expr_train, expr_test
        ``(n, G)`` log1p-normalised mean expression of every gene (frozen Task 2 baseline).
    counts_train, counts_test
        ``(n, G)`` summed raw counts per tile of every gene.
    genes
        The run's gene list (columns of ``counts_*``).
    test_ids, train_ids
        ``"slide:tile_id"`` of the tiles, in row order.
    """

    he_train: dict[str, np.ndarray]
    he_test: dict[str, np.ndarray]
    st_test: dict[str, np.ndarray]
    frozen_train: dict[str, np.ndarray]
    frozen_test: dict[str, np.ndarray]
    expr_train: np.ndarray
    expr_test: np.ndarray
    counts_train: np.ndarray
    counts_test: np.ndarray
    genes: list[str]
    train_ids: list[str]
    test_ids: list[str]
    frozen_note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)


def run_dir_of(ckpt_path: Path) -> Path:
    """The run folder of a checkpoint file (``<run>/checkpoints/x.pt`` → ``<run>``)."""
    p = Path(ckpt_path).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def tile_counts(slides: list[Any], entries: Sequence[tuple[int, int]], genes: list[str]):
    """``(n, G)`` summed raw counts of each tile's cells, columns in ``genes`` order."""
    from napari_sigmma.tiles.features import align_counts

    out = np.zeros((len(entries), len(genes)), dtype=np.float64)
    aligned: dict[int, Any] = {}
    for k, (si, ti) in enumerate(entries):
        s = slides[si]
        if si not in aligned:
            aligned[si] = align_counts(s.paired.counts, s.paired.genes, genes).tocsr()
        cells = s.cells[ti].cells
        if len(cells):
            out[k] = np.asarray(aligned[si][cells].sum(axis=0)).ravel()
    return out


def _entries_ids(slides: list[Any], entries: Sequence[tuple[int, int]]) -> list[str]:
    return [f"{slides[si].name}:{slides[si].grid.tile_ids[ti]}" for si, ti in entries]


def _ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def crop_features(
    model: Any,
    slides: list[Any],
    entries: Sequence[tuple[int, int]],
    *,
    device: Any,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    log: Log = None,
) -> list[np.ndarray]:
    """Per slide ``(T, 21, C)`` crop features of the tiles in ``entries`` (other rows 0).

    With ``cache_dir`` (frozen backbones only: the cache key does not cover fine-tuned
    weights) the training run's feature cache is read and completed; otherwise every tile
    is encoded afresh with ``model``'s own backbone.
    """
    from napari_sigmma.progress import Bar
    from napari_sigmma.train.data import cached_crop_features

    out: list[np.ndarray] = []
    with tempfile.TemporaryDirectory(prefix="sigmma-eval-") as tmp:
        for si, s in enumerate(slides):
            tiles = np.array(sorted({t for sj, t in entries if sj == si}), dtype=np.int64)
            if tiles.size == 0:
                out.append(np.zeros((len(s.grid), 21, 1), np.float32))
                continue
            _say(log, f"  crop features: {s.name}, {tiles.size} tiles")
            with Bar(f"crop features {s.name}", int(tiles.size), unit="tile") as bar:
                f = cached_crop_features(
                    model,
                    s,
                    tiles,
                    cache_dir if cache_dir is not None else Path(tmp),
                    device=device,
                    batch_size=batch_size,
                    write=cache_dir is not None,
                    progress=bar,
                )
            assert f is not None  # no cancel given
            out.append(f)
    return out


def _gather(feats: list[np.ndarray], entries: Sequence[tuple[int, int]]) -> np.ndarray:
    return np.stack([feats[si][ti] for si, ti in entries]).astype(np.float32)


def _heads(model: Any, crops: np.ndarray, *, device: Any, batch: int = 256):
    """``{scale: (n, D)}`` image-head embeddings of ``(n, 21, C)`` crop features."""
    import torch

    out: dict[str, list[np.ndarray]] = {}
    model.eval()
    with torch.no_grad():
        for i in range(0, crops.shape[0], batch):
            x = torch.from_numpy(crops[i : i + batch]).to(device)
            for k, v in model.image_heads(x).items():
                out.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def measure_throughput(
    model: Any, slides: list[Any], entries: Sequence[tuple[int, int]], *, device: Any, n: int = 8
) -> dict[str, Any]:
    """HE encoding speed (backbone + heads, tiles/s) of the paper-exact 21-crop mode and the
    fast multi-crop mode, with the same weights, on ``n`` tiles read beforehand."""
    import torch

    from napari_sigmma.tiles.grid import read_tile

    n = int(min(n, len(entries)))
    if n <= 0:
        return {}
    imgs = np.stack([read_tile(slides[si].paired, slides[si].grid, ti) for si, ti in entries[:n]])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().to(device)
    enc = model.image
    was = enc.fast
    out: dict[str, Any] = {"n_tiles": n, "device": str(device), "threads": torch.get_num_threads()}
    model.eval()
    try:
        for mode, fast in (("paper", False), ("fast", True)):
            enc.fast = fast
            with torch.no_grad():
                model.encode_image(x[:1])  # warm-up (allocations, lazy init)
                t0 = time.perf_counter()
                for i in range(n):
                    model.encode_image(x[i : i + 1])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            out[mode] = {"tiles_per_s": n / dt if dt > 0 else float("inf"), "seconds": dt}
    finally:
        enc.fast = was
    out["speedup"] = out["fast"]["tiles_per_s"] / max(out["paper"]["tiles_per_s"], 1e-12)
    out["mode"] = "fast" if was else "paper"
    return out


def variant_name(model_cfg: dict[str, Any]) -> str:
    """``full``, ``no_graph``, ``single_scale``, ``no_sparsify`` or ``bleep`` (no graph and
    single scale), plus ``+fast`` for the fast multi-crop mode."""
    graph = bool(model_cfg.get("use_graph", True))
    single = tuple(model_cfg.get("scales", SCALES)) == ("macro",)
    sparse = bool(model_cfg.get("sparsify", True))
    if not graph and single:
        name = "bleep"
    elif not graph:
        name = "no_graph"
    elif single:
        name = "single_scale"
    elif not sparse:
        name = "no_sparsify"
    else:
        name = "full"
    return name + ("+fast" if model_cfg.get("fast_multicrop") else "")


def prepare_inputs(
    model: Any,
    cfg: Any,
    rd: Any,
    *,
    n_node_features: int,
    n_genes: int,
    device: Any,
    frozen_baseline: bool = True,
    batch_size: int = 16,
    log: Log = None,
) -> EvalInputs:
    """Embeddings, frozen-backbone features, targets of the train and test tiles of ``rd``
    (a :class:`~napari_sigmma.train.data.RunData`)."""
    from napari_sigmma.evaluation.floors import frozen_backbone_model, pooled_crop_features
    from napari_sigmma.tiles.dataset import PairedTileDataset
    from napari_sigmma.train.validation import encode_entries

    train = list(rd.entries["train"])
    test = list(rd.entries["test"])
    if len(train) < 2 or len(test) < 2:
        raise SigmmaError(
            f"need at least 2 training and 2 test tiles, the split has {len(train)} and {len(test)}"
        )
    both = train + test
    frozen = bool(model.backbone_frozen)
    cache = None
    if frozen and cfg.cache_features:
        cache = Path(cfg.feature_cache_dir) if cfg.feature_cache_dir else None
        if cache is None:
            cache = Path(cfg.run_dir) / "cache"
    _say(log, f"encoding {len(train)} train + {len(test)} test tiles")
    feats = crop_features(model, rd.slides, both, device=device, cache_dir=cache, log=log)
    he_train = _heads(model, _gather(feats, train), device=device)
    he_test = _heads(model, _gather(feats, test), device=device)
    ds = PairedTileDataset(rd.slides, test, crop_features=feats)
    he_chk, st_test = encode_entries(model, ds, device=device, batch_size=batch_size)
    diagnostics = diagnostics_block(model, ds, device=device, batch_size=batch_size, log=log)
    # encode_entries and _heads must see the same features (sanity of the plumbing)
    for s in he_test:
        if s in he_chk and not np.allclose(he_chk[s], he_test[s], atol=1e-4):
            raise SigmmaError(f"inconsistent {s} HE embeddings between two encodings")

    frozen_train: dict[str, np.ndarray] = {}
    frozen_test: dict[str, np.ndarray] = {}
    note = ""
    if frozen_baseline:
        if frozen:
            ffeats = feats
        else:
            try:
                fmodel = frozen_backbone_model(cfg.model, n_node_features, n_genes).to(device)
                ffeats = crop_features(fmodel, rd.slides, both, device=device, log=log)
            except SigmmaError as err:
                ffeats, note = None, f"skipped: {err}"
        if ffeats is not None:
            frozen_train = pooled_crop_features(_gather(ffeats, train))
            frozen_test = pooled_crop_features(_gather(ffeats, test))
    else:
        note = "skipped (not asked)"

    genes = list(rd.genes)
    expr = {
        k: np.stack([rd.slides[si].genevec[ti] for si, ti in v]).astype(np.float64)
        for k, v in (("train", train), ("test", test))
    }
    return EvalInputs(
        he_train=he_train,
        he_test=he_test,
        st_test=st_test,
        frozen_train=frozen_train,
        frozen_test=frozen_test,
        expr_train=expr["train"],
        expr_test=expr["test"],
        counts_train=tile_counts(rd.slides, train, genes),
        counts_test=tile_counts(rd.slides, test, genes),
        genes=genes,
        train_ids=_entries_ids(rd.slides, train),
        test_ids=_entries_ids(rd.slides, test),
        frozen_note=note,
        diagnostics=diagnostics,
    )


def diagnostics_block(
    model: Any, ds: Any, *, device: Any, batch_size: int = 16, log: Log = None
) -> dict[str, Any]:
    """``metrics.json``'s ``diagnostics`` on the test tiles:
    :func:`napari_sigmma.models.diagnostics.model_diagnostics` (``edges.<meso|macro>``:
    edge-sampler acceptance in training and in the model's evaluation mode, scores, edges
    per node; ``scales.input_rel_diff``: how distinct the per-scale image inputs are)."""
    from napari_sigmma.models.diagnostics import model_diagnostics
    from napari_sigmma.tiles.dataset import make_loader

    _say(log, "edge-sampler and image-scale diagnostics")
    n = len(ds)
    chunks = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return model_diagnostics(model, make_loader(ds, chunks), device=device)


# ----------------------------------------------------------------------------- metrics


def compute_metrics(
    inp: EvalInputs,
    *,
    scales: Sequence[str],
    seed: int = 0,
    recalibrate: bool = True,
    n_top: int = 50,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """All Task 1 / Task 2 numbers from :class:`EvalInputs`.

    Returns ``(metrics, extras)``; ``extras`` holds the probe results, the chosen gene
    indices and the target matrices (for plots and the dump).
    """
    from napari_sigmma.evaluation.probe import fit_probe, select_hvg

    y_train_all = np.log1p(inp.counts_train)
    hvg = select_hvg(y_train_all, inp.genes, n_top=n_top)
    if not hvg:
        raise SigmmaError(
            "no gene is expressed in at least 10% of the training tiles: nothing to predict"
        )
    genes = [inp.genes[i] for i in hvg]
    y_train = y_train_all[:, hvg]
    y_test = np.log1p(inp.counts_test)[:, hvg]

    def embeddings(d: dict[str, np.ndarray], sc: Sequence[str]) -> dict[str, np.ndarray]:
        e = {s: np.asarray(d[s], np.float64) for s in SCALES if s in d}
        e["concat"] = concat_embedding(d, sc)
        return e

    by: dict[str, Any] = {}
    probes: dict[str, Any] = {}
    tr, te = embeddings(inp.he_train, scales), embeddings(inp.he_test, scales)
    st = embeddings(inp.st_test, scales)
    for name in tr:
        t1, res = probe_block(
            tr[name], y_train, te[name], y_test, genes, seed=seed, recalibrate=recalibrate
        )
        probes[name] = res
        by[name] = {"task1": t1, "task2": retrieval_block(te[name], st[name])}

    frozen: dict[str, Any]
    frozen_probe = None
    if inp.frozen_train:
        # The whole-tile features (the headline) and the concatenation of the distinct
        # per-scale features (in the fast mode all three are the same tile mean). The
        # probe on 1000s of backbone features is the slow part, so no per-scale rows.
        distinct = [
            s
            for k, s in enumerate(SCALES)
            if not any(np.array_equal(inp.frozen_train[s], inp.frozen_train[t]) for t in SCALES[:k])
        ]
        ftr = {
            HEADLINE: np.asarray(inp.frozen_train[HEADLINE], np.float64),
            "concat": concat_embedding(inp.frozen_train, distinct),
        }
        fte = {
            HEADLINE: np.asarray(inp.frozen_test[HEADLINE], np.float64),
            "concat": concat_embedding(inp.frozen_test, distinct),
        }
        # Task 2 of an encoder without an ST side: ridge map HE → mean log-expression
        # (fitted on training tiles), cosine between predicted and measured expression.
        mu = inp.expr_train.mean(axis=0)
        fby: dict[str, Any] = {}
        for name in ftr:
            t1, res = probe_block(
                ftr[name], y_train, fte[name], y_test, genes, seed=seed, recalibrate=recalibrate
            )
            if name == HEADLINE:
                frozen_probe = res
            pipe = fit_probe(ftr[name], inp.expr_train - mu, seed=seed)
            pred = pipe.predict(fte[name])
            t2 = retrieval_block(pred, inp.expr_test - mu)
            t2["method"] = "ridge map from HE features to mean log-expression (train tiles)"
            fby[name] = {"task1": t1, "task2": t2}
        frozen = {
            "concat_scales": distinct,
            "task1": dict(fby[HEADLINE]["task1"], embedding=HEADLINE),
            "task2": dict(fby[HEADLINE]["task2"], embedding=HEADLINE),
            "by_embedding": fby,
            "embedding": HEADLINE,
            "feature_dim": int(inp.frozen_test["macro"].shape[1]),
        }
    else:
        frozen = {"skipped": inp.frozen_note or "skipped"}

    head = HEADLINE
    task1 = dict(by[head]["task1"], embedding=head)
    task2 = dict(by[head]["task2"], embedding=head)
    metrics = {
        "version": METRICS_VERSION,
        "task1": task1,
        "task2": task2,
        "n_train_tiles": len(inp.train_ids),
        "n_test_tiles": len(inp.test_ids),
        "genes": genes,
        "by_embedding": by,
        "frozen_backbone": frozen,
        "concat_scales": [s for s in scales if s in inp.he_test],
        "targets": TARGET_NOTE,
        "seed": int(seed),
    }
    extras = {
        "probes": probes,
        "frozen_probe": frozen_probe,
        "hvg": hvg,
        "y_train": y_train,
        "y_test": y_test,
    }
    return metrics, extras


# ----------------------------------------------------------------------------- main entry


def _load(checkpoint: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    from napari_sigmma.train.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    return path, load_checkpoint(path)


def eval_config(
    ckpt: dict[str, Any],
    ckpt_path: Path,
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
) -> Any:
    """The checkpoint's TrainConfig, with ``data`` replaced when given."""
    from napari_sigmma.train.config import TrainConfig
    from napari_sigmma.train.data import expand_data

    cfg = TrainConfig.from_dict(dict(ckpt["config"]), path=ckpt_path)
    changes: dict[str, Any] = {"run_dir": str(run_dir_of(ckpt_path))}
    if data is not None:
        items = [data] if isinstance(data, str | os.PathLike) else list(data)
        paths = [str(p) for d in items for p in expand_data(d)]
        changes["data"] = paths
    if cfg.feature_cache_dir is None:
        changes["feature_cache_dir"] = str(run_dir_of(ckpt_path) / "cache")
    return cfg.replace(**changes)


def evaluate(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dump_embeddings: bool = False,
    device: str | None = None,
    recalibrate: bool = True,
    split: str | os.PathLike[str] | None = None,
    seed: int = 0,
    frozen_baseline: bool = True,
    throughput_tiles: int = 8,
    report: bool = True,
    edge_mode: str | None = None,
    log: Log = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on the test tiles of its run's split; write the report.

    One long function on purpose: load, split, embed, probe, retrieve, diagnose and write
    in the order of the report; each step is a function of its own (``prepare_inputs``,
    ``compute_metrics``, ``diagnostics_block``, ``write_report``).

    Parameters
    ----------
    data
        The slide(s) the model was trained on (Xenium / HEST folder, ``.zarr``, or a folder
        of them); ``None`` = the paths in the checkpoint's config.
    checkpoint
        A checkpoint file or a run folder (its ``best.pt``, else ``last.pt``).
    out
        Report folder (created): ``metrics.json``, ``report.md``, PNGs, ``embeddings.npz``.
    dump_embeddings
        Write ``embeddings.npz`` (see the module docstring).
    device
        ``auto`` (default), ``cpu``, ``cuda``, ``mps``.
    recalibrate
        Also report the MSE after a per-gene linear recalibration fitted on training tiles.
    split
        ``split.json`` to use (default: the run folder's; recomputed from the config, and
        said so in ``metrics.json``, when the run folder has none).
    seed
        Seed of the probe's PCA.
    frozen_baseline
        Also evaluate the frozen backbone (pooled crop features, no heads).
    throughput_tiles
        Tiles timed in the paper-exact and the fast multi-crop modes (0 = skip).
    report
        Write ``report.md`` and the PNG plots.
    edge_mode
        How the edge sampler builds its graphs (:data:`napari_sigmma.models.edges.EDGE_MODES`;
        None = the model's default, ``expected``). Recorded as ``metrics["edge_mode"]``.
    log
        Progress messages (e.g. ``print``).

    Returns
    -------
    dict
        The content of ``metrics.json``.
    """
    from napari_sigmma.device import resolve_device
    from napari_sigmma.train.checkpoint import model_from_checkpoint
    from napari_sigmma.train.data import prepare_run_data

    t0 = time.perf_counter()
    out = Path(out)
    ckpt_path, ckpt = _load(checkpoint)
    cfg = eval_config(ckpt, ckpt_path, data)
    run = run_dir_of(ckpt_path)
    split_path = Path(split) if split is not None else run / "split.json"
    if split is not None and not split_path.is_file():
        raise SigmmaError("split file not found", path=split_path)
    split_source = str(split_path) if split_path.is_file() else "recomputed from the config"

    _say(log, f"loading {ckpt_path}")
    model, featurizer = model_from_checkpoint(ckpt)
    dev = resolve_device(device or "auto")
    model.to(dev).eval()
    from napari_sigmma.models.edges import get_edge_mode, set_edge_mode

    if edge_mode is not None:
        set_edge_mode(model, edge_mode)
    mode_used = (get_edge_mode(model) or {}).get("mode")
    rd = prepare_run_data(
        cfg, split_path=split_path if split_path.is_file() else None, featurizer=featurizer
    )
    assert rd is not None
    inp = prepare_inputs(
        model,
        cfg,
        rd,
        n_node_features=int(ckpt["n_node_features"]),
        n_genes=int(ckpt["n_genes"]),
        device=dev,
        frozen_baseline=frozen_baseline,
        log=log,
    )
    _say(log, "Task 1 probes and Task 2 retrieval")
    metrics, extras = compute_metrics(
        inp, scales=cfg.model.scales, seed=seed, recalibrate=recalibrate
    )
    thr = {}
    if throughput_tiles > 0:
        _say(log, f"timing HE encoding on {throughput_tiles} tiles (paper and fast modes)")
        thr = measure_throughput(
            model, rd.slides, rd.entries["test"], device=dev, n=throughput_tiles
        )
    mcfg = cfg.model.to_dict()
    metrics.update(
        {
            "checkpoint": str(ckpt_path),
            "data": list(cfg.data),
            "run_dir": str(run),
            "variant": variant_name(mcfg),
            "label": variant_name(mcfg),
            "model": {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in mcfg.items()
                if k
                in (
                    "backbone",
                    "finetune",
                    "fast_multicrop",
                    "scales",
                    "use_graph",
                    "sparsify",
                    "embed_dim",
                    "img_size",
                )
            },
            "epochs_trained": int(ckpt.get("epoch", 0)),
            "split": {
                "source": split_source,
                "counts": rd.split.counts(),
                "test_ids_sha1": _ids_hash(inp.test_ids),
                "train_ids_sha1": _ids_hash(inp.train_ids),
            },
            "throughput": thr,
            "device": str(dev),
            "seconds": 0.0,
            "edge_mode": mode_used,
            "diagnostics": inp.diagnostics,
        }
    )
    metrics["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    result = EvalResult(
        metrics=metrics, probe=extras["probes"][HEADLINE], frozen_probe=extras["frozen_probe"]
    )
    if dump_embeddings:
        dump_npz(out / "embeddings.npz", inp, metrics, extras)
        metrics["embeddings"] = str(out / "embeddings.npz")
    write_json(out / "metrics.json", metrics)
    if report:
        from napari_sigmma.evaluation.report import write_report

        write_report(result, out)
    _say(log, f"wrote {out / 'metrics.json'}")
    return metrics


def dump_npz(path: Path, inp: EvalInputs, metrics: dict[str, Any], extras: dict[str, Any]):
    """``embeddings.npz``: enough to recompute every number of ``metrics.json``.

    Keys: ``he_<scale>``, ``st_<scale>`` (test tiles), ``train_he_<scale>``,
    ``frozen_<scale>`` / ``train_frozen_<scale>`` (when evaluated), ``targets_test`` /
    ``targets_train`` (log1p, the chosen genes), ``expr_test`` / ``expr_train`` (mean
    log-expression, all genes), ``pred_test`` (headline probe predictions), ``genes``,
    ``all_genes``, ``test_ids``, ``train_ids``, ``concat_scales``, ``seed``.
    """
    arrays: dict[str, np.ndarray] = {}
    for s, v in inp.he_test.items():
        arrays[f"he_{s}"] = v
    for s, v in inp.st_test.items():
        arrays[f"st_{s}"] = v
    for s, v in inp.he_train.items():
        arrays[f"train_he_{s}"] = v
    for s, v in inp.frozen_test.items():
        arrays[f"frozen_{s}"] = v
    for s, v in inp.frozen_train.items():
        arrays[f"train_frozen_{s}"] = v
    arrays.update(
        targets_test=extras["y_test"],
        targets_train=extras["y_train"],
        expr_test=inp.expr_test,
        expr_train=inp.expr_train,
        pred_test=extras["probes"][HEADLINE].y_pred,
        genes=np.array(metrics["genes"], dtype=str),
        all_genes=np.array(inp.genes, dtype=str),
        test_ids=np.array(inp.test_ids, dtype=str),
        train_ids=np.array(inp.train_ids, dtype=str),
        concat_scales=np.array(metrics["concat_scales"], dtype=str),
        seed=np.array(int(metrics["seed"])),
    )
    atomic_savez(path, arrays, compressed=True)


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``metrics.json`` (file or report folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise SigmmaError(f"cannot read metrics: {err}", path=p) from err


# ----------------------------------------------------------------------------- compare


def compare_runs(
    runs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    data: Any = None,
    device: str | None = None,
    split: str | os.PathLike[str] | None = None,
    log: Log = None,
    **eval_kwargs: Any,
) -> dict[str, Any]:
    """One table over several runs (the paper's Tables 1, 2 and 4).

    Each item of ``runs`` is a report folder / ``metrics.json`` (read as is) or a run folder
    / checkpoint (evaluated first into ``<out>/runs/<name>``). The frozen-backbone row is
    taken from the first run that has one. Writes ``compare.md``, ``compare.json`` and
    ``compare_recall.png`` into ``out``.
    """
    from napari_sigmma.evaluation.report import write_compare

    out = Path(out)
    items: list[dict[str, Any]] = []
    for r in runs:
        p = Path(r)
        if (p.is_dir() and (p / "metrics.json").is_file()) or (p.is_file() and p.suffix == ".json"):
            items.append(read_metrics(p))
            continue
        if (p.is_dir() and (p / "checkpoints").is_dir()) or p.suffix == ".pt":
            name = p.name if p.is_dir() else run_dir_of(p).name
            _say(log, f"evaluating {p}")
            items.append(
                evaluate(
                    data,
                    p,
                    out / "runs" / name,
                    device=device,
                    split=split,
                    log=log,
                    **eval_kwargs,
                )
            )
            continue
        raise SigmmaError(
            "neither a report folder (metrics.json) nor a run folder (checkpoints/)", path=p
        )
    return write_compare(items, out)


# ----------------------------------------------------------------------------- CLI


def _fmt_summary(m: dict[str, Any]) -> str:
    t1, t2 = m["task1"], m["task2"]
    lines = [
        f"{m.get('label', '')}: {m['n_train_tiles']} train / {m['n_test_tiles']} test tiles, "
        f"{len(m['genes'])} genes",
        f"  Task 1 ({t1['embedding']}): PCC {t1['pcc_mean']:.3f} ± {t1['pcc_std']:.3f}, "
        f"MSE {t1['mse_mean']:.4f} ± {t1['mse_std']:.4f}, per-gene PCC "
        f"{t1['per_gene_pcc_mean']:.3f}"
        + (
            f", recalibrated MSE {t1['mse_recalibrated_mean']:.4f}"
            if t1.get("mse_recalibrated_mean") is not None
            else ""
        ),
    ]
    for d, name in (("he_to_st", "HE→ST"), ("st_to_he", "ST→HE")):
        vals = ", ".join(f"{k} {t2[d][k]:.3f} (chance {t2['chance'][k]:.3f})" for k in t2[d])
        lines.append(f"  Task 2 {name}: {vals}")
    fb = m.get("frozen_backbone", {})
    if "task1" in fb:
        lines.append(
            f"  frozen backbone: PCC {fb['task1']['pcc_mean']:.3f}, MSE "
            f"{fb['task1']['mse_mean']:.4f}, HE→ST R@5% {fb['task2']['he_to_st']['R@5%']:.3f}"
        )
    thr = m.get("throughput") or {}
    if "paper" in thr:
        lines.append(
            f"  HE encoding: paper-exact {thr['paper']['tiles_per_s']:.2f} tiles/s, fast "
            f"{thr['fast']['tiles_per_s']:.2f} tiles/s ({thr['speedup']:.1f}x)"
        )
    return "\n".join(lines)
