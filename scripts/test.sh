#!/usr/bin/env bash
# Set up, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Optimum's exporter and client, in their own environment (tests/test_optimum_io.py; about 2 min
# the first time, seconds after)
export TAILOR_OPTIMUM_VENV="${TAILOR_OPTIMUM_VENV:-$PWD/.venv-optimum}"
bash scripts/optimum_env.sh "$TAILOR_OPTIMUM_VENV" || \
  echo "the Optimum environment could not be made: tests/test_optimum_io.py's Optimum tests skip" >&2
. .venv/bin/activate
python -m pytest -q "$@"
