#!/usr/bin/env bash
# The method issue's comparison (docs/results/multicrop.md): fast vs paper-exact multi-crop,
# before and after the fixes, on the layout benchmark's 1,600 tiles (one seed, one split).
# Usage: docs/results/run_multicrop.sh WORK_DIR   (from the repository root)
set -euo pipefail
W=${1:?work folder}
S=.venv/bin/napari-sigmma
R=docs/results
mkdir -p "$W"
[ -f "$W/layout40/experiment.xenium" ] || \
  $S sample --synthetic --layout-benchmark --layout-tiles 40 --seed 0 --out "$W/layout40"
# fast, after = the Table 4 reference config
for v in fast_after:table4_tiny fast_before:multicrop_fast_before \
         exact_after:multicrop_paper_after exact_before:multicrop_paper_before; do
  name=${v%%:*}; cfg=${v##*:}
  [ -f "$W/$name/checkpoints/best.pt" ] || \
    $S train --data "$W/layout40" --config "$R/$cfg.yaml" --out "$W/$name" --quiet
done
# "after" models with today's default inference (expected), "before" ones with the old
# threshold rule, and once more with expected (to separate training from inference)
$S evaluate --checkpoint "$W/fast_after" --out "$W/eval_fast_after" --device cpu --quiet \
  --dump-embeddings --throughput-tiles 16
$S evaluate --checkpoint "$W/exact_after" --out "$W/eval_exact_after" --device cpu --quiet \
  --dump-embeddings --throughput-tiles 0
$S evaluate --checkpoint "$W/fast_before" --out "$W/eval_fast_before" --device cpu --quiet \
  --edge-mode threshold --dump-embeddings --throughput-tiles 16
$S evaluate --checkpoint "$W/exact_before" --out "$W/eval_exact_before" --device cpu --quiet \
  --edge-mode threshold --dump-embeddings --throughput-tiles 0
for v in fast_before exact_before; do
  $S evaluate --checkpoint "$W/$v" --out "$W/eval_${v}_expected" --device cpu --quiet \
    --dump-embeddings --throughput-tiles 0
done
.venv/bin/python $R/collect_multicrop.py "$W"
