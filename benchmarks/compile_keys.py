"""Count the Triton compilations of a GPU run's warm-up cases, on a machine without a GPU.

    python -m benchmarks.compile_keys

``benchmarks.warm_triton`` lists every case that the full-shape tests, the benchmarks and
the sanitizer case run through the "triton" backend. This runs each of them on CPU tensors
with ``specializations.recording(launch_kernels=False)``: every launch is recorded with the
compile key Triton would give it on a GPU, and nothing runs, so the full shapes cost seconds.
Prints the distinct keys per kernel and in all.
"""

import os
import sys

# The Triton backend takes CPU tensors only in interpreter mode, set before triton loads.
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from benchmarks.providers import make_inputs, make_step  # noqa: E402
from benchmarks.shapes import GPU_SHAPES  # noqa: E402
from benchmarks.warm_triton import PATHS, cases, exercise  # noqa: E402
from tome_kernels.backends.triton import launch  # noqa: E402
from tome_kernels.backends.triton.specializations import recording, summary  # noqa: E402


def main() -> int:
    cpu = torch.device("cpu")
    with recording(launch_kernels=False) as keys:
        for _, args in cases():
            if args[0] == "step":
                _, name, dtype, backward = args
                shape = next(s for s in GPU_SHAPES if s.name == name)
                make_step("triton", shape, make_inputs(shape, cpu, getattr(torch, dtype)), backward)()
            else:
                _, path, n, heads, d, channels, dtype = args
                saved, launch.ONE_PASS_MAX_TOKENS = launch.ONE_PASS_MAX_TOKENS, PATHS[path]
                try:
                    exercise("triton", n, heads, d, channels, getattr(torch, dtype), device="cpu")
                finally:
                    launch.ONE_PASS_MAX_TOKENS = saved
    print(f"{len(cases())} warm-up cases")
    print(summary(keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
