#!/usr/bin/env bash
# The tests: set up both environments, lint, run the default test run in .venv, then the tests
# of the laplace extra in .venv-laplace. Extra arguments go to both pytest runs
# (e.g. `-m slow` for the long checks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup.sh --laplace
./.venv/bin/ruff check uq_box tests benchmarks
./.venv/bin/ruff format --check uq_box tests benchmarks
./.venv/bin/python -m pytest "$@"
./.venv-laplace/bin/python -m pytest -m laplace "$@"
