"""Fast vs paper-exact multi-crop, before and after the method fixes (the method issue).

Reads the evaluation folders written by ``docs/results/run_multicrop.sh WORK`` and prints a
markdown report: HE encoding speed of both modes, Task 1 and Task 2 per scale, the
edge-sampler and scale-input diagnostics, and paired bootstrap 95 % CIs over the test tiles
(one seed each, the same split) for after − before in each mode and fast − paper after.

Usage: ``.venv/bin/python docs/results/collect_multicrop.py WORK > OUT.md``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from napari_sigmma.constants import SCALES
from napari_sigmma.evaluation.stats import paired_bootstrap, retrieval_hits, tile_pcc

RUNS = {
    "fast, before": "eval_fast_before",
    "fast, after": "eval_fast_after",
    "paper, before": "eval_exact_before",
    "paper, after": "eval_exact_after",
    "fast, before (expected-mode inference)": "eval_fast_before_expected",
    "paper, before (expected-mode inference)": "eval_exact_before_expected",
}
PAIRS = [
    ("fast: after − before", "fast, after", "fast, before"),
    ("paper: after − before", "paper, after", "paper, before"),
    ("after: fast − paper", "fast, after", "paper, after"),
    ("before: fast − paper", "fast, before", "paper, before"),
]


def per_tile(npz: Path) -> dict[str, np.ndarray]:
    """Per-tile Task 1 PCC (headline probe) and R@5 % hits per scale, both directions."""
    z = np.load(npz, allow_pickle=False)
    out = {"pcc": tile_pcc(z["pred_test"], z["targets_test"])}
    for s in SCALES:
        hits = retrieval_hits(z[f"he_{s}"], z[f"st_{s}"], 0.05)
        for d, v in hits.items():
            out[f"{s}/{d}"] = np.asarray(v, np.float64)
    out["ids"] = np.asarray([str(t) for t in z["test_ids"]])
    return out


def main(work: Path) -> str:
    m = {k: json.loads((work / v / "metrics.json").read_text()) for k, v in RUNS.items()
         if (work / v / "metrics.json").is_file()}  # fmt: skip
    lines = [f"Test tiles: {next(iter(m.values()))['n_test_tiles']}; one seed (0) per model, "
             "the same split (`split_block` 4, 70/15/15)."]  # fmt: skip
    lines += ["", "## HE encoding speed (tiles/s, one tile per call, CPU)", ""]
    lines += ["| model | paper-exact | fast | speed-up |", "|---|---|---|---|"]
    for k, v in m.items():
        t = v.get("throughput") or {}
        if t:
            lines.append(
                f"| {k} | {t['paper']['tiles_per_s']:.2f} | {t['fast']['tiles_per_s']:.2f} "
                f"| {t['speedup']:.1f}× |"
            )
    lines += ["", "## Task 1 (ridge probe, PCC / MSE) and Task 2 (R@5 %, HE→ST / ST→HE)", ""]
    head = "| model | edge mode |" + "".join(f" {s} PCC | {s} R@5% |" for s in SCALES)
    lines += [head, "|---|---|" + "---|---|" * len(SCALES)]
    for k, v in m.items():
        row = f"| {k} | {v.get('edge_mode', '?')} |"
        for s in SCALES:
            b = v["by_embedding"][s]
            t2 = b["task2"]
            row += (
                f" {b['task1']['pcc_mean']:.3f} / {b['task1']['mse_mean']:.3f} |"
                f" {t2['he_to_st']['R@5%']:.3f} / {t2['st_to_he']['R@5%']:.3f} |"
            )
        lines.append(row)
    lines += ["", "## Sampler and scale-input diagnostics (test tiles)", ""]
    keys = ["accept_train", "accept_eval", "score_mean", "score_std", "frac_uncertain",
            "edges_per_node"]  # fmt: skip
    lines += ["| model | stage | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for k, v in m.items():
        edges = (v.get("diagnostics") or {}).get("edges") or {}
        for stage, d in edges.items():
            if not isinstance(d, dict):
                continue
            vals = " | ".join(f"{d.get(x, float('nan')):.3f}" for x in keys)
            lines.append(f"| {k} | {stage} | {vals} |")
    lines += ["", "| model | micro vs macro | meso vs macro |", "|---|---|---|"]
    for k, v in m.items():
        r = ((v.get("diagnostics") or {}).get("scales") or {}).get("input_rel_diff") or {}
        if r:
            lines.append(
                f"| {k} | {r.get('micro_vs_macro', float('nan')):.3f} | "
                f"{r.get('meso_vs_macro', float('nan')):.3f} |"
            )
    tiles = {k: per_tile(work / RUNS[k] / "embeddings.npz") for k in m
             if (work / RUNS[k] / "embeddings.npz").is_file()}  # fmt: skip
    lines += ["", "## Paired bootstrap 95 % CIs over the test tiles (2,000 resamples)", ""]
    cols = ["pcc"] + [f"{s}/he_to_st" for s in SCALES]
    lines += ["| comparison | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, a, b in PAIRS:
        if a not in tiles or b not in tiles:
            continue
        assert (tiles[a]["ids"] == tiles[b]["ids"]).all(), "different test tiles"
        cells = []
        for c in cols:
            ci = paired_bootstrap(tiles[a][c], tiles[b][c])
            star = " *" if ci["excludes_zero"] else ""
            cells.append(f"{ci['gap']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]{star}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("`*`: the interval excludes 0. `pcc`: Task 1 per-tile PCC of the headline probe.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
