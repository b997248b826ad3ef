"""Compile every Triton kernel of the package for a CUDA GPU (Hopper, sm_90, by default), no GPU needed.

The test suite runs the kernels in Triton's interpreter (``TRITON_INTERPRET=1``), which
executes them with NumPy and never lowers them: it misses what only the compiler sees
(globals that are not ``tl.constexpr``, layouts of ``tl.dot`` operands, type errors on paths
the interpreter treats loosely, shared-memory limits, ptxas errors). This module compiles
each kernel down to a cubin for its meaningful specialisations: every dtype, every value of
each boolean constexpr, the merge modes, the forms of PiToMe's energy, with ``launch.py``'s
block sizes and warps, for aligned, unaligned and strided inputs (``LAYOUTS``). Each variant
must also spill at most ``SPILL_LIMIT_BYTES`` and hold no approximate square root or division
(``APPROXIMATE_OPS``).

    python -m tome_kernels.backends.triton.compile_check [--arch 90] [--jobs N]

Prints ``ok <kernel> <spec> regs=.. stack=.. spill_stores=.. spill_loads=.. sass=..`` per
compiled variant (per thread: registers, stack frame and spill bytes, from ptxas; the static
SASS instruction count), a table of each kernel's largest figures, and a summary
``compiled K of N``; exits non-zero if any variant failed. Must run without
``TRITON_INTERPRET=1``. Compiles into
a fresh Triton cache every run: a cache hit skips the code generator, so a kernel cached
once under other settings (e.g. ``TRITON_ALLOW_NON_CONSTEXPR_GLOBALS=1``) would pass unseen.
"""

import argparse
import contextlib
import importlib
import io
import itertools
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Tuple

from ...reference import energy
from .specializations import kernel_arguments

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
        floats=("margin", "alpha", "sigma"),
    ),
}

# How a launch's arguments look to Triton, which specialises on them at run time (see
# ``specializations.py``); the block sizes are launch.py's constants, the same for every shape.
# "aligned": contiguous inputs whose rows are multiples of 16 wide (C, D: every model's
# shapes): unit strides become the constant 1, and pointers, row strides and widths are known
# multiples of 16, the path with vectorised loads and stores. "unaligned": contiguous inputs of
# odd widths (the tests' C = 3, D = 4): unit strides 1 and aligned pointers only. "strided":
# nothing known, every int a plain i32, the most general code.
LAYOUTS = ("aligned", "unaligned", "strided")


def _blocks(kernel: str) -> List[Dict[str, object]]:
    """The constexpr block sizes and the warps launch.py launches this kernel with: one set,
    or for the kernels that merge, the wide merge tiles first and then the narrow ones."""
    from . import launch  # the launcher's own constants, so that they cannot drift

    warps, score_warps = dict(num_warps=launch.WARPS), dict(num_warps=launch.SCORE_WARPS)
    match = dict(BLOCK_A=launch.TOKEN_BLOCK, BLOCK_B=launch.TOKEN_BLOCK, BLOCK_D=launch.FEATURE_BLOCK)
    rank = dict(BLOCK_I=launch.TOKEN_BLOCK, BLOCK_K=launch.RANK_BLOCK)
    merges = (launch.MERGE_BLOCKS, launch.NARROW_MERGE_BLOCKS)
    if kernel == "match_kernel":
        return [dict(score_warps, **match)]
    if kernel in ("assign_kernel", "energy_kernel"):
        return [dict(score_warps, BLOCK_I=launch.TOKEN_BLOCK, BLOCK_J=launch.TOKEN_BLOCK, BLOCK_D=launch.FEATURE_BLOCK)]
    if kernel == "rank_kernel":
        return [dict(warps, **rank)]
    if kernel == "layout_kernel":
        return [dict(warps, BLOCK=launch.TOKEN_BLOCK)]
    if kernel == "one_pass_kernel":
        return [dict(score_warps, **match, **rank, **merge, BLOCK_L=launch.TOKEN_BLOCK) for merge in merges]
    return [dict(warps, **merge) for merge in merges]


