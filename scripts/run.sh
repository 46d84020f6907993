#!/usr/bin/env bash
# The main job: set up, then train Bayes by Backprop on the toy heteroscedastic data and write
# the run's CSV log, test metrics (JSON) and report (PNG plots) under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ./.venv/bin/uq-box fit --config "${1:-configs/toy_heteroscedastic/bnn_vi.yaml}"
