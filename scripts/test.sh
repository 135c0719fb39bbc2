#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), lint, then run the whole test suite: first the Docker images
# (scripts/docker-test.sh, on a quiet machine: it starts a Ray cluster in containers), then
# everything else on all cores. Extra arguments go to the second pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/python -m pytest -q -rs -m docker tests/test_docker.py
.venv/bin/python -m pytest -n auto --dist loadgroup -q --durations=15 -m "not docker" "$@"