def _flag_sets(names: Tuple[str, ...], full: bool) -> List[Dict[str, bool]]:
    """Every combination of the boolean flags, or (for many flags) a covering set: all
    False (the defaults), each flag True on its own, and all True (last)."""
    if full:
        return [dict(zip(names, values)) for values in itertools.product((False, True), repeat=len(names))]
    sets = [dict.fromkeys(names, False)]
    sets += [dict(dict.fromkeys(names, False), **{name: True}) for name in names]
    return sets + [dict.fromkeys(names, True)]


def all_specs() -> List[Tuple[str, Dict[str, object]]]:
    """(kernel name, spec) for every variant to compile. A spec holds dtype, layout, num_warps
    and the value of each of the kernel's constexpr arguments."""
    specs = []

    def sweep(kernel, flag_sets, dtypes=DTYPES):
        """Each flag set in the aligned layout, per dtype; the defaults (the first set) and
        every flag (the last) also in the other layouts; and those two in every layout with
        the narrow merge tiles, where the kernel merges."""
        blocks, *other_blocks = _blocks(kernel)
        ends = (flag_sets[0], flag_sets[-1])
        for dtype in dtypes:
            for flags in flag_sets:
                specs.append((kernel, dict(dtype=dtype, layout="aligned", **flags, **blocks)))
            for flags, layout in itertools.product(ends, LAYOUTS[1:]):
                specs.append((kernel, dict(dtype=dtype, layout=layout, **flags, **blocks)))
            for more, flags, layout in itertools.product(other_blocks, ends, LAYOUTS):
                if flags.get("DO_MERGE", True):
                    specs.append((kernel, dict(dtype=dtype, layout=layout, **flags, **more)))

    # No data pointers: the dtype under test does not reach these two.
    sweep("rank_kernel", _flag_sets(("CLASS",), full=True), dtypes=("-",))
    sweep("layout_kernel", _flag_sets(("CLASS", "DISTILL", "WRITE_INDICES"), full=True), dtypes=("-",))
    # HAS_SIZE only matters to the weighted mode (0), but launch.py passes it for every mode.
    sweep("merge_kernel", [dict(MODE=m, HAS_SIZE=False) for m in (0, 1, 2, 3, 4)] + [dict(MODE=0, HAS_SIZE=True)])
    # SIZE_GRAD implies HAS_SIZE (launch.py: size_grad = size_grad and size is not None).
    size_flags = ((False, False), (True, False), (True, True))
    sweep("merge_wavg_bwd_kernel", [dict(HAS_SIZE=h, SIZE_GRAD=g) for h, g in size_flags])
    sweep("merge_bwd_kernel", [dict(MODE=m) for m in (1, 2, 3, 4)])
    sweep("unmerge_kernel", [{}])
    sweep("match_kernel", _flag_sets(("IS_KEYS", "DISTILL"), full=True))
    # One-pass: the covering set, whose first and last are bipartite_match's launch (indices,
    # no merge) and bipartite_merge's (merge, no indices) with keys, sizes and both tokens.
    one_pass_flags = ("IS_KEYS", "CLASS", "DISTILL", "HAS_SIZE", "WRITE_INDICES", "DO_MERGE")
    no_flags = dict.fromkeys(one_pass_flags, False)
    one_pass_sets = _flag_sets(one_pass_flags, full=False)[1:-1]
    sweep("one_pass_kernel", [dict(no_flags, WRITE_INDICES=True)] + one_pass_sets
          + [dict(dict.fromkeys(one_pass_flags, True), WRITE_INDICES=False)])
    # The general methods' kernels (partition.assign, PiToMe's energy): keys or a metric,
    # with or without windows (DSM); every form of PiToMe's f (FORM: the codes of
    # energy.FORMS) with either.
    sweep("assign_kernel", _flag_sets(("IS_KEYS", "HAS_WINDOW"), full=True))
    forms = range(len(energy.FORMS))
    sweep("energy_kernel", [dict(IS_KEYS=keys, FORM=form) for keys in (False, True) for form in forms])

    # Layouts that look the same to a kernel (one without unit strides or row widths, say)
    # compile once.
    unique, seen = [], set()
    for kernel, spec in specs:
        sig, constexprs, attrs = signature(kernel, spec)
        key = (kernel, repr(sig), repr(constexprs), repr(sorted(attrs.items())), spec["num_warps"])
        if key not in seen:
            seen.add(key)
            unique.append((kernel, spec))
    return unique


