"""Compile the Triton kernels a GPU run needs, in parallel, before the run needs them.

    python -m benchmarks.warm_triton [--jobs N] [--list]

Triton compiles a kernel the first time it is launched with a new specialisation (dtypes,
block sizes, which integer arguments are 1 or multiples of 16), one compilation at a time in
the launching process. A GPU run of the tests and benchmarks makes a few hundred of them,
minutes of CPU time in one process. This module launches, in a pool of processes (spawned:
CUDA does not survive a fork), every case that the full-shape tests, the benchmarks and the
sanitizer case will run through the "triton" backend, so that the compilations spread over
the cores and land in Triton's on-disk cache (``TRITON_CACHE_DIR``), where the later
processes find them.

A case is one merge step (forward, or forward and backward) of a benchmark shape in one
dtype on one Triton provider, or one pass over every operator (``exercise``) at a small shape on one of the
Triton backend's two paths. The small-shape tests use shapes of their own: what they need
beyond these cases compiles during the tests (``scripts/gpu_checks.py`` reports how many).

Prints one line per case (seconds, or the error) and a summary line
``warmed N cases (F failed) in S s; triton cache: K kernels``. Exits non-zero if a case
failed or no GPU is visible.
"""

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

# torch is imported inside the functions that run cases: scripts/gpu_checks.py imports this
# module for cached_kernels alone, in a process that must not hold torch (or a CUDA context).
if TYPE_CHECKING:
    import torch

# A case: (what it is, args for run_case). Plain tuples, so they pickle to spawned workers.
Case = Tuple[str, tuple]

DTYPES = ("float16", "float32", "bfloat16")
# (tokens, heads or None for a (B, N, D) metric, head dim / D, channels, dtype): a ViT-like
# row on keys, an odd-sized feature metric wider than one block, and a tiny bf16 row.
EXERCISE_SHAPES = [(197, 12, 64, 96, "float16"), (67, None, 300, 33, "float32"), (5, 2, 4, 3, "bfloat16")]
# What benchmarks.run times on a GPU: float16, on the "triton" provider and on each path forced.
BENCH_DTYPE = "float16"
BENCH_TRITON_PROVIDERS = ("triton", "triton_one_pass", "triton_multi_kernel")
# The Triton backend's two paths: one kernel per batch row for short rows, and the
# multi-kernel path (forced by a one-pass limit of 0 tokens).
PATHS = {"one_pass": 10**9, "multi_kernel": 0}


