"""``report.md`` and PNG plots of an evaluation, and the comparison table over runs.

Plots use matplotlib's object API on the Agg canvas (no ``pyplot``), so writing a report
never touches the backend of a running napari / Qt session.

- ``pred_vs_measured.png``: predicted vs measured expression of the best and worst genes
  (per-gene PCC) on the test tiles, with the identity line and the fitted calibration line.
- ``calibration.png``: per-gene calibration of the probe (measured ≈ slope · predicted +
  intercept on test tiles; slope < 1 with a positive intercept is the paper's known
  weakness), and the MSE before / after the recalibration fitted on out-of-fold
  predictions of the training tiles.
- ``recall_curves.png``: Recall@p% for p = 1..100 %, both directions, per embedding, the
  frozen backbone and chance.
- ``compare_recall.png`` (comparison): the headline recall curves of every run.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_sigmma.evaluation.results import EvalResult

SCALE_ORDER = ("micro", "meso", "macro", "concat")
#: A leave-one-out order (each removal hurts, the graph most). NOT Table 4: the paper's rows
#: are cumulative and row 2 (PCC 0.268) is below row 1 (0.345); see :mod:`.table4`.
PAPER_ORDER = ("full", "no_sparsify", "single_scale", "no_graph")
VARIANT_TITLES = {
    "full": "SIGMMA (full)",
    "no_graph": "no cell graph",
    "single_scale": "single scale (macro loss only)",
    "no_sparsify": "no sparsification",
    "bleep": "BLEEP-style (gene vector, single scale)",
    "frozen_backbone": "frozen backbone",
}


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _pm(m: float | None, s: float | None, nd: int = 3) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    if s is None:
        return f"{m:.{nd}f}"
    return f"{m:.{nd}f} ± {s:.{nd}f}"


def _f(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{nd}f}"


def mse_digits(values: list[float]) -> int:
    """Enough decimals to tell MSE values apart (at least 3)."""
    vals = [abs(v) for v in values if v is not None and v == v and v != 0]
    if not vals:
        return 3
    return max(3, min(6, 2 - math.floor(math.log10(min(vals)))))


# ----------------------------------------------------------------------------- plots


def plot_pred_vs_measured(probe: Any, path: Path, *, n_each: int = 3) -> None:
    """Scatter predicted vs measured for the ``n_each`` best and worst genes."""
    r = {g: v for g, v in probe.gene_pcc.items() if v == v}
    order = sorted(r, key=lambda g: -r[g])
    n_each = max(1, min(n_each, len(order) // 2 or 1))
    picks = [("best", g) for g in order[:n_each]] + [("worst", g) for g in order[-n_each:][::-1]]
    fig = _figure(3.2 * n_each, 6.2)
    col = {g: j for j, g in enumerate(probe.genes)}
    for k, (kind, g) in enumerate(picks):
        ax = fig.add_subplot(2, n_each, k + 1)
        j = col[g]
        y, p = probe.y_true[:, j], probe.y_pred[:, j]
        ax.scatter(y, p, s=7, alpha=0.6, color="tab:blue" if kind == "best" else "tab:red")
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        pad = 0.05 * (hi - lo) if hi > lo else 0.5
        lo, hi = lo - pad, hi + pad
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--", label="y = x")
        if g in probe.calibration:
            s, b = probe.calibration[g]
            # the calibration line, measured = s·pred + b, drawn as pred against measured
            ps = np.linspace(lo, hi, 50)
            ax.plot(s * ps + b, ps, color="k", lw=1, label="calibration fit")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(f"{kind}: {g}  (r = {r[g]:.2f})", fontsize=9)
        ax.set_xlabel("measured log1p", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Task 1: predicted vs measured expression on test tiles", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_calibration(probe: Any, summary: dict[str, Any], path: Path) -> None:
    """Per-gene slope and intercept (sorted by per-gene PCC) and the MSE before/after."""
    genes = [
        g
        for g in sorted(probe.gene_pcc, key=lambda g: -np.nan_to_num(probe.gene_pcc[g]))
        if g in probe.calibration
    ]
    fig = _figure(max(7.0, 0.16 * len(genes) + 2), 6.0)
    ax1 = fig.add_subplot(2, 1, 1)
    ax2 = fig.add_subplot(2, 1, 2, sharex=ax1)
    x = np.arange(len(genes))
    slopes = [probe.calibration[g][0] for g in genes]
    inter = [probe.calibration[g][1] for g in genes]
    ax1.bar(x, slopes, color="tab:purple")
    ax1.axhline(1.0, color="k", lw=1, ls="--")
    ax1.set_ylabel("slope", fontsize=8)
    ax1.set_title(
        "Per-gene calibration on test tiles: measured ≈ slope · predicted + intercept "
        "(genes by decreasing PCC)",
        fontsize=9,
    )
    ax2.bar(x, inter, color="tab:orange")
    ax2.axhline(0.0, color="k", lw=1, ls="--")
    ax2.set_ylabel("intercept", fontsize=8)
    ax2.set_xticks(x)
    ax2.set_xticklabels(genes, rotation=90, fontsize=6)
    raw = summary.get("mse_mean")
    rec = summary.get("mse_recalibrated_mean")
    txt = f"MSE raw {raw:.4g}" + (
        f", recalibrated (cross-fitted on train) {rec:.4g}" if rec else ""
    )
    ax1.text(0.99, 0.95, txt, transform=ax1.transAxes, ha="right", va="top", fontsize=8)
    for ax in (ax1, ax2):
        ax.tick_params(axis="y", labelsize=7)
    ax1.tick_params(axis="x", labelbottom=False)
    fig.tight_layout()
    fig.savefig(path)


def plot_recall_curves(metrics: dict[str, Any], path: Path) -> None:
    """Recall@p% curves both directions for each embedding, the frozen backbone, chance."""
    fig = _figure(10, 4.2)
    by = metrics["by_embedding"]
    fb = metrics.get("frozen_backbone", {})
    styles = {"micro": ":", "meso": "-.", "macro": "-", "concat": "--"}
    head = metrics["task2"].get("embedding", "macro")
    for k, (d, title) in enumerate((("he_to_st", "HE → ST"), ("st_to_he", "ST → HE"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for name in SCALE_ORDER:
            if name not in by:
                continue
            c = by[name]["task2"]["curve"]
            ax.plot(
                np.array(c["p"]) * 100,
                c[d],
                ls=styles[name],
                lw=1.8 if name == head else 1.0,
                color="tab:blue",
                label=f"model {name}",
            )
        if "task2" in fb:
            c = fb["task2"]["curve"]
            ax.plot(
                np.array(c["p"]) * 100,
                c[d],
                color="tab:gray",
                lw=1.2,
                label="frozen backbone (ridge map)",
            )
        n = metrics["n_test_tiles"]
        ps = np.arange(1, 101)
        ax.plot(
            ps,
            [math.ceil(p / 100 * n - 1e-9) / n for p in ps],
            color="k",
            lw=0.8,
            ls="--",
            label="chance",
        )
        for p in (5, 10, 15):
            ax.axvline(p, color="0.85", lw=0.8, zorder=0)
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("p (% of test tiles retrieved)", fontsize=8)
        ax.set_ylabel("Recall@p%", fontsize=8)
        ax.set_title(f"Task 2 {title} (N = {n})", fontsize=9)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------- report.md


def _t1_row(name: str, t1: dict[str, Any], nd: int) -> str:
    return (
        f"| {name} | {_pm(t1['pcc_mean'], t1['pcc_std'])} | "
        f"{_pm(t1['mse_mean'], t1['mse_std'], nd)} | {_f(t1.get('per_gene_pcc_mean'))} | "
        f"{_f(t1.get('mse_recalibrated_mean'), nd)} |"
    )


def _t2_row(name: str, t2: dict[str, Any]) -> str:
    cells = [_f(t2[d][k]) for d in ("he_to_st", "st_to_he") for k in t2[d]]
    return f"| {name} | " + " | ".join(cells) + " |"


def write_report(result: EvalResult, out: Path) -> Path:
    """Write ``report.md`` and the PNG plots of one evaluation into ``out``.

    One long function on purpose: it writes the report top to bottom, so the code reads in
    the order of the Markdown it produces.
    """
    out = Path(out)
    m = result.metrics
    plot_pred_vs_measured(result.probe, out / "pred_vs_measured.png")
    plot_calibration(result.probe, m["task1"], out / "calibration.png")
    plot_recall_curves(m, out / "recall_curves.png")

    by = m["by_embedding"]
    fb = m.get("frozen_backbone", {})
    mses = [by[n]["task1"]["mse_mean"] for n in by]
    if "by_embedding" in fb:
        mses += [fb["by_embedding"][n]["task1"]["mse_mean"] for n in fb["by_embedding"]]
    nd = mse_digits(mses)
    L: list[str] = []
    L.append(
        f"# SIGMMA evaluation — {VARIANT_TITLES.get(m['variant'].split('+')[0], m['variant'])}"
        + (" (fast multi-crop)" if m["variant"].endswith("+fast") else "")
    )
    L.append("")
    L.append(f"- checkpoint: `{m['checkpoint']}` (epochs trained: {m.get('epochs_trained')})")
    L.append(f"- data: {', '.join(f'`{d}`' for d in m['data'])}")
    mod = m.get("model", {})
    L.append(
        f"- model: backbone `{mod.get('backbone')}` ({mod.get('finetune')}), scales "
        f"{', '.join(mod.get('scales', []))}, cell graph {mod.get('use_graph')}, "
        f"sparsification {mod.get('sparsify')}, fast multi-crop {mod.get('fast_multicrop')}"
    )
    sp = m.get("split", {})
    L.append(
        f"- split: {sp.get('source')} — tiles {sp.get('counts')}; evaluated on "
        f"{m['n_test_tiles']} test tiles, probe fitted on {m['n_train_tiles']} train tiles"
    )
    L.append(f"- targets: {m['targets']}; {len(m['genes'])} genes")
    L.append(
        f"- headline embedding: `{m['task1'].get('embedding')}` (the whole tile); `concat` = "
        f"L2-normalised embeddings of {', '.join(m.get('concat_scales', []))} side by side"
    )
    L.append("")
    L.append("## Task 1 — gene-expression prediction (HEST-bench ridge probe)")
    L.append("")
    L.append(
        "Tile-level PCC and MSE: per test tile, between the predicted and measured gene "
        "vectors, mean ± std over tiles (the paper's tables). Per-gene PCC: per gene across "
        "test tiles, averaged (the HEST benchmark's). Recalibrated MSE: after a per-gene "
        "linear map fitted on out-of-fold (5-fold) probe predictions of the training tiles."
    )
    L.append("")
    L.append("| embedding | PCC (tile) ↑ | MSE (tile) ↓ | per-gene PCC ↑ | MSE recalibrated ↓ |")
    L.append("|---|---|---|---|---|")
    for n in SCALE_ORDER:
        if n in by:
            L.append(_t1_row(f"model {n}", by[n]["task1"], nd))
    if "by_embedding" in fb:
        for n in SCALE_ORDER:
            if n in fb["by_embedding"]:
                L.append(_t1_row(f"frozen backbone {n}", fb["by_embedding"][n]["task1"], nd))
    elif "skipped" in fb:
        L.append("")
        L.append(f"Frozen backbone: {fb['skipped']}")
    L.append("")
    if "by_embedding" in fb:
        note = (
            "Frozen backbone: crop features mean-pooled per scale, no heads; `macro` = the "
            "whole tile, `concat` = its distinct per-scale features "
            f"({', '.join(fb.get('concat_scales', []))}) L2-normalised side by side."
        )
        if mod.get("fast_multicrop"):
            note += (
                " In the fast multi-crop mode its micro, meso and macro features coincide "
                "(the mean of equal-sized region means is the mean over the whole tile)."
            )
        L.append(note)
        L.append("")
    pg = m["task1"]["per_gene_pcc"]
    ranked = sorted((g for g in pg if pg[g] is not None), key=lambda g: -pg[g])
    if ranked:
        L.append(
            "Best genes: "
            + ", ".join(f"{g} {pg[g]:.2f}" for g in ranked[:8])
            + ". Worst genes: "
            + ", ".join(f"{g} {pg[g]:.2f}" for g in ranked[-8:][::-1])
            + ". (All in `metrics.json`.)"
        )
        L.append("")
    cal = m["task1"].get("calibration", {})
    if cal:
        sl = np.array([c["slope"] for c in cal.values()])
        ic = np.array([c["intercept"] for c in cal.values()])
        L.append(
            f"Calibration (test tiles, measured ≈ slope · predicted + intercept): median slope "
            f"{np.median(sl):.3f} ({(sl < 1).mean():.0%} of genes below 1), median intercept "
            f"{np.median(ic):.3f}. Raw MSE {_f(m['task1']['mse_mean'], nd)}; after the "
            "per-gene recalibration cross-fitted on the training tiles "
            f"{_f(m['task1'].get('mse_recalibrated_mean'), nd)}."
        )
        L.append("")
    L.append("![predicted vs measured](pred_vs_measured.png)")
    L.append("")
    L.append("![calibration](calibration.png)")
    L.append("")
    t2 = m["task2"]
    L.append("## Task 2 — cross-modal retrieval")
    L.append("")
    L.append(
        f"Candidate pool: all {m['n_test_tiles']} test tiles; a hit is the true partner among "
        f"the top ⌈p·N⌉ candidates by cosine similarity."
    )
    L.append("")
    ks = list(t2["he_to_st"])
    L.append(
        "| embedding | "
        + " | ".join(f"HE→ST {k}" for k in ks)
        + " | "
        + " | ".join(f"ST→HE {k}" for k in ks)
        + " |"
    )
    L.append("|---|" + "---|" * (2 * len(ks)))
    for n in SCALE_ORDER:
        if n in by:
            L.append(_t2_row(f"model {n}", by[n]["task2"]))
    if "by_embedding" in fb:
        for n in SCALE_ORDER:
            if n in fb["by_embedding"]:
                L.append(
                    _t2_row(f"frozen backbone {n} (ridge map)", fb["by_embedding"][n]["task2"])
                )
    L.append(
        "| chance | "
        + " | ".join(_f(t2["chance"][k]) for k in ks)
        + " | "
        + " | ".join(_f(t2["chance"][k]) for k in ks)
        + " |"
    )
    L.append("")
    L.append("![recall curves](recall_curves.png)")
    L.append("")
    thr = m.get("throughput") or {}
    if "paper" in thr:
        L.append("## HE encoding speed")
        L.append("")
        L.append(
            f"Backbone + heads on {thr['n_tiles']} tiles, one at a time, device "
            f"`{thr['device']}`, {thr['threads']} thread(s); the model runs in the "
            f"{thr['mode']} mode."
        )
        L.append("")
        L.append("| multi-crop mode | tiles/s |")
        L.append("|---|---|")
        L.append(f"| paper-exact (21 resized crops) | {thr['paper']['tiles_per_s']:.2f} |")
        L.append(f"| fast (one pass, region pooling) | {thr['fast']['tiles_per_s']:.2f} |")
        L.append("")
        L.append(f"Speed-up of the fast mode: {thr['speedup']:.1f}×.")
        L.append("")
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path


# ----------------------------------------------------------------------------- compare


def _rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows: the frozen backbone (once per backbone and multi-crop mode, from the
    first run that has it) then every run."""
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for m in items:
        fb = m.get("frozen_backbone", {})
        mo = m.get("model", {})
        v = "frozen_backbone" + ("+fast" if mo.get("fast_multicrop") else "")
        if "task1" in fb and not any(
            r["variant"] == v and r["model"].get("backbone") == mo.get("backbone") for r in rows
        ):
            rows.append(
                {
                    "variant": v,
                    "label": "frozen backbone" + (" (fast)" if v.endswith("+fast") else ""),
                    "task1": fb["task1"],
                    "task2": fb["task2"],
                    "model": {
                        **m.get("model", {}),
                        "use_graph": None,
                        "scales": None,
                        "sparsify": None,
                    },
                    "throughput": None,
                    "split": m.get("split", {}),
                    "n_test_tiles": m["n_test_tiles"],
                }
            )
    for m in items:
        v = m.get("variant", "run")
        seen[v] = seen.get(v, 0) + 1
        label = m.get("label", v)
        if seen[v] > 1:
            label = f"{label} ({Path(m.get('run_dir', '')).name or seen[v]})"
        rows.append(
            {
                "variant": v,
                "label": label,
                "task1": m["task1"],
                "task2": m["task2"],
                "model": m.get("model", {}),
                "throughput": m.get("throughput"),
                "split": m.get("split", {}),
                "n_test_tiles": m["n_test_tiles"],
                "run_dir": m.get("run_dir"),
            }
        )
    return rows


