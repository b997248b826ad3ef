#!/usr/bin/env bash
# The tests under each CPU instruction set this machine can show, and with 1 and 2 threads:
# MKL, oneDNN and ATen pick their code path from the CPU, so float results differ in the
# last bits between machines, and a tolerance tuned on one CPU fails on another. This lowers
# the three libraries together (the defaults are the machine's own: AVX-512 where it has it).
#
#   bash scripts/test_isa.sh [PYTEST ARGS]     e.g. -m "not build and not compile"
#   THREADS="2" ISA_SETS="avx2 default" bash scripts/test_isa.sh ...
#
# Prints one line per run (instruction set, threads, what torch reports, pytest's summary)
# and exits non-zero if any run failed. Each run gets a fresh TorchInductor cache: kernels
# compiled under one instruction set must not be reused under another.
set -uo pipefail
source "$(dirname "$0")/env.sh"

declare -A SETTINGS=(
  [sse]="MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default"
  [avx2]="MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2"
  [default]=""
)
status=0
summary=()
for isa in ${ISA_SETS:-sse avx2 default}; do
  for threads in ${THREADS:-1 2}; do
    cache=$(mktemp -d)
    # shellcheck disable=SC2086  # the settings are words on purpose
    run_env=(env ${SETTINGS[$isa]} OMP_NUM_THREADS=$threads TORCHINDUCTOR_CACHE_DIR=$cache)
    capability=$("${run_env[@]}" "$PYTHON" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
    echo "== $isa, $threads thread(s): torch reports $capability" >&2
    log=$(mktemp)
    "${run_env[@]}" "$PYTHON" -m pytest tests benchmarks/test_merge_benchmarks.py --benchmark-disable -q -rfE "$@" \
      2>&1 | tee "$log" | tail -n 3 >&2
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && status=1
    summary+=("$isa, $threads thread(s), torch $capability: $(tail -n 1 "$log") (exit $rc)")
    # The failing tests by name (pytest's short summary), so a failure is known without a rerun.
    while IFS= read -r line; do summary+=("    $line"); done < <(grep -E '^(FAILED|ERROR) ' "$log")
    rm -rf "$cache" "$log"
  done
done
printf '%s\n' "${summary[@]}"
exit $status
