#!/usr/bin/env bash
# medvlm serve's web page in a real headless Chromium: the page loads, an uploaded DICOM is
# scored by an adapted artefact with the expected top class and a conformal set, zero-shot
# bars render, an anomaly detector's map is shown; screenshots go to docs/img/serve_*.png.
#
#   tools/serve_browser_check.sh
#
# Installs Debian's `chromium` (apt) and puppeteer-core (npm) when missing; builds medvlm;
# makes 160 phantom studies at 64 px and a linear-probe artefact on their modality with the
# tiny CLIP fixture (random weights: the point is the page, not the model). Not part of
# `cargo test`; .ci/run runs it with --if-available after the tests.
#
#   tools/serve_browser_check.sh --if-available   (what .ci/run does)
#
# With --if-available nothing is installed: without Chromium or Node the check is not run and
# a line on stderr says so and why (the exit status is 0); everything else fails as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
optional=0
[ "${1:-}" = "--if-available" ] && optional=1
tools="crates/medvlm-serve/tools/browser"
if [ "$optional" = 1 ]; then
    missing=""
    command -v chromium >/dev/null || missing="$missing chromium"
    command -v node >/dev/null || missing="$missing node"
    if [ -n "$missing" ] && [ ! -d "$tools/node_modules/puppeteer-core" ] && ! command -v npm >/dev/null; then
        missing="$missing npm"
    fi
    if [ -n "$missing" ]; then
        echo "WEB PAGE CHECK NOT RUN: missing:$missing (install Debian's chromium and nodejs, or run tools/serve_browser_check.sh without --if-available, which installs them)" >&2
        exit 0
    fi
fi
if ! command -v chromium >/dev/null; then
    sudo_="" ; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get install -y -q chromium
fi
[ -d "$tools/node_modules/puppeteer-core" ] || (cd "$tools" && npm install --silent)
cargo build -q -p medvlm-cli
bin="${CARGO_TARGET_DIR:-target}/debug/medvlm"
work="$(mktemp -d)"
trap 'if [ -n "${pid:-}" ]; then kill "$pid" 2>/dev/null || true; fi; rm -rf "$work"' EXIT
"$bin" phantoms generate --out "$work/ph" --n 160 --size 64 >"$work/gen.log" 2>&1
model="crates/medvlm-models/tests/fixtures/clip"
"$bin" adapt --method linear-probe --shots 8 --model "$model" \
    --train "$work/ph/train.jsonl" --train "$work/ph/val.jsonl" --train "$work/ph/test.jsonl" \
    --label-field modality --out "$work/modality" >"$work/adapt.log" 2>&1
# A task head for the page's overlay: an anomaly detector with a memory of 2 normal
# images per modality (the set is small: 160 studies) (patch tokens of the same fixture).
"$bin" anomaly fit --model "$model" --manifest "$work/ph/manifest.jsonl" --shots 2 \
    --out "$work/anomaly" >"$work/anomaly.log" 2>&1 \
    || { cat "$work/anomaly.log"; exit 1; }
"$bin" serve --model "$model" --adapted "$work/modality" --detector "$work/anomaly" \
    --addr 127.0.0.1:0 2>"$work/serve.log" &
pid=$!
for _ in $(seq 50); do
    addr="$(grep -o 'http://127.0.0.1:[0-9]*' "$work/serve.log" | head -1 || true)"
    [ -n "$addr" ] && break
    sleep 0.2
done
[ -n "$addr" ] || { cat "$work/serve.log"; exit 1; }
# A chest radiograph of the test split (not the held-out site), as its DICOM file.
rel="$(python3 -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["modality"] == "chest_xray" and r.get("dicom"):
        print(r["dicom"]); break' "$work/ph/test.jsonl")"
image="$work/ph/$rel"
# Screenshots go to docs/img; in CI (--if-available) to the temporary folder, so that a test
# run leaves the tree as it was.
shots="$root/docs/img"
[ "$optional" = 1 ] && shots="$work/shots"
mkdir -p "$shots"
node "$tools/browser_check.mjs" "$addr" "$image" modality chest_xray "$shots"
