"""A small run of every operator of the GPU backends ("triton" on both paths, "cuda"), for compute-sanitizer's memcheck:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python -m tests.backends.sanitize_case

With PyTorch's caching allocator off, each tensor is its own allocation, so a read or write
past the end of one is reported instead of landing in a neighbour inside a cached block.
The operators run as ``benchmarks.warm_triton.exercise`` runs them (the same cases warm the
Triton cache before a GPU run, so the kernels are compiled when the sanitizer gets here).
"""

import torch

from benchmarks.warm_triton import EXERCISE_SHAPES, PATHS, exercise
from tome_kernels.backends.triton import launch


def main():
    # The Triton backend on both of its paths, then the CUDA extension.
    for backend, one_pass_max in [("triton", limit) for limit in PATHS.values()] + [("cuda", None)]:
        if one_pass_max is not None:
            launch.ONE_PASS_MAX_TOKENS = one_pass_max
        for n, heads, d, channels, dtype in EXERCISE_SHAPES:
            exercise(backend, n, heads, d, channels, getattr(torch, dtype))
    torch.cuda.synchronize()
    print("sanitize_case: every operator ran")


if __name__ == "__main__":
    main()
