#!/usr/bin/env bash
# The whole stack on a real GPU: the GPU tests (`pytest -m gpu`), the demo with NVML GPUs and CUDA
# workers, and a Llama-2-7B-shaped model (random weights) registered, profiled, deployed and streamed
# through `iserve up`. Usage (on a GPU host with iserve installed): bash bench/gpu_smoke.sh OUT_DIR
# SMOKE_TESTS=0 skips the tests (to run them in a call of their own).
set -uo pipefail
OUT=${1:-/tmp/iserve-gpu-smoke}
mkdir -p "$OUT"
ISERVE="python3 -c 'from iserve.cli import main; main()'"
run() { echo "+ iserve $*"; eval "$ISERVE $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ "${SMOKE_TESTS:-1}" != 0 ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/tests.txt" | tail -15
fi
run demo --data-dir /tmp/demo --max-tokens 24 2>&1 | tee "$OUT/demo.txt"
python3 -c "from iserve.modelmaker import make_checkpoint; make_checkpoint('/tmp/models/llama-2-7b', 'llama-2-7b', shards=2)"
eval "$ISERVE up --data-dir /tmp/stack --nats-port 4333 --log-level warning" > "$OUT/up.txt" 2>&1 &
UP=$!
export ISERVE_NATS_URL=nats://127.0.0.1:4333
sleep 8
{
  run register /tmp/models/llama-2-7b
  run profile show llama-2-7b --limit 5
  run deploy llama-2-7b --intent min-latency
  run generate llama-2-7b "'The capital of France is'" --max-tokens 64 --ignore-eos
  run status
} 2>&1 | tee "$OUT/llama-2-7b.txt"
kill -INT $UP; wait $UP
echo "iserve up exited with $?"
