#!/usr/bin/env bash
# The main job: sets up (scripts/env.sh), then prints the benchmark table for every
# provider that can run here on the default shapes and saves the raw results as JSON
# under benchmarks/results/. Extra arguments go to `python -m benchmarks.run` (--help).
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$PYTHON" -m benchmarks.run "$@"
