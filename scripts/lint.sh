#!/usr/bin/env bash
# Lint (ruff check, ruff format --check) and type-check (mypy, default mode) the tree; CI runs this. Usage: bash scripts/lint.sh
# mypy checks the installed package layout (pyproject's package-dir maps `iserve` to shared/ and
# services/gpu-agent/ is no valid module name), so it runs over a folder of links built like it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m ruff check .
"$PY" -m ruff format --check .
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
"$PY" -c "import sys; sys.path.insert(0, 'bench'); from _importable import make_shim; make_shim(sys.argv[1])" "$SHIM"
MYPYPATH="$SHIM" "$PY" -m mypy --config-file pyproject.toml -p iserve
