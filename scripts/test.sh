#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite on all cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/python -m pytest -n auto --dist loadgroup -q --durations=15 "$@"
