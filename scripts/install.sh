#!/usr/bin/env bash
# Install the project into .venv: torch==2.13.0 (CPU) first, then the package with the extras
# named as arguments (e.g. `scripts/install.sh dev`), with torch pinned by constraints.txt so that
# nothing pulls a CUDA build. Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
extras=$(IFS=,; echo "$*")

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

export PIP_CONSTRAINT="$PWD/constraints.txt"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    echo "installing torch 2.13.0 (CPU)"
    pip_install torch==2.13.0
fi
echo "installing the project${extras:+ with extras: $extras}"
pip_install -e ".${extras:+[$extras]}"
