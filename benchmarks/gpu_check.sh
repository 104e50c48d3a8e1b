#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and the CUDA toolkit (nvcc):
#   1. builds medvlm with candle's CUDA backend (--features cuda, release);
#   2. runs the parity fixtures on GPU 0 (crates/medvlm-models/tests/device_parity.rs with
#      MEDVLM_TEST_DEVICE=cuda): embeddings within 1e-4 of transformers / open_clip;
#   3. runs `medvlm bench embed` (image ViT-B/16, text clip-b16 and pubmedbert) in f32, bf16
#      and f16 on the GPU, and the PyTorch scripts of this folder on the same GPU (float32 and
#      bf16/f16 autocast), and prints one table.
# Needs: cargo, nvcc, python3 with torch (CUDA build), open_clip_torch, timm, transformers.
# Usage: benchmarks/gpu_check.sh [--quick]   (--quick: 3 timed batches instead of 10)
# Output: the table on stdout; every raw JSON line in $OUT_DIR (default target/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
batches=10
[ "${1:-}" = "--quick" ] && batches=3
out=${OUT_DIR:-target/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi not found; this script needs a machine with an NVIDIA GPU" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

echo "== build (release, --features cuda)" >&2
cargo build --release --features cuda -p medvlm-cli
medvlm=${CARGO_TARGET_DIR:-target}/release/medvlm

echo "== parity fixtures on the GPU" >&2
MEDVLM_TEST_DEVICE=cuda cargo test --release --features cuda -p medvlm-models \
  --test device_parity 2>&1 | tee "$out/parity.txt"

: > "$out/results.jsonl"
run() { # label command...
  echo "== $1" >&2
  if ! "${@:2}" --json > "$out/last.txt" 2> "$out/last.err"; then
    echo "{\"label\": \"$1\", \"error\": $(tail -1 "$out/last.err" | "$py" -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')}" >> "$out/results.jsonl"
    return 0
  fi
  tail -1 "$out/last.txt" | "$py" -c 'import json,sys; d=json.load(sys.stdin); d["label"]=sys.argv[1]; print(json.dumps(d))' "$1" >> "$out/results.jsonl"
}
for spec in "image vit-b16 32" "text clip-b16 128" "text pubmedbert 64"; do
  set -- $spec
  tower=$1 arch=$2 batch=$3
  for dt in f32 bf16 f16; do
    run "medvlm $tower $arch $dt" "$medvlm" bench embed --tower "$tower" --arch "$arch" \
      --batch "$batch" --batches "$batches" --warmup 2 --dtype "$dt" --device cuda:0
  done
  for ac in none bf16 f16; do
    if [ "$tower" = image ]; then
      run "pytorch $tower $arch $ac" "$py" benchmarks/bench_embed_openclip.py --arch "$arch" \
        --batch "$batch" --batches "$batches" --warmup 2 --autocast "$ac" --device cuda
    else
      run "pytorch $tower $arch $ac" "$py" benchmarks/bench_text_pytorch.py --arch "$arch" \
        --batch "$batch" --batches "$batches" --warmup 2 --autocast "$ac" --device cuda
    fi
  done
done

"$py" - "$out/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
# Peak memory: torch's peak GPU allocation for PyTorch; medvlm (candle) has no such counter,
# so its column shows n/a rather than the host RSS, which would not compare.
print(f"{'run':38} {'items/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'GPU peak MiB':>13}")
for r in rows:
    if "error" in r:
        print(f"{r['label']:38} error: {r['error']}")
        continue
    peak = r.get("peak_mib") if r.get("peak_kind", "").startswith("torch.cuda") else None
    print(f"{r['label']:38} {r['items_per_s']:10.1f} {r['p50_ms']:9.1f} {r['p99_ms']:9.1f} "
          f"{'n/a' if peak is None else f'{peak:.0f}':>13}")
PY