def exercise(backend: str, n: int, heads: Optional[int], d: int, channels: int, dtype: "torch.dtype",
             device: str = "cuda") -> None:
    """Run every operator of a backend once at a small shape, forward and backward: ToMe's
    merge and match (with class / distill tokens), every merge mode, unmerge, PiToMe's energy,
    and the grid and window assignments of the diffusion methods."""
    import torch

    from tome_kernels import MERGE_MODES, bipartite_match, bipartite_merge, grid_match, pitome_merge, window_match

    batch = 3
    shape = (batch, n, d) if heads is None else (batch, heads, n, d)
    metric = torch.randn(shape, device=device, dtype=dtype)
    x = torch.randn(batch, n, channels, device=device, dtype=dtype, requires_grad=True)
    size = torch.randint(1, 4, (batch, n, 1), device=device, dtype=torch.float32).requires_grad_()
    x_out, size_out = bipartite_merge(x, metric, n // 3, size, class_token=True, backend=backend)
    (x_out.float().sum() + size_out.sum()).backward()
    plan = bipartite_match(metric, n // 3, distill_token=True, backend=backend)
    for mode in MERGE_MODES:
        plan.merge(x, mode).float().sum().backward()
    plan.unmerge(x_out.detach().requires_grad_()).float().sum().backward()
    pitome_merge(x, metric, n // 3, size, class_token=True, backend=backend)[0].float().sum().backward()
    side = int(n ** 0.5)
    grid_match(x[:, : side * side].detach(), n // 4, (side, side), backend=backend).merge(x[:, : side * side], "mean")
    window_match(metric[..., : side * side + 1, :], n // 4, (side, side), class_token=True, backend=backend)


def cases() -> List[Case]:
    """Every case: the benchmark shapes' steps, then the small passes over every operator."""
    from .providers import applies
    from .shapes import GPU_SHAPES

    out: List[Case] = []
    for shape in GPU_SHAPES:
        for dtype in DTYPES:
            # The benchmarks time float16 on each path of the Triton backend; the full-shape
            # tests run every dtype on the path the backend chooses.
            providers = BENCH_TRITON_PROVIDERS if dtype == BENCH_DTYPE else ("triton",)
            # As benchmarks.run does: the forced paths time ToMe's shapes only.
            for provider in (p for p in providers if applies(p, shape)):
                for backward in (False, True) if "fwd+bwd" in shape.passes else (False,):
                    label = f"step {shape.name} {dtype} {'fwd+bwd' if backward else 'fwd'} {provider}"
                    out.append((label, ("step", shape.name, dtype, backward, provider)))
    for path in PATHS:
        for n, heads, d, channels, dtype in EXERCISE_SHAPES:
            out.append((f"exercise {path} n={n} heads={heads} d={d} c={channels} {dtype}",
                        ("exercise", path, n, heads, d, channels, dtype)))
    return out


def run_case(args: tuple, device: str = "cuda") -> None:
    """Run one case on ``device`` (benchmarks.compile_keys runs them on CPU tensors)."""
    import torch

    from tome_kernels.backends.triton import launch

    if args[0] == "step":
        from .providers import make_inputs, make_step
        from .shapes import GPU_SHAPES

        _, name, dtype, backward, provider = args
        shape = next(s for s in GPU_SHAPES if s.name == name)
        make_step(provider, shape, make_inputs(shape, torch.device(device), getattr(torch, dtype)), backward)()
    else:
        _, path, n, heads, d, channels, dtype = args
        saved, launch.ONE_PASS_MAX_TOKENS = launch.ONE_PASS_MAX_TOKENS, PATHS[path]
        try:
            exercise("triton", n, heads, d, channels, getattr(torch, dtype), device=device)
        finally:
            launch.ONE_PASS_MAX_TOKENS = saved
    if device == "cuda":
        torch.cuda.synchronize()


def _worker(case: Case) -> Tuple[str, float, Optional[str]]:
    label, args = case
    start = time.perf_counter()
    try:
        run_case(args)
        return label, time.perf_counter() - start, None
    except Exception as error:  # one bad case must not stop the others; it is reported
        return label, time.perf_counter() - start, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"


def triton_cache_dir() -> Path:
    """Where Triton keeps compiled kernels (its default unless TRITON_CACHE_DIR is set)."""
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def cached_kernels(cache: Optional[Path] = None) -> int:
    """Compiled kernels in a Triton cache: each has one directory with a ``.json`` of metadata
    beside its binaries (the ``__grp__`` files list a group; they are not kernels)."""
    cache = cache or triton_cache_dir()
    if not cache.is_dir():
        return 0
    return sum(1 for p in cache.glob("*/*.json") if not p.name.startswith("__grp__"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.warm_triton", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: every core)")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    todo = cases()
    if args.list:
        print("\n".join(label for label, _ in todo))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("warm_triton: no GPU visible (torch.cuda.is_available() is False): nothing compiled", file=sys.stderr)
        return 2
    start = time.perf_counter()
    failed = run_cases(todo, args.jobs)
    print(f"warmed {len(todo)} cases ({failed} failed) in {time.perf_counter() - start:.1f} s; "
          f"triton cache: {cached_kernels()} kernels")
    return 1 if failed else 0


def run_cases(todo: List[Case], jobs: int, worker: Callable = _worker) -> int:
    """Run the cases in ``jobs`` spawned processes, print a line for each, return how many failed.

    concurrent.futures rather than multiprocessing.Pool: when a worker dies (a segfault in a
    kernel launch), Pool waits forever for that worker's case, and the warm-up would take its
    step's whole budget; here the cases not done yet fail at once, and the tests compile them."""
    failed = 0
    # Each worker holds a CUDA context (some hundred MB of device memory): far under the GPU's.
    with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(worker, case): case[0] for case in todo}
        for future in as_completed(futures):
            try:
                label, seconds, error = future.result()
            except BrokenProcessPool as broken:
                label, seconds, error = futures[future], 0.0, f"not run: a worker process died ({broken})"
            failed += error is not None
            print(f"{'FAIL' if error else 'ok'} {seconds:6.1f} s  {label}" + (f"  {error}" if error else ""),
                  flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
