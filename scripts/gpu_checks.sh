#!/usr/bin/env bash
# On a machine with a GPU: the test suite on the device (full shapes, bfloat16, CUDA graphs,
# inductor), compute-sanitizer's memcheck over every Triton and CUDA operator, then the benchmarks
# and the end-to-end ViT throughput (results saved under benchmarks/results/). Extra arguments
# go to the merge-step benchmark runner.
set -euo pipefail
source "$(dirname "$0")/env.sh"
TOME_TEST_DEVICE=cuda "$PYTHON" -m pytest tests benchmarks/test_merge_benchmarks.py --benchmark-disable -q -rs
PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 "$PYTHON" -m tests.backends.sanitize_case
"$PYTHON" -m benchmarks.run "$@"
"$PYTHON" -m benchmarks.e2e_vit