def _mark(v: Any) -> str:
    return "–" if v is None else ("✓" if v else " ")


def _r5(row: dict[str, Any]) -> float:
    t2 = row["task2"]
    return 0.5 * (t2["he_to_st"]["R@5%"] + t2["st_to_he"]["R@5%"])


def order_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Does the leave-one-out order (full > no sparsification > single scale > no graph; not
    Table 4, whose rows are cumulative: :func:`.table4.order_vs_published`)
    hold, for Task 1 (tile PCC) and Task 2 (mean R@5% of both directions)?"""
    full = next((r for r in rows if r["variant"].split("+")[0] == "full"), None)
    fast = full["variant"].endswith("+fast") if full else False
    want = [v + ("+fast" if fast else "") for v in PAPER_ORDER]
    have = {r["variant"]: r for r in rows}
    present = [v for v in want if v in have]
    out: dict[str, Any] = {"expected": list(want), "present": present}
    if len(present) < 2:
        out["note"] = "fewer than two of the ablation rows are present"
        return out
    for task, key, se in (
        ("task1_pcc", lambda r: r["task1"]["pcc_mean"], _se_pcc),
        ("task2_r5", _r5, _se_r5),
    ):
        vals = {v: float(key(have[v])) for v in present}
        ses = {v: float(se(have[v])) for v in present}
        observed = sorted(present, key=lambda v: -vals[v])
        # neighbours in the expected order whose gap is within 2 standard errors
        unresolved = [
            [a, b]
            for a, b in itertools.pairwise(present)
            if abs(vals[a] - vals[b]) < 2 * math.hypot(ses[a], ses[b])
        ]
        out[task] = {
            "values": vals,
            "standard_errors": ses,
            "observed_order": observed,
            "holds": observed == present,
            "within_noise": unresolved,
        }
    return out


def _se_pcc(row: dict[str, Any]) -> float:
    """Standard error of the mean tile PCC (std / sqrt(N))."""
    return row["task1"]["pcc_std"] / math.sqrt(max(row["n_test_tiles"], 1))


def _se_r5(row: dict[str, Any]) -> float:
    """Standard error of the mean of the two R@5% (binomial, each over N queries)."""
    n = max(row["n_test_tiles"], 1)
    t2 = row["task2"]
    v = [t2[d]["R@5%"] * (1 - t2[d]["R@5%"]) / n for d in ("he_to_st", "st_to_he")]
    return 0.5 * math.sqrt(sum(v))


def compare_markdown(rows: list[dict[str, Any]], check: dict[str, Any]) -> str:
    """The comparison tables (Task 1 like the paper's Tables 1/4, Task 2 like Table 2)."""
    nd = mse_digits([r["task1"]["mse_mean"] for r in rows])
    L = ["# Comparison on one split", ""]
    splits = {r["split"].get("test_ids_sha1") for r in rows}
    n = {r["n_test_tiles"] for r in rows}
    if len(splits) == 1:
        L.append(f"All rows use the same {n.pop()} test tiles (split hash {splits.pop()}).")
    else:
        L.append(
            "**Warning: the rows do not share the same test tiles** (split hashes "
            + ", ".join(sorted(str(s) for s in splits))
            + ")."
        )
    L.append("")
    L.append("## Task 1 — gene-expression prediction (tile-level mean ± std over test tiles)")
    L.append("")
    L.append(
        "| model | cell graph | multi-scale | sparsification | MSE ↓ | PCC ↑ | "
        "per-gene PCC ↑ | MSE recalibrated ↓ |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mo, t1 = r["model"], r["task1"]
        ms = None if mo.get("scales") is None else len(mo["scales"]) > 1
        L.append(
            f"| {r['label']} | {_mark(mo.get('use_graph'))} | {_mark(ms)} | "
            f"{_mark(mo.get('sparsify') if mo.get('use_graph') else None)} | "
            f"{_pm(t1['mse_mean'], t1['mse_std'], nd)} | {_pm(t1['pcc_mean'], t1['pcc_std'])} | "
            f"{_f(t1.get('per_gene_pcc_mean'))} | {_f(t1.get('mse_recalibrated_mean'), nd)} |"
        )
    L.append("")
    L.append("## Task 2 — cross-modal retrieval")
    L.append("")
    ks = list(rows[0]["task2"]["he_to_st"])
    L.append(
        "| model | "
        + " | ".join(f"HE→ST {k}" for k in ks)
        + " | "
        + " | ".join(f"ST→HE {k}" for k in ks)
        + " |"
    )
    L.append("|---|" + "---|" * (2 * len(ks)))
    for r in rows:
        L.append(_t2_row(r["label"], r["task2"]))
    ch = rows[0]["task2"]["chance"]
    L.append(
        "| chance | "
        + " | ".join(_f(ch[k]) for k in ks)
        + " | "
        + " | ".join(_f(ch[k]) for k in ks)
        + " |"
    )
    L.append("")
    if any(r["variant"].startswith("frozen_backbone") for r in rows):
        L.append(
            "The frozen backbone has no ST encoder: its Task 2 row retrieves with a ridge "
            "map from HE features to the tiles' mean log-expression, fitted on train tiles."
        )
        L.append("")
    thr = [r for r in rows if r.get("throughput") and "paper" in r["throughput"]]
    if thr:
        L.append("## HE encoding speed (tiles/s, backbone + heads, batch of one)")
        L.append("")
        L.append("| model | trained in | paper-exact | fast multi-crop | speed-up |")
        L.append("|---|---|---|---|---|")
        for r in thr:
            t = r["throughput"]
            L.append(
                f"| {r['label']} | {t['mode']} | {t['paper']['tiles_per_s']:.2f} | "
                f"{t['fast']['tiles_per_s']:.2f} | {t['speedup']:.1f}× |"
            )
        L.append("")
    L.append("## Leave-one-out order (not Table 4)")
    L.append("")
    L.append(
        "Table 4's rows are cumulative and its row 2 (cell graph, PCC 0.268) is below row 1 "
        "(gene vector, 0.345); `evaluate --baselines` without names trains those rows and "
        "compares with Table 4 as published."
    )
    L.append("")
    if "note" in check:
        L.append(f"Not checked: {check['note']}.")
    else:
        for task, title in (
            ("task1_pcc", "Task 1 (tile PCC)"),
            ("task2_r5", "Task 2 (mean R@5%, both directions)"),
        ):
            c = check[task]
            vals = ", ".join(f"{v} {c['values'][v]:.3f}" for v in c["observed_order"])
            verdict = "holds" if c["holds"] else "does NOT hold"
            noise = ""
            if c.get("within_noise"):
                pairs = "; ".join(f"{a} vs {b}" for a, b in c["within_noise"])
                noise = f" Gaps within 2 standard errors (not resolved by these tiles): {pairs}."
            L.append(
                f"- {title}: the leave-one-out order {' > '.join(check['present'])} {verdict} "
                "here "
                f"(observed: {vals}).{noise}"
            )
    full = next((r for r in rows if r["variant"].split("+")[0] == "full"), None)
    fb = None
    if full is not None:
        want = "frozen_backbone" + ("+fast" if full["variant"].endswith("+fast") else "")
        fb = next((r for r in rows if r["variant"] == want), None)
    if full and fb:
        b1 = full["task1"]["pcc_mean"] > fb["task1"]["pcc_mean"]
        b2 = _r5(full) > _r5(fb)
        L.append(
            f"- Full model vs frozen backbone: Task 1 PCC {full['task1']['pcc_mean']:.3f} vs "
            f"{fb['task1']['pcc_mean']:.3f} ({'better' if b1 else 'NOT better'}); Task 2 mean "
            f"R@5% {_r5(full):.3f} vs {_r5(fb):.3f} ({'better' if b2 else 'NOT better'})."
        )
    L.append("")
    L.append("![recall curves](compare_recall.png)")
    return "\n".join(L) + "\n"


def plot_compare_recall(rows: list[dict[str, Any]], path: Path) -> None:
    """Headline Recall@p% curves of every row, both directions."""
    fig = _figure(10, 4.2)
    for k, (d, title) in enumerate((("he_to_st", "HE → ST"), ("st_to_he", "ST → HE"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for r in rows:
            c = r["task2"].get("curve")
            if c:
                ax.plot(np.array(c["p"]) * 100, c[d], lw=1.2, label=r["label"])
        n = rows[0]["n_test_tiles"]
        ps = np.arange(1, 101)
        ax.plot(ps, [math.ceil(p / 100 * n - 1e-9) / n for p in ps], "k--", lw=0.8, label="chance")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("p (%)", fontsize=8)
        ax.set_ylabel("Recall@p%", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def write_compare(items: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write ``compare.md``, ``compare.json`` and ``compare_recall.png``; return the table
    (``{"rows", "order_check", "markdown"}``)."""
    from napari_sigmma.evaluation.results import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(items)
    check = order_check(rows)
    md = compare_markdown(rows, check)
    (out / "compare.md").write_text(md)
    plot_compare_recall(rows, out / "compare_recall.png")
    slim = [
        {
            "label": r["label"],
            "variant": r["variant"],
            "run_dir": r.get("run_dir"),
            "task1": {
                k: r["task1"][k]
                for k in (
                    "pcc_mean",
                    "pcc_std",
                    "mse_mean",
                    "mse_std",
                    "per_gene_pcc_mean",
                    "mse_recalibrated_mean",
                )
                if k in r["task1"]
            },
            "task2": {k: r["task2"][k] for k in ("he_to_st", "st_to_he", "chance")},
            "throughput": r.get("throughput"),
            "test_ids_sha1": r["split"].get("test_ids_sha1"),
        }
        for r in rows
    ]
    table = {"rows": slim, "order_check": check, "markdown": md}
    write_json(out / "compare.json", {"rows": slim, "order_check": check})
    return table
