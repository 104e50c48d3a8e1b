#!/usr/bin/env bash
# Run medvlm's stable-Rust fuzz harness (fuzz/, crate medvlm-fuzz).
#
#   tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 60; TARGET defaults to all of
#   dicom nifti npy manifest-jsonl manifest-csv train-config pickle
# Environment: FUZZ_JOBS (targets run at the same time, default 1),
#   FUZZ_SEED (default 0), FUZZ_ARGS (extra medvlm-fuzz arguments, e.g.
#   "--max-alloc-mb 512 --hang-secs 5").
# Crashing inputs go to fuzz/crashes/<target>/; the log to fuzz/logs/.
# Exits non-zero if any target found a crash or a hang.
set -euo pipefail

cd "$(dirname "$0")/.."
secs="${1:-60}"
if [ $# -gt 0 ]; then shift; fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(dicom nifti npy manifest-jsonl manifest-csv train-config pickle)
fi
jobs="${FUZZ_JOBS:-1}"
seed="${FUZZ_SEED:-0}"

cargo build -p medvlm-fuzz --release
bin="${CARGO_TARGET_DIR:-target}/release/medvlm-fuzz"

mkdir -p fuzz/logs
stamp="$(date +%Y%m%d-%H%M%S)"
log="fuzz/logs/fuzz-$stamp.log"
echo "fuzzing ${targets[*]} for ${secs} s each, ${jobs} at a time, seed ${seed}; log: $log"

status=0
running=0
pids=()
for t in "${targets[@]}"; do
    # shellcheck disable=SC2086
    "$bin" "$t" --seconds "$secs" --seed "$seed" ${FUZZ_ARGS:-} >"fuzz/logs/$t-$stamp.log" 2>&1 &
    pids+=("$!")
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait "${pids[0]}" || status=1
        pids=("${pids[@]:1}")
        running=$((running - 1))
    fi
done
for p in "${pids[@]}"; do
    wait "$p" || status=1
done

for t in "${targets[@]}"; do
    cat "fuzz/logs/$t-$stamp.log"
    rm -f "fuzz/logs/$t-$stamp.log"
done | tee "$log"

if [ "$status" -ne 0 ]; then
    echo "fuzz: crashes or hangs found (see fuzz/crashes/ and $log)"
fi
exit "$status"
