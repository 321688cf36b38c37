#!/usr/bin/env bash
# Create .venv-compat: the pinned CPU torch, FusionBench 0.2.33 (it pulls lightning, hydra, datasets, peft, ...),
# open_clip and pytest, kept apart from .venv so that `make test` never depends on FusionBench. The project is not
# installed there: `make test-compat` runs it from the checkout (PYTHONPATH), with the C++ extension that `make setup`
# built in place (same Python, same torch). Idempotent: a stamp of this script and the pins skips a second run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_COMPAT:-.venv-compat}
STAMP="$VENV/.adamerge-compat-installed"
HASH=$( (cat constraints.txt scripts/setup_compat_venv.sh) | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt"
$PIP --upgrade pip "setuptools>=64" wheel
$PIP torch==2.13.0 numpy
$PIP fusion-bench==0.2.33 open_clip_torch pytest safetensors tqdm
echo "$HASH" > "$STAMP"
