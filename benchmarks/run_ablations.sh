#!/usr/bin/env bash
# MorphoQuant ablations (issue 3) on a real model: the paper recipe and one change at a time.
# usage: [THREADS=N] benchmarks/run_ablations.sh [MODEL] [OUT]   (defaults: smollm2-135m, runs/ablations-MODEL)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-smollm2-135m}
OUT=${2:-runs/ablations-$MODEL}
A=benchmarks/ablations
morphoquant ${THREADS:+--threads $THREADS} --quiet compare "$MODEL" -r rtn-w4a4-static -r morpho \
  -r $A/abl-no-dabc.yaml -r $A/abl-no-mdqfo.yaml -r $A/abl-lp-only.yaml -r $A/abl-sparse.yaml \
  -r $A/abl-budget-2.yaml -r $A/abl-budget-10.yaml \
  --calib 16 --seq-len 512 --eval-size 8 --set calibration.max_rows_per_layer=1024 --out "$OUT"
