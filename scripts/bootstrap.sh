#!/usr/bin/env bash
# Create .venv and install the project with its app and test extras.
# TORCH_SPEC picks the torch build (default: the CPU wheel; e.g. TORCH_SPEC='torch' for CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q -U pip 'setuptools>=77.0.3'
.venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install -q -e '.[app,dev]'
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
