#!/usr/bin/env bash
# The tests: set up both environments, lint, build the docs (warnings are errors), run the
# default test run in .venv, then the tests of the laplace extra in .venv-laplace. Extra arguments go to both pytest runs
# (e.g. `-m slow` for the long checks).
set -euo pipefail
cd "$(dirname "$0")/.."
# the UCI data of the tests (and of the notebooks they execute): ../shared/data/uci
export UQ_BOX_UCI_ROOT="${UQ_BOX_UCI_ROOT:-$(cd .. && pwd)/shared/data/uci}"
bash scripts/setup.sh
bash scripts/setup.sh --laplace
./.venv/bin/ruff check uq_box tests benchmarks notebooks
./.venv/bin/ruff format --check uq_box tests benchmarks notebooks
NO_MKDOCS_2_WARNING=1 ./.venv/bin/mkdocs build --strict --site-dir "$(mktemp -d)"
# two worker processes, one per core (each test file stays on one worker, so its module
# fixtures are built once); UQ_BOX_TEST_WORKERS=0 runs in this process
./.venv/bin/python -m pytest -n "${UQ_BOX_TEST_WORKERS:-2}" --dist loadfile "$@"
./.venv-laplace/bin/python -m pytest -m laplace "$@"
