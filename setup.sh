#!/usr/bin/env bash
# Create .venv and install neox-train with its test tools. Idempotent: a second run with nothing changed
# only checks a stamp and exits.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.neox-setup-stamp
want=$(cat setup.py | sha256sum | cut -d' ' -f1)
# The probe runs from / so it sees the installed package, not this folder.
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/ruff ] && (cd / && "$OLDPWD/.venv/bin/python" -c "import neox_train, deepspeed, tokenizers, google.cloud.storage") 2>/dev/null; then
  echo "setup.sh: .venv is up to date" >&2
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned, so nothing below can pull a different (multi-GB CUDA) build on a CPU machine.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
echo "setup.sh: installed neox-train into .venv" >&2
