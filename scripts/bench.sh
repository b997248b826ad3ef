#!/usr/bin/env bash
# The main job: sets up (scripts/env.sh), then runs the benchmarks that can run here, each
# printing its table to stdout (progress to stderr) and saving raw results with device,
# versions and commit under benchmarks/results/:
#   kernels  python -m benchmarks.run       the merge step, every provider and default shape
#   minilm   python -m benchmarks.minilm    MiniLM embedding fidelity and speed against r
#   e2e      python -m benchmarks.e2e_vit   ViT images/s: unpatched, ToMe via reference, via kernels
# With no argument all three run; `bash scripts/bench.sh NAME [ARGS...]` runs one, passing
# ARGS to it (try `bash scripts/bench.sh kernels --help`).
set -euo pipefail
source "$(dirname "$0")/env.sh"

declare -A MODULES=([kernels]=benchmarks.run [minilm]=benchmarks.minilm [e2e]=benchmarks.e2e_vit)

if [ $# -gt 0 ]; then
  name=$1
  shift
  if [ -z "${MODULES[$name]+set}" ]; then
    echo "bench.sh: unknown benchmark '$name' (expected one of: kernels minilm e2e)" >&2
    exit 2
  fi
  exec "$PYTHON" -m "${MODULES[$name]}" "$@"
fi

for name in kernels minilm e2e; do
  echo "== $name: python -m ${MODULES[$name]}" >&2
  "$PYTHON" -m "${MODULES[$name]}"
done
