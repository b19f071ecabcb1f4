#!/usr/bin/env bash
# The OmniMini omni table (issue 6): every method on the real omni-modal OmniMini, one `compare` per group.
# usage: [THREADS=1] [EVAL=24] [CALIB=8] [SEQ=128] benchmarks/run_omni_table.sh [GROUP...]
#   groups (default: all, in this order): table baselines calib formats w8a8
#   table     FP, RTN W8A8/W4A8/W4A4/W4A4-static and the four MorphoQuant recipes       -> runs/omni-table
#   baselines SmoothQuant, GPTQ, QuaRot, MBQ-style, MQuant-style at W4A4                  -> runs/omni-baselines
#   formats   the MorphoQuant recipes and the baselines at W4A8 (RECIPE@FORMAT)          -> runs/omni-formats
#   w8a8      the baselines and the MorphoQuant recipes at W8A8: the sanity rows         -> runs/omni-w8a8
#   calib     morpho-modal / morpho-plus calibrated without audio, without image, on text only
#             (the all-modalities rows are those of runs/omni-table)                       -> runs/omni-calib-*
# Sizes: --eval-size EVAL scales the four tasks (EVAL image-QA, 3/4 EVAL spoken-QA, 3/8 EVAL transcriptions,
# EVAL/16 wiki windows of 256 tokens); CALIB calibration samples cycling image QA, spoken QA, transcription and a
# SEQ-token text window. compare never writes checkpoints (export does not support OmniMini anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-1}
EVAL=${EVAL:-24}
CALIB=${CALIB:-8}
SEQ=${SEQ:-128}
export OMP_NUM_THREADS=$THREADS
run() {   # run OUT [compare args...]
  local out=$1; shift
  local t0=$SECONDS
  local rc=0
  morphoquant --threads "$THREADS" --quiet compare omnimini --out "$out" \
    --eval-size "$EVAL" --calib "$CALIB" --seq-len "$SEQ" "$@" || rc=$?
  # exit 4: some method cannot run on OmniMini (an error row in the table); exit 3: a row failed the W8A8 sanity
  # check (marked in the table); the other groups still run
  [ "$rc" = 0 ] || [ "$rc" = 3 ] || [ "$rc" = 4 ] || exit "$rc"
  echo "$out: $((SECONDS - t0)) s (exit $rc)"
}
for group in "${@:-table baselines calib formats w8a8}"; do
  for g in $group; do
    case $g in
      table) run runs/omni-table -r rtn-w8a8 -r rtn-w4a8 -r rtn-w4a4 -r rtn-w4a4-static \
               -r morpho -r morpho-reference -r morpho-modal -r morpho-plus ;;
      baselines) run runs/omni-baselines -r smoothquant-w4a4 -r gptq-w4a4 -r quarot-w4a4 -r mbq-w4a4 \
               -r mquant-w4a4 ;;
      formats) run runs/omni-formats -r morpho-modal@w4a8 -r morpho-plus@w4a8 -r smoothquant-w4a4@w4a8 \
               -r mbq-w4a4@w4a8 -r gptq-w4a4@w4a8 -r quarot-w4a4@w4a8 -r mquant-w4a4@w4a8 -r morpho@w4a8 \
               -r morpho-reference@w4a8 ;;
      w8a8) run runs/omni-w8a8 -r smoothquant-w4a4@w8a8 -r gptq-w4a4@w8a8 -r quarot-w4a4@w8a8 \
               -r mbq-w4a4@w8a8 -r mquant-w4a4@w8a8 -r morpho@w8a8 -r morpho-reference@w8a8 \
               -r morpho-modal@w8a8 -r morpho-plus@w8a8 ;;
      calib) for mods in image,text audio,text text; do
               run "runs/omni-calib-${mods//,/-}" -r morpho-modal -r morpho-plus --calib-modalities "$mods"
             done ;;
      *) echo "unknown group $g (table baselines calib formats w8a8)" >&2; exit 2 ;;
    esac
  done
done
