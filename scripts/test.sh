#!/usr/bin/env bash
# The test command: sets up (scripts/env.sh), then runs the test suite and a one-shot run
# of the pytest-benchmark suite (--benchmark-disable: each benchmark runs once, checked
# against the reference). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$PYTHON" -m pytest tests benchmarks/test_merge_benchmarks.py --benchmark-disable -q "$@"
