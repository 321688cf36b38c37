#!/usr/bin/env bash
# Create .venv-mergekit: mergekit 0.1.5 under the project's torch pin (constraints.txt), for the optional
# comparison (make bench-mergekit, make test-mergekit). Idempotent (a stamp file); nothing of it is needed by
# `make test`. mergekit runs through benchmarks/mergekit_shim.py, which applies the torchvision workaround of
# adamerge_fast._compat (read from this checkout; the package is not installed here) before mergekit's CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-mergekit}
STAMP="$VENV/.mergekit-installed"
HASH=$( (cat constraints.txt scripts/setup_mergekit_venv.sh) | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt"
$PIP --upgrade pip wheel
$PIP torch==2.13.0 mergekit==0.1.5
echo "$HASH" > "$STAMP"
