"""Compile every Triton kernel of the package for a CUDA GPU (Hopper, sm_90, by default), no GPU needed.

The test suite runs the kernels in Triton's interpreter (``TRITON_INTERPRET=1``), which
executes them with NumPy and never lowers them: it misses what only the compiler sees
(globals that are not ``tl.constexpr``, layouts of ``tl.dot`` operands, type errors on paths
the interpreter treats loosely, shared-memory limits, ptxas errors). This module compiles
each kernel down to a cubin for its meaningful specialisations: every dtype, every value of
each boolean constexpr, the merge modes, the block sizes ``launch.py`` picks for a few
representative shapes, and both the generic (strided) and the contiguous-input code.

    python -m tome_kernels.backends.triton.compile_check [--arch 90] [--jobs N]

Prints ``ok <kernel> <spec>`` per compiled variant and a summary ``compiled K of N``;
exits non-zero if any variant failed. Must run without ``TRITON_INTERPRET=1``. Compiles into
a fresh Triton cache every run: a cache hit skips the code generator, so a kernel cached
once under other settings (e.g. ``TRITON_ALLOW_NON_CONSTEXPR_GLOBALS=1``) would pass unseen.
"""

import argparse
import importlib
import itertools
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Tuple

DTYPES = ("fp32", "fp16", "bf16")

# Pointer element types. DATA follows the dtype under test. Sizes may come in any float
# dtype; float32 stands for all of them (the other dtypes are covered by the data pointers).
DATA = "data"
SIZE = "fp32"
_GROUPS = {"members_ptr": "i32", "row_start_ptr": "i32"}
_INDICES = {"src_idx_ptr": "i64", "dst_idx_ptr": "i64", "unm_idx_ptr": "i64", "token_map_ptr": "i64"}

# Per kernel: its module, each pointer argument's element type (from the kernel's docstring
# and what launch.py passes), the stride arguments that are 1 for contiguous inputs
# (innermost strides, and the token stride of a (B, N, 1) size or of a shared (1, N) roles
# or window tensor), the arguments that are multiples of 16 for contiguous inputs whose
# rows are (row strides and widths), and the float scalars (every other scalar is an int).
KERNELS = {
    "match_kernel": dict(
        module="match",
        pointers={"metric_ptr": DATA, "best_ptr": "fp32", "scratch_ptr": "i32"},
        unit=("s_d",),
        wide=("s_b", "s_h", "s_n", "D"),
    ),
    "rank_kernel": dict(module="match", pointers={"best_ptr": "fp32", "scratch_ptr": "i32"}, unit=(), wide=()),
    "layout_kernel": dict(module="layout", pointers={"scratch_ptr": "i32", **_INDICES, **_GROUPS}, unit=(), wide=()),
    "merge_kernel": dict(
        module="merge",
        pointers={"x_ptr": DATA, "size_ptr": SIZE, "out_ptr": DATA, "size_out_ptr": "fp32", **_GROUPS},
        unit=("sx_c", "ss_n"),
        wide=("sx_b", "sx_n", "C"),
    ),
    "merge_wavg_bwd_kernel": dict(
        module="merge",
        # gsize is the gradient of the float32 size_out; gs is the gradient of size.
        pointers={
            "gy_ptr": DATA, "gsize_ptr": "fp32", "x_ptr": DATA, "size_ptr": SIZE, "gx_ptr": DATA, "gs_ptr": SIZE,
            **_GROUPS,
        },
        unit=("sg_c", "sgs_n", "sx_c", "ss_n"),
        wide=("sg_b", "sg_n", "sx_b", "sx_n", "C"),
    ),
    "merge_bwd_kernel": dict(
        module="merge",
        pointers={"gy_ptr": DATA, "x_ptr": DATA, "y_ptr": DATA, "gx_ptr": DATA, **_GROUPS},
        unit=("sg_c", "sx_c"),
        wide=("sg_b", "sg_n", "sx_b", "sx_n", "C"),
    ),
    "unmerge_kernel": dict(
        module="merge",
        pointers={"y_ptr": DATA, "token_map_ptr": "i64", "out_ptr": DATA},
        unit=("sy_c",),
        wide=("sy_b", "sy_n", "C"),
    ),
    "one_pass_kernel": dict(
        module="fused",
        pointers={
            "metric_ptr": DATA, "x_ptr": DATA, "size_ptr": SIZE, "out_ptr": DATA, "size_out_ptr": "fp32",
            "best_ptr": "fp32", "scratch_ptr": "i32", **_INDICES, **_GROUPS,
        },
        unit=("sm_d", "sx_c", "ss_n"),
        wide=("sm_b", "sm_h", "sm_n", "D", "sx_b", "sx_n", "C"),
    ),
    "assign_kernel": dict(
        module="similarity",
        # Roles are int8 and window ids int32 (roles.py); without a window, launch.py passes
        # the roles pointer in its place, which the kernel never reads.
        pointers={"metric_ptr": DATA, "roles_ptr": "i8", "window_ptr": "i32", "best_ptr": "fp32", "dst_ptr": "i64"},
        unit=("s_d", "sr_n", "sw_n"),
        wide=("s_b", "s_h", "s_n", "D"),
    ),
    "energy_kernel": dict(
        module="similarity",
        pointers={"metric_ptr": DATA, "energy_ptr": "fp32"},
        unit=("s_d",),
        wide=("s_b", "s_h", "s_n", "D"),
        floats=("margin", "alpha"),
    ),
}

