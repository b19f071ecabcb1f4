#!/usr/bin/env bash
# Issue 4's table for one model: every baseline and MorphoQuant recipe at W8A8, W4A8, W4A16 and W4A4, one
# `morphoquant compare` per format (each writes OUT-FORMAT/compare.{md,csv,json}), then one merged table.
# Re-running the same command reuses every recipe already finished (compare's row reuse), so it resumes.
# usage: [THREADS=N] [FORMATS="w4a4 w8a8 ..."] [FINISHED_ONLY=1] benchmarks/run_table.sh [MODEL] [OUT]
#        FINISHED_ONLY=1 runs no quantization: each format's table lists only the rows already finished in its
#        directory (reused), and the merged table is rebuilt from them — a partial table while runs go on.
#        defaults: smollm2-135m, runs/table-MODEL; language models: 16 x 512 calibration, 8 x 512 evaluation
#        windows; whisper: 16 calibration utterances, 16 + 8 evaluation utterances.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-smollm2-135m}
OUT=${2:-runs/table-$MODEL}
FORMATS=${FORMATS:-"w4a4 w8a8 w4a8 w4a16"}
T=benchmarks/table
if [[ $MODEL == whisper* ]]; then
  SIZE=(--calib 16 --eval-size 16)
else
  SIZE=(--calib 16 --seq-len 512 --eval-size 8)
fi
ROT=(quarot-w4a4 quarot-gptq-w4a4)     # an error row where the model has no decoder QuaRot can rotate
W4A4=(rtn-w4a4 rtn-w4a4-static smoothquant-w4a4 gptq-w4a4 "${ROT[@]}" mbq-w4a4 mquant-w4a4 osplus-w4a4
      morpho morpho-reference-gptq morpho-reference $T/morpho-reference-gptq-hadamard.yaml
      $T/morpho-reference-gptq-sorted.yaml $T/morpho-reference-gptq-hadamard-sorted.yaml
      $T/morpho-reference-gptq-hadamard-o-sorted.yaml morpho-plus $T/morpho-gptq.yaml $T/morpho-plus-rtn.yaml)
# morpho-modal differs from morpho only where a model feeds more than one modality into one decoder: on these
# single-modality models it gives the same model bit for bit (tests/methods/test_method_morpho.py; SmolLM2 and
# Whisper rows measured identical), so it is not run again here — benchmarks/run_omni_table.sh runs it.
ran=()
run() {   # FORMAT RECIPE...
  local fmt=$1; shift
  local args=()
  for r in "$@"; do
    local row; row=$(basename "$r"); row=${row/.yaml@/@}; row=${row%.yaml}    # dir/x.yaml@w8a8 -> x@w8a8
    if [[ -n ${FINISHED_ONLY:-} && ! -f $OUT-$fmt/$row/run.json ]]; then continue; fi
    args+=(-r "$r")
  done
  if [[ ${#args[@]} == 0 ]]; then echo "$fmt: no finished rows yet" >&2; return 0; fi
  ran+=("$OUT-$fmt")
  # exit 4 = some method could not run on this model (an error row in the table), exit 3 = a row failed the
  # W8A8 sanity check (the table is written and marks it): keep going, the table must show both
  local rc=0
  morphoquant ${THREADS:+--threads $THREADS} --quiet compare "$MODEL" "${args[@]}" "${SIZE[@]}" \
    --out "$OUT-$fmt" || rc=$?
  if [[ $rc == 3 ]]; then echo "$fmt: a row failed the W8A8 sanity check (marked in the table)" >&2
  elif [[ $rc != 0 && $rc != 4 ]]; then exit $rc; fi
}
for fmt in $FORMATS; do
  case $fmt in
    w4a4)  run w4a4 "${W4A4[@]}" ;;
    w8a8|w4a8)
      rs=(rtn-w4a4@$fmt)
      for r in smoothquant-w4a4 gptq-w4a4 "${ROT[@]}" mbq-w4a4 mquant-w4a4 osplus-w4a4 morpho morpho-reference \
               morpho-reference-gptq $T/morpho-reference-gptq-hadamard.yaml \
               morpho-plus; do rs+=("$r@$fmt"); done
      # scale-sorted weight groups only exist for grouped int4 weights: at W8A8 (int8 per channel) the sorted
      # recipes are their unsorted ones, except the o_proj Hadamard, which the unsorted recipes do not have
      [[ $fmt == w4a8 ]] && rs+=("$T/morpho-reference-gptq-sorted.yaml@$fmt"
                                 "$T/morpho-reference-gptq-hadamard-sorted.yaml@$fmt")
      rs+=("$T/morpho-reference-gptq-hadamard-o-sorted.yaml@$fmt")
      run $fmt "${rs[@]}" ;;
    w4a16) run w4a16 rtn-w4a16 awq-w4a16 gptq-w4a16 quarot-w4a4@w4a16 quarot-gptq-w4a4@w4a16 ;;
    *) echo "unknown format $fmt (w4a4 w8a8 w4a8 w4a16)" >&2; exit 2 ;;
  esac
done
dirs=("${ran[@]}")
peer=()
[[ -f runs/peer-llmc/$MODEL/peer.json ]] && peer=(--peer runs/peer-llmc/$MODEL/peer.json)
python benchmarks/merge_table.py "$OUT.md" "${dirs[@]}" "${peer[@]}" --title "$MODEL: methods x formats"
