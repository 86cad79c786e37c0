#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on a GPU machine without network (the device tool's image: Python
# 3.12 with torch, transformers, tokenizers and most of what neox-train needs, but not DeepSpeed,
# the GCS client, pydantic or zstandard). Run here, where pip reaches PyPI; the wheels land in
# .whl/ (ignored by git), at the versions this checkout's .venv runs, for CPython 3.12 x86-64.
# Then carry .whl to the GPU machine (device tool: carry [".whl"]) and run bench/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# The machine's own transformers may be another version: this repo's goes along (with its
# tokenizers), so the code runs against what it was written for.
NAMES="google-cloud-storage google-api-core google-auth google-cloud-core google-crc32c
google-resumable-media googleapis-common-protos proto-plus pydantic pydantic-core annotated-types
typing-inspection hjson zstandard transformers tokenizers"
pins=()
for name in $NAMES; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "gpu_wheels: $name is not installed in .venv (run ./setup.sh)" >&2; exit 2; }
  pins+=("$name==$version")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
# DeepSpeed publishes a source archive only: built here into a pure-Python wheel (its CUDA ops are
# JIT-compiled on the GPU machine, which has nvcc).
ds=$("$PY" -m pip show deepspeed | sed -n 's/^Version: //p')
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$ds"
du -sh .whl
ls .whl
