#!/usr/bin/env bash
# The main job: sets up (scripts/env.sh), then runs the benchmarks that can run here, each
# printing its table to stdout (progress to stderr) and saving raw results with device,
# versions, commit, the machine's load and thread settings:
#   kernels  python -m benchmarks.run       the merge step, every provider and default shape
#   minilm   python -m benchmarks.minilm    MiniLM embedding fidelity and speed against r
#   e2e      python -m benchmarks.e2e_vit   ViT images/s against r: unpatched, ToMe via reference, via kernels;
#            and transformers CLIP / DINOv2 encoders (proportional attention: SDPA mask, FlexAttention)
#   dit      python -m benchmarks.e2e_dit   one denoising step of SD3 and Flux transformers at a 64x64 latent:
#            unpatched and patch.diffusion's merge and kv schemes at two ratios
# then draws the kernels' speed-ups and the ViT throughput against r beside the results
# (python -m benchmarks.plot; skipped, saying so, without matplotlib).
# Results go to benchmarks/results/local/ (ignored by git); `bash scripts/bench.sh --save-record`
# saves them, and the picture, as the project's record in benchmarks/results/.
# `bash scripts/bench.sh NAME [ARGS...]` runs one benchmark, passing ARGS to it (try
# `bash scripts/bench.sh kernels --help`).
set -euo pipefail
source "$(dirname "$0")/env.sh"

declare -A MODULES=([kernels]=benchmarks.run [minilm]=benchmarks.minilm [e2e]=benchmarks.e2e_vit
                    [dit]=benchmarks.e2e_dit)

if [ $# -gt 0 ] && [ "$1" != "--save-record" ]; then
  name=$1
  shift
  if [ -z "${MODULES[$name]+set}" ]; then
    echo "bench.sh: unknown benchmark '$name' (expected one of: kernels minilm e2e dit, or --save-record)" >&2
    exit 2
  fi
  exec "$PYTHON" -m "${MODULES[$name]}" "$@"
fi
if [ $# -gt 1 ]; then
  echo "bench.sh: the main job takes --save-record only; to pass options, run one benchmark (bench.sh NAME ...)" >&2
  exit 2
fi

save=()
dir=benchmarks/results/local
if [ $# -eq 1 ]; then
  save=(--save-record)
  dir=benchmarks/results
fi

# Each benchmark ends its output with "saved <path>": the plot needs the kernels' and the e2e's.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
plotted=()
started=$SECONDS
for name in kernels minilm e2e dit; do
  echo "== $name: python -m ${MODULES[$name]} ${save[*]}" >&2
  begun=$SECONDS
  "$PYTHON" -m "${MODULES[$name]}" "${save[@]}" | tee "$log"
  echo "== $name took $((SECONDS - begun)) s" >&2
  saved=$(sed -n 's/^saved //p' "$log" | tail -n 1)
  if { [ "$name" = kernels ] || [ "$name" = e2e ]; } && [ -n "$saved" ]; then
    plotted+=("$saved")
  fi
done

stamp=$(date -u +%Y%m%dT%H%M%SZ)
echo "== plot: python -m benchmarks.plot" >&2
"$PYTHON" -m benchmarks.plot "${plotted[@]}" --out "$dir/bench_$stamp.png"
echo "bench.sh: the main job took $((SECONDS - started)) s" >&2
