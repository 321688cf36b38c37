#!/usr/bin/env bash
# Create .venv with the pinned CPU torch and install the project (editable, with its C++ extension).
# Idempotent: a second run only checks a stamp file and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.adamerge-installed"
HASH=$( (cat pyproject.toml setup.py constraints.txt scripts/setup_venv.sh; find csrc -type f | sort | xargs cat) \
       2>/dev/null | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip install --disable-pip-version-check -q -c constraints.txt"
$PIP --upgrade pip "setuptools>=64" wheel
$PIP torch==2.13.0 numpy
# What the tests, the demo, the benchmarks and the lint use: pytest (+ pytest-benchmark for benchmarks/,
# hypothesis for the property tests), ruff, matplotlib (plots), scikit-learn (the demo's data), triton (the Triton
# backend), open_clip_torch and transformers (the model adapters; installed under the torch pin, see README), peft
# (the LoRA tests' oracle only: the package reads adapters without it; under the pin it adds accelerate and psutil,
# no other torch).
$PIP pytest pytest-benchmark hypothesis ruff tqdm safetensors matplotlib scikit-learn triton open_clip_torch \
  transformers peft
# The project itself, built against the torch above (no build isolation: it would fetch a CUDA torch).
$PIP --no-build-isolation -e .
echo "$HASH" > "$STAMP"
