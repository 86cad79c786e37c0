#!/usr/bin/env bash
# The GPU check in one call (bench/gpu_check.py says what it measures). On a GPU machine with no
# network (the device tool's), it installs nothing from the internet: wheels that machine lacks
# travel in .whl/ (see docs/performance.md, "On a GPU") and install from there, then neox-train
# itself without dependencies, over the machine's own torch.
#
#   bash bench/gpu_check.sh [--out DIR]    # results: DIR/gpu_check.json and DIR/gpu_check.md
#   bash bench/gpu_check.sh --dry-run      # every step at tiny size on the CPU (in the suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --find-links .whl .whl/*.whl
fi
if [ "$dry" = 0 ] && ! "$PY" -c "import neox_train" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
out_args=()
if [ -n "${OUT:-}" ]; then out_args=(--out "$OUT"); fi
exec "$PY" bench/gpu_check.py "${out_args[@]}" "$@"
