#!/usr/bin/env bash
# The Table 4 headline (docs/results/table4.md, table4_layout.json, table4_synthetic.json).
# Usage: docs/results/run_table4.sh WORK_DIR   (from the repository root)
set -euo pipefail
W=${1:?work folder}
S=.venv/bin/napari-sigmma
mkdir -p "$W"
# 1. the layout benchmark: 40 x 40 tiles (1,600; ~1,120 training tiles with 70/15/15)
[ -f "$W/layout40/experiment.xenium" ] || \
  $S sample --synthetic --layout-benchmark --layout-tiles 40 --seed 0 --out "$W/layout40"
# 2. the reference (full model, seed 0), then every Table 4 row, the leave-one-out
#    variants, the floors and the controls, 3 seeds each, on the reference's split
[ -f "$W/layout_ref/checkpoints/best.pt" ] || \
  $S train --data "$W/layout40" --config docs/results/table4_tiny.yaml --out "$W/layout_ref" --quiet
$S evaluate --checkpoint "$W/layout_ref" --out "$W/layout_report" --baselines --seeds 3 \
  --device cpu --throughput-tiles 0
# 3. the same on the default synthetic sample (4096 px)
[ -f "$W/synthetic/experiment.xenium" ] || $S sample --synthetic --seed 0 --out "$W/synthetic"
[ -f "$W/synthetic_ref/checkpoints/best.pt" ] || \
  $S train --data "$W/synthetic" --config docs/results/table4_tiny.yaml --out "$W/synthetic_ref" --quiet
$S evaluate --checkpoint "$W/synthetic_ref" --out "$W/synthetic_report" --baselines --seeds 3 \
  --device cpu --throughput-tiles 0