def _kernel(name: str):
    """The kernel, imported here: worker processes import the package themselves."""
    module = importlib.import_module(f"{__package__}.{KERNELS[name]['module']}")
    return getattr(module, name)


def signature(kernel: str, spec: Dict[str, object]):
    """(signature, constexprs, attrs) of ``triton.compile`` for one variant, built from the
    kernel's own argument list so that it follows the kernel's changes."""
    # Read from the kernel's signature, so that this works in the interpreter too (the test
    # lists the specs there).
    arguments = kernel_arguments(_kernel(kernel))
    table = KERNELS[kernel]
    layout = spec["layout"]
    ones = table["unit"] if layout != "strided" else ()
    floats = table.get("floats", ())
    for name in table["unit"] + table["wide"] + tuple(table["pointers"]) + floats:
        if name not in [arg[0] for arg in arguments]:
            raise KeyError(f"{kernel}: the table names {name!r}, which is no argument of the kernel")
    # Triton never specialises these, whatever their values: the table must not claim it does.
    claimed = {name for name, _, dont in arguments if dont} & set(table["unit"] + table["wide"])
    if claimed:
        raise KeyError(f"{kernel}: the table specialises {sorted(claimed)}, which the kernel does not specialise")
    sig, constexprs, attrs = {}, {}, {}
    for i, (name, is_constexpr, _) in enumerate(arguments):
        if is_constexpr:
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
            if layout != "strided":
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if layout == "aligned" and name in table["wide"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
    constexpr_names = {name for name, is_constexpr, _ in arguments if is_constexpr}
    unknown = set(spec) - constexpr_names - {"dtype", "layout", "num_warps"}
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


# The most spill traffic (bytes of spill stores plus spill loads per thread, from ptxas) a
# variant may have. A spill is a round trip through local memory, at best the L1. When a
# thread held a whole (64 x D) operand of the float32 tl.dot, the matching kernels spilled
# 4-14 KB of stack and moved 10-60 KB per thread that way, inside the loop that does the
# work (docs/triton.md). What is left now is ptxas parking a few values that live across
# the main loop (a tile's flags, its window ids) to keep to a register count it prefers:
# up to 84 bytes, stored before the loop and loaded after it (read in the SASS of the
# assign kernel with windows). 128 bytes leaves room for that and for another ptxas
# release's choices, and is far below any tile that no longer fits.
SPILL_LIMIT_BYTES = 128

# Approximate float32 square root, division and reciprocals in PTX. The kernels round these
# to nearest (tl.sqrt_rn, tl.div_rn) like the reference and the CUDA kernels do: see
# docs/semantics.md, "Arithmetic". (tl.exp's ex2.approx is allowed: no backend rounds exp
# correctly.)
APPROXIMATE_OPS = ("sqrt.approx", "rsqrt.approx", "div.full", "div.approx", "rcp.approx")

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+)")
# A SASS instruction line of cuobjdump: "/*0a30*/  FFMA R4, R5, R6, R4 ;".
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+\S", re.M)


def approximate_ops(ptx: str) -> List[str]:
    """The approximate square-root and division instructions that occur in a kernel's PTX."""
    return [op for op in APPROXIMATE_OPS if re.search(r"\b" + re.escape(op) + r"\.", ptx)]


def _cuobjdump() -> str:
    """Triton's own cuobjdump (it ships one beside its ptxas), else the one on PATH."""
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError, RuntimeError):
        return shutil.which("cuobjdump") or "cuobjdump"


def resources(cubin: bytes, ptxas_log: str) -> Dict[str, int]:
    """Per thread: registers, stack frame and bytes of spill stores and loads, and the
    kernel's static SASS instruction count.

    Registers and spills are read from the log of the ptxas run that made Triton's cubin
    (``TRITON_DUMP_PTXAS_LOG``), and checked against ``cuobjdump -res-usage`` of that cubin:
    REG and STACK there are what the driver reports to Triton at load time (``n_regs``, and
    ``n_spills`` = local bytes / 4). Raises ValueError if either is missing or they differ.
    """
    regs, stack = _PTXAS_REGS.search(ptxas_log), _PTXAS_STACK.search(ptxas_log)
    if not (regs and stack):
        raise ValueError(f"no register report in the ptxas log: {ptxas_log[-300:]!r}")
    report = dict(regs=int(regs.group(1)), stack=int(stack.group(1)), spill_stores=int(stack.group(2)),
                  spill_loads=int(stack.group(3)))
    with tempfile.TemporaryDirectory(prefix="tome_cubin_") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    found = _RES_USAGE.search(usage)
    if not found or (int(found.group(1)), int(found.group(2))) != (report["regs"], report["stack"]):
        raise ValueError(f"cuobjdump -res-usage of the cubin disagrees with ptxas: {usage.strip()!r} vs {report}")
    report["sass"] = len(_SASS_LINE.findall(sass))
    return report


