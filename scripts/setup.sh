#!/usr/bin/env bash
# Create .venv (if missing) and install SMAI with anomalib and the test tools into it.
# torch is pinned first so pip takes the local CPU-capable build instead of downloading one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q ".[test,benchmark,openvino]"