# Representative shapes: ViT-B/16 (N=197, keys of 12 heads x 64, C=768), the main one; a
# Stable Diffusion row (N=4096, D=C=320: D spans three 128-wide blocks, so ONE_CHUNK=False);
# a tiny row, where every block clamps to its minimum of 16; a tiny row of wide tokens
# (ONE_CHUNK=False with the smallest token blocks, which compiles fast).
SHAPES = {
    "vit": dict(N=197, D=64, C=768),
    "sd": dict(N=4096, D=320, C=320),
    "tiny": dict(N=5, D=4, C=3),
    "tiny_wide": dict(N=5, D=320, C=320),
}

# "strided": every int a plain i32 and pointers of unknown alignment, the most general code.
# "contiguous": what Triton specialises at runtime for contiguous, freshly allocated inputs:
# unit strides become the constant 1 and pointers (and, where the shape allows, row strides
# and widths) are known multiples of 16, which is the path with vectorised loads and stores.
LAYOUTS = ("contiguous", "strided")


def _blocks(kernel: str, shape: str, do_merge: bool = True) -> Dict[str, object]:
    """The constexpr block sizes (and ONE_CHUNK) that launch.py picks for this shape."""
    from .launch import _block, _merge_blocks  # the launcher's own rules, so they cannot drift

    s = SHAPES[shape]
    na, nb = (s["N"] + 1) // 2, s["N"] // 2
    block_d = _block(s["D"], 16, 128)
    match = dict(ONE_CHUNK=s["D"] <= block_d, BLOCK_D=block_d)
    rank = dict(BLOCK_I=_block(na, 16, 64), BLOCK_K=_block(na, 16, 128))
    block_r, block_c = _merge_blocks(s["C"])
    merge = dict(BLOCK_R=block_r, BLOCK_C=block_c)
    if kernel == "match_kernel":
        return dict(match, BLOCK_A=_block(na, 16, 64), BLOCK_B=_block(nb, 16, 64))
    if kernel in ("assign_kernel", "energy_kernel"):
        return dict(match, BLOCK_I=_block(s["N"], 16, 64), BLOCK_J=_block(s["N"], 16, 64))
    if kernel == "rank_kernel":
        return rank
    if kernel == "layout_kernel":
        return dict(BLOCK=_block(max(na, nb), 16, 64))
    if kernel == "one_pass_kernel":
        block_ab = _block(max(na, nb), 16, 128)
        if not do_merge:  # match only: launch.py passes dummy 16 x 16 merge blocks
            merge = dict(BLOCK_R=16, BLOCK_C=16)
        return dict(match, **rank, **merge, BLOCK_A=block_ab, BLOCK_B=block_ab, BLOCK_L=_block(max(na, nb), 16, 64))
    return merge


