"""Every Triton kernel compiles for Hopper (sm_90), no GPU needed.

The rest of the suite runs the kernels in Triton's interpreter, which never lowers them and
so misses compiler errors; this runs ``compile_check`` in a subprocess without
``TRITON_INTERPRET`` (conftest sets it for this process, and the interpreter's @triton.jit
functions cannot be compiled).
"""

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.compile


def test_every_kernel_variant_compiles_for_sm90(capsys):
    pytest.importorskip("triton")
    from tome_kernels.backends.triton.compile_check import KERNELS, all_specs

    # Neither the interpreter nor the escape hatch that would let a non-constexpr global pass.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "tome_kernels.backends.triton.compile_check", "--arch", "90"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    # The summary and the failures are at the end of the output.
    report = proc.stdout[-20000:] + proc.stderr[-5000:]
    # Registers and spills of every variant, in the log of every run (pytest would keep a
    # passing test's output to itself).
    with capsys.disabled():
        print("\n" + "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("Traceback")))
    assert proc.returncode == 0, report

    summary = re.search(r"^compiled (\d+) of (\d+) variants of (\d+) kernels", proc.stdout, re.M)
    assert summary, report
    compiled, total, kernels = map(int, summary.groups())
    assert compiled == total == len(all_specs()), report
    ok_kernels = re.findall(r"^ok (\w+) ", proc.stdout, re.M)
    assert len(ok_kernels) == total, report
    figures = re.findall(r"^ok \w+ .* regs=\d+ stack=\d+ spill_stores=\d+ spill_loads=\d+ sass=\d+ ", proc.stdout, re.M)
    assert len(figures) == total, report
    assert set(ok_kernels) == set(KERNELS) and kernels == len(KERNELS), report


def test_the_check_names_every_kernel():
    """A kernel added to a module of backends/triton without an entry in compile_check's
    table would never be compiled: every public ``*_kernel`` of those modules is listed."""
    triton = pytest.importorskip("triton")
    import importlib
    import pkgutil

    from tome_kernels.backends import triton as triton_package
    from tome_kernels.backends.triton.compile_check import KERNELS

    found = {}
    for module_info in pkgutil.iter_modules(triton_package.__path__):
        module = importlib.import_module(f"tome_kernels.backends.triton.{module_info.name}")
        for name, value in vars(module).items():
            # Kernels defined in this module, not helpers or kernels imported from another.
            if name.endswith("_kernel") and isinstance(value, triton.runtime.jit.KernelInterface) \
                    and value.fn.__module__ == module.__name__:
                found[name] = module_info.name
    assert found == {name: entry["module"] for name, entry in KERNELS.items()}


def test_the_check_finds_approximate_arithmetic():
    """The PTX scan behind the check's IEEE rule, on lines as Triton's PTX writes them."""
    pytest.importorskip("triton")
    from tome_kernels.backends.triton.compile_check import approximate_ops

    approximate = "\n".join(["\tsqrt.approx.ftz.f32 \t%r5, %r4;", "\tdiv.full.f32 \t%r7, %r6, %r5;",
                             "\trcp.approx.ftz.f64 \t%fd1, %fd2;"])
    assert approximate_ops(approximate) == ["sqrt.approx", "div.full", "rcp.approx"]
    # Round-to-nearest forms, integer division and exp's ex2.approx are allowed.
    ieee = "\n".join(["\tsqrt.rn.f32 \t%r5, %r4;", "\tdiv.rn.f32 \t%r7, %r6, %r5;", "\tdiv.s32 \t%r8, %r9, 64;",
                      "\tex2.approx.f32 \t%r1, %r2;"])
    assert approximate_ops(ieee) == []
