#!/usr/bin/env bash
# Screenshot a MorphoQuant HTML report with headless Chromium (Debian package `chromium`), as a person sees it.
#
#   scripts/screenshot_report.sh DIR OUT.png [HEIGHT]
#
# DIR is a run directory (its report/index.html is used, and built first with `morphoquant.report` if absent),
# a report directory holding index.html, or an .html file. HEIGHT is the window height in pixels (default 4000,
# width 1400); the screenshot shows the top HEIGHT pixels of the page. Environment: CHROMIUM (default: chromium,
# else chromium-browser / google-chrome), PYTHON (default: python3) to build a missing report, TIMEOUT (s, 90).
# Exits non-zero (and writes no OUT.png) when the page or the browser fails.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 DIR OUT.png [HEIGHT]" >&2
    exit 2
fi
src=$1
out=$2
height=${3:-4000}
[[ "$height" =~ ^[0-9]+$ ]] || { echo "HEIGHT must be a number of pixels, got '$height'" >&2; exit 2; }

if [[ -f "$src" ]]; then
    page=$src
elif [[ -f "$src/index.html" ]]; then
    page=$src/index.html
elif [[ -d "$src" ]]; then
    page=$src/report/index.html
    if [[ ! -f "$page" ]]; then
        "${PYTHON:-python3}" -c 'import sys; from morphoquant.report import build_report; print(build_report(sys.argv[1]))' "$src"
    fi
else
    echo "no such report or run directory: $src" >&2
    exit 2
fi
page=$(cd "$(dirname "$page")" && pwd)/$(basename "$page")

browser=${CHROMIUM:-}
if [[ -z "$browser" ]]; then
    for b in chromium chromium-browser google-chrome; do
        if command -v "$b" > /dev/null 2>&1; then browser=$b; break; fi
    done
fi
if [[ -z "$browser" ]]; then
    echo "chromium not found (apt-get install -y chromium)" >&2
    exit 3
fi

profile=$(mktemp -d)
tmp_png="$(mktemp -d)/shot.png"
cleanup() { rm -rf "$profile" "$(dirname "$tmp_png")"; }
trap cleanup EXIT

# --allow-file-access-from-files is not needed: images are referenced relatively (or embedded); every network
# feature is switched off so the screenshot also proves the page needs nothing from outside.
timeout "${TIMEOUT:-90}" "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --disable-dev-shm-usage \
    --hide-scrollbars --user-data-dir="$profile" --screenshot="$tmp_png" --window-size="1400,$height" \
    "file://$page" > "$profile/chromium.log" 2>&1 || {
        echo "chromium failed; its log:" >&2
        tail -n 20 "$profile/chromium.log" >&2
        exit 1
    }
if [[ ! -s "$tmp_png" ]]; then
    echo "chromium wrote no screenshot; its log:" >&2
    tail -n 20 "$profile/chromium.log" >&2
    exit 1
fi
mkdir -p "$(dirname "$out")"
mv "$tmp_png" "$out"
echo "$out"
