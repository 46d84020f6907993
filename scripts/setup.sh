#!/usr/bin/env bash
# Create or reuse .venv and install uq_box into it. torch 2.13.0 (CPU build) goes in first, so
# pip never resolves torch to a multi-GB CUDA build; then the package with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"
if ! ./.venv/bin/python -c "import torch" 2>/dev/null; then
    $pip install "torch==2.13.0"
fi
$pip install -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
./.venv/bin/python -c "import uq_box, torch; print(f'uq_box ready (torch {torch.__version__})')"
