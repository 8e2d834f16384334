#!/usr/bin/env bash
# Create .venv (once) and install tailor with its test and demo extras.
# torch is installed first, pinned, so pip takes the CPU wheel rather than a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,demo]"
