#!/usr/bin/env bash
# The tests: set up, lint, then the default pytest run (slow checks: add `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
./.venv/bin/ruff check uq_box tests benchmarks
./.venv/bin/ruff format --check uq_box tests benchmarks
exec ./.venv/bin/python -m pytest "$@"