def _flag_sets(names: Tuple[str, ...], full: bool) -> List[Dict[str, bool]]:
    """Every combination of the boolean flags, or (for many flags) a covering set: all
    False (the defaults), each flag True on its own, and all True (last)."""
    if full:
        return [dict(zip(names, values)) for values in itertools.product((False, True), repeat=len(names))]
    sets = [dict.fromkeys(names, False)]
    sets += [dict(dict.fromkeys(names, False), **{name: True}) for name in names]
    return sets + [dict.fromkeys(names, True)]


def all_specs() -> List[Tuple[str, Dict[str, object]]]:
    """(kernel name, spec) for every variant to compile. A spec holds dtype, shape, layout,
    num_warps and the value of each of the kernel's constexpr arguments."""
    specs = []

    def add(kernel, dtype, shape, layout, num_warps=4, **constexprs):
        spec = dict(dtype=dtype, shape=shape, layout=layout, num_warps=num_warps, **constexprs)
        spec.update(_blocks(kernel, shape, constexprs.get("DO_MERGE", True)))
        specs.append((kernel, spec))

    def sweep(kernel, flag_sets, dtypes=DTYPES):
        """For kernels that compile in well under a second: each flag set at the main shape
        in both layouts, per dtype; the other shapes' blocks with the defaults (the first
        set) and with every flag set (the last), contiguous."""
        for dtype in dtypes:
            for flags, layout in itertools.product(flag_sets, LAYOUTS):
                add(kernel, dtype, "vit", layout, **flags)
            for shape in ("sd", "tiny", "tiny_wide"):
                for flags in (flag_sets[0], flag_sets[-1]):
                    add(kernel, dtype, shape, "contiguous", **flags)

    def sweep_slow(kernel, flag_sets, defaults, everything, num_warps):
        """For the matching and similarity kernels, whose launch-sized blocks (a 64 or 128
        square tl.dot) take 3 to 15 s a compile: the flags are covered per dtype at the tiny
        shapes, whose 16-wide blocks compile in about a second; the launch-sized blocks get
        the defaults per dtype, and in float16 (what models run in) also every flag set, at
        the main shape strided and at the sd shape (ONE_CHUNK=False)."""
        for dtype in DTYPES:
            for flags in flag_sets:
                add(kernel, dtype, "tiny", "contiguous", num_warps, **flags)
            add(kernel, dtype, "tiny", "strided", num_warps, **everything)
            add(kernel, dtype, "tiny_wide", "contiguous", num_warps, **everything)
            add(kernel, dtype, "vit", "contiguous", num_warps, **defaults)
        add(kernel, "fp16", "vit", "strided", num_warps, **everything)
        add(kernel, "fp16", "sd", "contiguous", num_warps, **everything)

    # No data pointers: the dtype under test does not reach these two.
    sweep("rank_kernel", _flag_sets(("CLASS",), full=True), dtypes=("-",))
    sweep("layout_kernel", _flag_sets(("CLASS", "DISTILL", "WRITE_INDICES"), full=True), dtypes=("-",))
    # HAS_SIZE only matters to the weighted mode (0), but launch.py passes it for every mode.
    merge_sets = [dict(MODE=m, HAS_SIZE=False) for m in (0, 1, 2, 3, 4)] + [dict(MODE=0, HAS_SIZE=True)]
    sweep("merge_kernel", merge_sets)
    # SIZE_GRAD implies HAS_SIZE (launch.py: size_grad = size_grad and size is not None).
    size_flags = ((False, False), (True, False), (True, True))
    sweep("merge_wavg_bwd_kernel", [dict(HAS_SIZE=h, SIZE_GRAD=g) for h, g in size_flags])
    sweep("merge_bwd_kernel", [dict(MODE=m) for m in (1, 2, 3, 4)])
    sweep("unmerge_kernel", [{}])

    match_flags = ("IS_KEYS", "DISTILL")
    sweep_slow("match_kernel", _flag_sets(match_flags, full=True), dict.fromkeys(match_flags, False),
               dict.fromkeys(match_flags, True), 4)
    # One-pass defaults: bipartite_match's launch (indices, no merge); every flag set:
    # bipartite_merge's launch (merge, no indices) with keys, sizes and both special tokens.
    one_pass_flags = ("IS_KEYS", "CLASS", "DISTILL", "HAS_SIZE", "WRITE_INDICES", "DO_MERGE")
    no_flags = dict.fromkeys(one_pass_flags, False)
    sweep_slow(
        "one_pass_kernel", _flag_sets(one_pass_flags, full=False), dict(no_flags, WRITE_INDICES=True),
        dict(dict.fromkeys(one_pass_flags, True), WRITE_INDICES=False), 8,
    )
    # The general methods' kernels (partition.assign, PiToMe's energy): keys or a metric,
    # with or without windows (DSM), the paper's f or the shifted one.
    for kernel, flags in (("assign_kernel", ("IS_KEYS", "HAS_WINDOW")), ("energy_kernel", ("IS_KEYS", "SHIFTED"))):
        sweep_slow(kernel, _flag_sets(flags, full=True), dict.fromkeys(flags, False), dict.fromkeys(flags, True), 4)

    # The same variant reached twice (two shapes with the same blocks and, where the kernel
    # has row strides, the same row alignment) compiles once.
    unique, seen = [], set()
    for kernel, spec in specs:
        aligned = bool(KERNELS[kernel]["wide"]) and _rows_aligned(spec)
        key = (kernel, aligned, tuple(sorted((k, v) for k, v in spec.items() if k != "shape")))
        if key not in seen:
            seen.add(key)
            unique.append((kernel, spec))
    return unique


