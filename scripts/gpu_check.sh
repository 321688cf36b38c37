#!/usr/bin/env bash
# `make gpu-check`: build, test, sanitize and benchmark on a machine with a CUDA GPU (tools/gpu_check.py).
# Uses the interpreter it is given, not the .venv of `make setup`: $PYTHON, default python3 (on the GPU machine the
# image's python3 already has torch with CUDA, Triton, pytest and pytest-xdist). Arguments go to tools/gpu_check.py:
#   scripts/gpu_check.sh [--quick] [--dry-run] [--phases 1,2] [--budget-scale 1.5]
# Output under $OUT when set (the GPU machine's tool sets it), else runs/gpu_check/<time>.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
