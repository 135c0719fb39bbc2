#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main demonstration: FedAvg, DiLoCo, NoLoCo, D-PSGD
# and gossip-VC simulated on digits with non-IID data; prints a table, writes plots to runs/compare
# (replacing the previous demo's runs there). One seed (~25 s on 2 cores); for error bars pass
# seeds, e.g. `scripts/demo.sh --seeds 0,1,2` (mean +- std over the seeds, ~3x as long).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m simulations.compare --overwrite "$@"