def _kernel(name: str):
    """The kernel, imported here: worker processes import the package themselves."""
    module = importlib.import_module(f"{__package__}.{KERNELS[name]['module']}")
    return getattr(module, name)


def _rows_aligned(spec: Dict[str, object]) -> bool:
    """Whether the row strides and widths of this variant are known multiples of 16."""
    shape = SHAPES[spec["shape"]]
    return spec["layout"] == "contiguous" and shape["C"] % 16 == 0 and shape["D"] % 16 == 0


def _ones(kernel: str, spec: Dict[str, object]) -> Tuple[str, ...]:
    """Integer arguments that are the constant 1 in this variant (Triton specialises a 1)."""
    if spec["layout"] != "contiguous":
        return ()
    ones = KERNELS[kernel]["unit"]
    if spec.get("IS_KEYS") is False:
        # A (B, N, D) metric is launched with H = 1.
        ones += ("H",)
    return ones


def signature(kernel: str, spec: Dict[str, object]):
    """(signature, constexprs, attrs) of ``triton.compile`` for one variant, built from the
    kernel's own argument list so that it follows the kernel's changes."""
    fn = _kernel(kernel)
    table = KERNELS[kernel]
    ones = _ones(kernel, spec)
    rows_aligned = _rows_aligned(spec)
    floats = table.get("floats", ())
    for name in ones + table["wide"] + tuple(table["pointers"]) + floats:
        if name not in fn.arg_names:
            raise KeyError(f"{kernel}: the table names {name!r}, which is no argument of the kernel")
    sig, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            if name not in spec:
                raise KeyError(f"{kernel}: the spec gives no value for constexpr {name!r}")
            sig[name], constexprs[name] = "constexpr", spec[name]
        elif name in ones:
            sig[name], constexprs[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            if name not in table["pointers"]:
                raise KeyError(f"{kernel}: no element type for pointer argument {name!r}")
            elem = table["pointers"][name]
            sig[name] = "*" + (spec["dtype"] if elem == DATA else elem)
            if spec["layout"] == "contiguous":
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if rows_aligned and name in table["wide"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    unknown = set(spec) - constexpr_names - {"dtype", "shape", "layout", "num_warps"}
    if unknown:
        raise KeyError(f"{kernel}: the spec sets {sorted(unknown)}, which are no constexpr arguments of the kernel")
    return sig, constexprs, attrs


def compile_spec(kernel: str, spec: Dict[str, object], arch: int = 90):
    """Compile one variant for CUDA compute capability ``arch``; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, constexprs, attrs = signature(kernel, spec)
    source = ASTSource(_kernel(kernel), sig, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec["num_warps"]})


def _root_cause(error: BaseException) -> str:
    """One line for the summary. Triton wraps the real error once per inlined @jit function;
    the innermost message is "at line:col:", a source excerpt, then the error itself."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line for line in str(error).strip().splitlines() if line.strip()] or [""]
    message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}"
    return f"{type(error).__name__}: {message}"[:240]


def _try_compile(job):
    """(kernel, spec, None or (short error, traceback), seconds): a failure is reported, not
    raised, so that one broken variant does not hide the others."""
    kernel, spec, arch = job
    start = time.perf_counter()
    try:
        compile_spec(kernel, spec, arch)
        error = None
    except Exception as e:
        error = (_root_cause(e), traceback.format_exc())
    return kernel, spec, error, time.perf_counter() - start


def describe(spec: Dict[str, object]) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in spec.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for Hopper")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Under the interpreter @triton.jit makes interpreter functions, which cannot compile.
        print("error: TRITON_INTERPRET=1 is set; unset it to compile the kernels (no GPU is needed)", file=sys.stderr)
        return 2

    # Triton reads it at each compile; the workers inherit it.
    cache = tempfile.TemporaryDirectory(prefix="tome_compile_check_")
    os.environ["TRITON_CACHE_DIR"] = cache.name

    specs = all_specs()
    # The slowest compiles first, so that the workers finish together.
    slow = ("one_pass_kernel", "match_kernel", "assign_kernel", "energy_kernel")
    slow_first = sorted(specs, key=lambda ks: (ks[0] not in slow, ks[1]["shape"].startswith("tiny")))
    jobs = [(kernel, spec, args.arch) for kernel, spec in slow_first]
    start = time.perf_counter()
    if args.jobs <= 1:
        results = map(_try_compile, jobs)
        pool = None
    else:
        # spawn, not fork: each worker imports triton and the kernels afresh instead of
        # inheriting a forked copy of a process that may hold threads and compiler state.
        pool = multiprocessing.get_context("spawn").Pool(args.jobs)
        results = pool.imap_unordered(_try_compile, jobs)
    failures, shown = [], set()
    for kernel, spec, error, seconds in results:
        if error is None:
            print(f"ok {kernel} {describe(spec)} ({seconds:.1f}s)", flush=True)
            continue
        failures.append((kernel, spec, error[0]))
        print(f"FAILED {kernel} {describe(spec)}: {error[0]}", flush=True)
        # The full traceback once per distinct error, not once per variant it breaks.
        if (kernel, error[0]) not in shown:
            shown.add((kernel, error[0]))
            print(error[1], flush=True)
    if pool is not None:
        pool.close()
        pool.join()
    cache.cleanup()

    kernels = sorted({kernel for kernel, _ in specs})
    print(
        f"compiled {len(specs) - len(failures)} of {len(specs)} variants of {len(kernels)} kernels "
        f"for sm_{args.arch} in {time.perf_counter() - start:.1f}s"
    )
    for kernel, spec, error in failures:
        print(f"FAILED {kernel} {describe(spec)}: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