def _check(kernel: str, spec: Dict[str, object], arch: int):
    """Compile one variant; returns (resources, reasons it fails the check)."""
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints the log of its own ptxas run
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = compile_spec(kernel, spec, arch)
    report = resources(compiled.asm["cubin"], log.getvalue())
    problems = []
    spilled = report["spill_stores"] + report["spill_loads"]
    if spilled > SPILL_LIMIT_BYTES:
        problems.append(f"{spilled} bytes of spill traffic per thread, over SPILL_LIMIT_BYTES = {SPILL_LIMIT_BYTES}")
    approximate = approximate_ops(compiled.asm["ptx"])
    if approximate:
        problems.append(f"approximate arithmetic in the PTX: {', '.join(approximate)} (use tl.sqrt_rn / tl.div_rn)")
    return report, problems


def _root_cause(error: BaseException) -> str:
    """One line for the summary. Triton wraps the real error once per inlined @jit function;
    the innermost message is "at line:col:", a source excerpt, then the error itself."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line for line in str(error).strip().splitlines() if line.strip()] or [""]
    message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}"
    return f"{type(error).__name__}: {message}"[:240]


def _try_compile(job):
    """(kernel, spec, None or (short error, details), seconds, resources or None): a failure
    is reported, not raised, so that one broken variant does not hide the others."""
    kernel, spec, arch = job
    start = time.perf_counter()
    report = None
    try:
        report, problems = _check(kernel, spec, arch)
        error = ("; ".join(problems), "") if problems else None
    except Exception as e:
        error = (_root_cause(e), traceback.format_exc())
    return kernel, spec, error, time.perf_counter() - start, report


def describe_resources(report: Dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in report.items())


def resource_table(results) -> List[str]:
    """One line per kernel: its variants and the largest of each figure over them."""
    lines = [f"{'per thread, max over variants':32} {'variants':>8} {'regs':>5} {'stack':>6} {'spill_st':>8} "
             f"{'spill_ld':>8} {'sass':>6}"]
    for kernel in sorted({kernel for kernel, _ in results}):
        reports = [report for name, report in results if name == kernel]
        top = {key: max(r[key] for r in reports) for key in reports[0]}
        lines.append(f"{kernel:32} {len(reports):8d} {top['regs']:5d} {top['stack']:6d} {top['spill_stores']:8d} "
                     f"{top['spill_loads']:8d} {top['sass']:6d}")
    return lines


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
    slow_first = sorted(specs, key=lambda ks: ks[0] not in slow)
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
    failures, shown, measured = [], set(), []
    for kernel, spec, error, seconds, report in results:
        figures = f" {describe_resources(report)}" if report else ""
        if report:
            measured.append((kernel, report))
        if error is None:
            print(f"ok {kernel} {describe(spec)}{figures} ({seconds:.1f}s)", flush=True)
            continue
        failures.append((kernel, spec, error[0]))
        print(f"FAILED {kernel} {describe(spec)}{figures}: {error[0]}", flush=True)
        # The full traceback once per distinct error, not once per variant it breaks.
        if error[1] and (kernel, error[0]) not in shown:
            shown.add((kernel, error[0]))
            print(error[1], flush=True)
    if pool is not None:
        pool.close()
        pool.join()
    cache.cleanup()

    kernels = sorted({kernel for kernel, _ in specs})
    if measured:
        print("\n".join(resource_table(measured)))
    print(
        f"compiled {len(specs) - len(failures)} of {len(specs)} variants of {len(kernels)} kernels "
        f"for sm_{args.arch} in {time.perf_counter() - start:.1f}s"
    )
    for kernel, spec, error in failures:
        print(f"FAILED {kernel} {describe(spec)}: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
