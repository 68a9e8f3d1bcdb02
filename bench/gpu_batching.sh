#!/usr/bin/env bash
# The continuous-batching GPU checks: the engine's GPU tests, where a decode step's time goes
# (profile_decode.py), the batched step estimate against the full model (iserve validate --batches)
# and the concurrency sweep (bench_batching.py). Each step is bounded to fit a 10-minute device call
# (tests + profile together; validate; sweep): pick them with STEPS=tests,profile,validate,sweep.
# Usage (on a GPU host with iserve installed): bash bench/gpu_batching.sh OUT_DIR [MODELS]
# MODELS defaults to llama-3-8b,llama-2-7b (the profile takes the first).
set -uo pipefail
OUT=${1:-/tmp/iserve-gpu-batching}
MODELS=${2:-llama-3-8b,llama-2-7b}
STEPS=${STEPS:-tests,profile,validate,sweep}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
has() { [[ ",$STEPS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if has tests; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
    "$HERE/../tests/engine/test_engine_batch.py" "$HERE/../tests/engine/test_engine_variants.py" 2>&1 \
    | tee "$OUT/gpu-tests.txt" | tail -8
fi
if has profile; then
  timeout 330 python3 "$HERE/profile_decode.py" --out "$OUT/profile" --model "${MODELS%%,*}" 2>&1 | tail -40
fi
if has validate; then
  python3 -c "from iserve.modelmaker import make_checkpoint; make_checkpoint('/dev/shm/v/m', 'llama-2-7b', shards=2)"
  timeout 400 python3 -m iserve.fingerprint.validate /dev/shm/v/m --configs tp1-pp1-wfp16-kvfp16-pnone \
    --batches 1,8,32,64 --json-file "$OUT/validate-batches.json" 2>&1 | tail -30
fi
if has sweep; then
  timeout 560 python3 "$HERE/bench_batching.py" --out "$OUT/batching" --models "$MODELS" --variants fp16,int8 \
    --sharegpt-concurrency 256 2>&1 | tail -40
fi
