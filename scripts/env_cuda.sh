#!/usr/bin/env bash
# Creates .venv-cuda/: a CUDA build of torch (requirements/cuda/check.txt, the GPU machine's
# version) and ninja, with which tests/builds/test_cuda_extension_load.py builds the CUDA
# extension (_C_cuda), loads it and checks that every operator has its CUDA kernel, on a
# machine without a GPU. Nothing else on a CPU machine loads _C_cuda: a CUDA source left out
# of the build list (csrc/sources.txt) once linked, failed to load, and went unseen until a
# GPU run.
#
# Reused while requirements/cuda/ is unchanged. About a minute and 4.7 GB (1.7 GB of it
# downloaded from the package registry). CI runs it (.ci/run); without .venv-cuda/ the test
# is skipped and says why. TOME_PYTHON: the Python to create it with (default python3).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_PYTHON=${TOME_PYTHON:-python3}
VENV=$ROOT/.venv-cuda
STAMP=$VENV/.requirements-sha256
wanted=$(cat "$ROOT"/requirements/cuda/*.txt | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$wanted" ]; then
  echo "env_cuda: $VENV is up to date" >&2
  exit 0
fi
echo "env_cuda: setting up $VENV (a CUDA build of torch and ninja; about a minute, 4.7 GB)" >&2
start=$SECONDS
# --clear: a venv left half-made by an interrupted run, or made for older requirements,
# starts empty rather than mixing two torch builds.
"$BASE_PYTHON" -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ROOT/requirements/cuda/check.txt"
echo "$wanted" > "$STAMP"
echo "env_cuda: $VENV ready in $((SECONDS - start)) s ($(du -sm "$VENV" | cut -f1) MB)" >&2
