#!/usr/bin/env bash
# The test command: sets up (scripts/env.sh), then runs the test suite and a one-shot run
# of the pytest-benchmark suite (--benchmark-disable: each benchmark runs once, checked
# against the reference). Extra arguments go to pytest.
#
# Without arguments (the full run, as CI makes it) and on a machine without a GPU, it then
# runs the GPU run's test files (GPU_TESTS in scripts/gpu_checks.py) in GPU mode
# (TOME_TEST_DEVICE=cuda): the GPU machine is lent for minutes, so a test that fails in GPU
# mode for a reason other than the GPU must show here first. Without a GPU those tests skip,
# each saying why, and the rest run without Triton's interpreter; about 45 s on 2 cores.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$PYTHON" -m pytest tests benchmarks/test_merge_benchmarks.py --benchmark-disable -q "$@"
if [ $# -eq 0 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "test.sh: the GPU run's tests in GPU mode (TOME_TEST_DEVICE=cuda) on this machine without a GPU" >&2
  # gpu_checks.py imports only the standard library; run_path does not run its main().
  gpu_tests=$("$PYTHON" -c 'import runpy; print(*runpy.run_path("scripts/gpu_checks.py")["GPU_TESTS"])')
  # shellcheck disable=SC2086  # one word per file
  TOME_TEST_DEVICE=cuda "$PYTHON" -m pytest $gpu_tests --benchmark-disable -q -m "not build and not compile and not slow"
fi
