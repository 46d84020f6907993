#!/usr/bin/env bash
# Create or reuse a virtual environment and install uq_box into it.
#   bash scripts/setup.sh            .venv: torch 2.13.0 (CPU build) first, so pip never resolves
#                                    torch to a multi-GB CUDA build; then uq_box[dev,pyro,docs].
#   bash scripts/setup.sh --laplace  .venv-laplace: torch 2.14.1 + torchvision 0.29.1 first
#                                    (laplace-torch needs torchvision), then uq_box[dev,laplace].
#   bash scripts/setup.sh --peer     .venv-peer: torch 2.14.1 + torchvision 0.29.1, then
#                                    lightning-uq-box==0.2.0, then uq_box, for
#                                    benchmarks/peer_speed.py (both libraries in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
peer_pins=""
if [ "${1:-}" = "--laplace" ]; then
    venv=.venv-laplace torch_pins="torch==2.14.1 torchvision==0.29.1" extras="dev,laplace"
elif [ "${1:-}" = "--peer" ]; then
    venv=.venv-peer torch_pins="torch==2.14.1 torchvision==0.29.1" extras=""
    peer_pins="lightning-uq-box==0.2.0"
else
    venv=.venv torch_pins="torch==2.13.0" extras="dev,pyro,docs"
fi
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
# shellcheck disable=SC2086
$pip install $torch_pins 2>&1 | grep -v "^WARNING: Location" || true
if [ -n "$peer_pins" ]; then
    $pip install "$peer_pins" 2>&1 | grep -v "^WARNING: Location" || true
    "$venv/bin/python" -W ignore::FutureWarning -c "import lightning_uq_box.uq_methods"
fi
$pip install -e ".${extras:+[$extras]}" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import uq_box, torch; print(f'uq_box ready in $venv (torch {torch.__version__})')"
