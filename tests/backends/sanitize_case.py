"""A small run of every operator of the GPU backends ("triton" on both paths, "cuda"), for compute-sanitizer's memcheck:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python -m tests.backends.sanitize_case

With PyTorch's caching allocator off, each tensor is its own allocation, so a read or write
past the end of one is reported instead of landing in a neighbour inside a cached block.
"""

import torch

from tome_kernels import MERGE_MODES, bipartite_match, bipartite_merge, grid_match, pitome_merge, window_match
from tome_kernels.backends.triton import launch


def run_once(backend, n, heads, d, channels, dtype):
    shape = (3, n, d) if heads is None else (3, heads, n, d)
    metric = torch.randn(shape, device="cuda", dtype=dtype)
    x = torch.randn(3, n, channels, device="cuda", dtype=dtype, requires_grad=True)
    size = torch.randint(1, 4, (3, n, 1), device="cuda", dtype=torch.float32).requires_grad_()
    x_out, size_out = bipartite_merge(x, metric, n // 3, size, class_token=True, backend=backend)
    (x_out.float().sum() + size_out.sum()).backward()
    plan = bipartite_match(metric, n // 3, distill_token=True, backend=backend)
    for mode in MERGE_MODES:
        plan.merge(x, mode).float().sum().backward()
    plan.unmerge(x_out.detach().requires_grad_()).float().sum().backward()
    # The similarity kernels (energy, assign with and without windows) of the other methods.
    pitome_merge(x, metric, n // 3, size, class_token=True, backend=backend)[0].float().sum().backward()
    side = int(n ** 0.5)
    grid_match(x[:, : side * side].detach(), n // 4, (side, side), backend=backend).merge(x[:, : side * side], "mean")
    window_match(metric[..., : side * side + 1, :], n // 4, (side, side), class_token=True, backend=backend)


def main():
    # The Triton backend on both of its paths, then the CUDA extension.
    for backend, one_pass_max in (("triton", 10**9), ("triton", 0), ("cuda", None)):
        if one_pass_max is not None:
            launch.ONE_PASS_MAX_TOKENS = one_pass_max
        for n, heads, d, channels, dtype in [(197, 12, 64, 96, torch.float16), (67, None, 300, 33, torch.float32),
                                              (5, 2, 4, 3, torch.bfloat16)]:
            run_once(backend, n, heads, d, channels, dtype)
    torch.cuda.synchronize()
    print("sanitize_case: every operator ran")


if __name__ == "__main__":
    main()
