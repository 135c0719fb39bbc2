#!/usr/bin/env bash
# Create .venv and install gossip with its test tools. Idempotent.
# TORCH_SPEC picks the torch build: the default pin is a CPU build on this project's machines;
# on a GPU machine use e.g. TORCH_SPEC=torch (a CUDA build from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[dev,docs]"
