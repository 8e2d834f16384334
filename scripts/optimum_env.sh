#!/usr/bin/env bash
# Create the Optimum environment (once): optimum-onnx pins transformers < 4.58 and optimum ~2.1,
# which tailor's own environment (transformers 5) cannot hold, so its exporter and its ORTModel
# client live in a venv of their own. torch is pinned first to the CPU build tailor uses (optimum
# accepts any torch >= 1.11), so pip does not pull a multi-GB CUDA build.
# Usage: bash scripts/optimum_env.sh [VENV]   (default /work/optimum-venv; TAILOR_OPTIMUM_VENV too)
set -euo pipefail
venv="${1:-${TAILOR_OPTIMUM_VENV:-/work/optimum-venv}}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q "optimum-onnx[onnxruntime]==0.1.0"
"$venv/bin/python" -c "import optimum.onnxruntime, transformers; print('optimum env:', transformers.__version__)"
