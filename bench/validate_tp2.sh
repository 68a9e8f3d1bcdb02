#!/usr/bin/env bash
# TP=2 validation on a two-GPU host: make a Llama-2-7B-shaped checkpoint (random weights),
# then `iserve validate` over groups of configurations, each group under its own time limit so that
# one hang cannot take the others with it. Usage:
#   bash bench/validate_tp2.sh OUT_DIR SECONDS_PER_GROUP GROUP [GROUP ...]
# where a GROUP is a comma-separated list of configuration keys (tp2-pp1-wint4-kvfp16-pnone,...).
# Writes OUT_DIR/groupN.log and OUT_DIR/groupN.json per group.
set -u
out=$1; limit=$2; shift 2
mkdir -p "$out"
model=/dev/shm/l7
[ -f "$model/config.json" ] || python3 -c "import iserve.gpu_agent.engine; from iserve.modelmaker import make_checkpoint; make_checkpoint('$model','llama-2-7b',dtype='float16',device='cuda')"
n=0
for group in "$@"; do
  n=$((n + 1))
  echo "== group $n: $group (limit ${limit} s)"
  # The profiling job and each TP measurement give up (ranks' stacks on stderr) 20 s before the group's limit.
  timeout --kill-after=10 "$limit" python3 -c 'import sys; from iserve.fingerprint.validate import main; sys.exit(main())' \
    "$model" --devices cuda:0,cuda:1 --configs "$group" --timeout-s $((limit - 20)) --json-file "$out/group$n.json" > "$out/group$n.log" 2>&1
  echo "rc $?"
  pkill -9 -f "multiprocessing[.]spawn" 2>/dev/null  # ranks a killed group left behind hold their GPUs
  grep -E "worst errors|\|error\||measuring the fingerprints|fingerprints profiled|Timeout|not measured" "$out/group$n.log"
done
