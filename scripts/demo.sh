#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model (all-MiniLM-L6-v2, exported to ONNX).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
optimize -o out/minilm --force "$@"
