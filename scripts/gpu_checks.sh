#!/usr/bin/env bash
# The prepared GPU run (scripts/gpu_checks.py says what it runs and writes):
#   bash scripts/gpu_checks.sh [OUT] [--plan]
# It uses the Python it is given (TOME_PYTHON, default python3) as it is and installs
# nothing: the GPU machine has no package registry, and its python3 has torch, triton and
# the test tools. Without a GPU it stops within seconds, with summary.md saying so.
# No cd: a relative OUT is taken from where it is called (the steps run in the repository root).
set -uo pipefail
exec "${TOME_PYTHON:-python3}" "$(dirname "$0")/gpu_checks.py" "$@"
