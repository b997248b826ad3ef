"""The prepared GPU run (scripts/gpu_checks.py) and its Triton warm-up, checked without a GPU.

The run itself needs a GPU; what is checked here is its plumbing: the budget, the early stop
without a GPU, steps that fail or run past their budget, the summary, and which test files
it runs.
"""

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT


def _load_runner():
    spec = importlib.util.spec_from_file_location("gpu_checks", Path(ROOT) / "scripts" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_checks = _load_runner()


def test_plan_fits_eight_minutes():
    proc = subprocess.run(["bash", "scripts/gpu_checks.sh", "--plan"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = gpu_checks.steps(Path("/nonexistent"))
    for step in plan:
        assert step.name in proc.stdout and step.budget_s > 0 and step.why
    total = gpu_checks.total_budget(plan)
    assert total == gpu_checks.ENV_BUDGET_S + sum(s.budget_s for s in plan)
    assert total <= 8 * 60
    printed = re.search(r"^total\s+(\d+) s", proc.stdout, re.M)
    assert printed and int(printed.group(1)) == total, proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop on a machine without a GPU")
@pytest.mark.parametrize("how", ["argument", "env"])
def test_without_gpu_stops_quickly_with_a_summary(tmp_path, how):
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path), "TOME_PYTHON": sys.executable}
    args = ["bash", "scripts/gpu_checks.sh"]
    if how == "argument":
        args.append(str(out))
    else:
        env["OUT"] = str(out)
    start = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert proc.returncode == 2, proc.stdout + proc.stderr
    summary = (out / "summary.md").read_text()
    assert "not run" in summary and "No GPU" in summary and torch.__version__ in summary
    env_txt = (out / "env.txt").read_text()
    assert f"torch: {torch.__version__}" in env_txt and "gpu: False" in env_txt
    assert sorted(p.name for p in out.iterdir()) == ["env.txt", "summary.md"]


def test_every_test_file_is_placed():
    """A new test file must be put in GPU_TESTS or CPU_ONLY, so that the GPU run neither
    misses device tests nor spends its minutes on what CI runs anyway."""
    files = sorted(str(p.relative_to(ROOT)) for p in Path(ROOT).glob("tests/**/test_*.py"))
    files.append("benchmarks/test_merge_benchmarks.py")
    listed = gpu_checks.GPU_TESTS + gpu_checks.CPU_ONLY
    for entry in listed:
        assert (Path(ROOT) / entry).exists(), f"{entry} is listed but does not exist"
    assert not set(gpu_checks.GPU_TESTS) & set(gpu_checks.CPU_ONLY)
    unplaced = [f for f in files if not any(f == e or (e.endswith("/") and f.startswith(e)) for e in listed)]
    assert not unplaced, f"put these in GPU_TESTS or CPU_ONLY of scripts/gpu_checks.py: {unplaced}"
    # A file that asks for the GPU (a test or fixture taking the `device` fixture, or the
    # GPU-only marks of tests.helpers) belongs to the GPU run.
    for f in files:
        tree = ast.parse((Path(ROOT) / f).read_text())
        takes_device = any(isinstance(node, ast.FunctionDef) and "device" in [a.arg for a in node.args.args]
                           for node in ast.walk(tree))
        gpu_marks = any(isinstance(node, ast.ImportFrom) and node.module == "tests.helpers"
                        and {"GPU_ONLY", "ON_GPU"} & {alias.name for alias in node.names} for node in ast.walk(tree))
        if takes_device or gpu_marks:
            assert f in gpu_checks.GPU_TESTS, f"{f} uses the device fixture or the GPU marks"


def _step(name, code, budget=30):
    return gpu_checks.Step(name, budget, "test", [sys.executable, "-c", textwrap.dedent(code)])


def test_steps_run_on_after_failure_and_timeout(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "child_alive"
    plan = [
        _step("fails", "import sys; print('boom'); sys.exit(3)"),
        # Runs past its budget, with a child of its own: both must be stopped.
        _step("slow", f"""
            import subprocess, sys, time
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3); open({str(marker)!r}, 'w')"])
            time.sleep(60)
        """, budget=1),
        _step("benchmarks", "print('device: test | torch x'); print('row 1')"),
    ]
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    start = time.monotonic()
    gpu_checks.run_plan(plan, out, env)
    assert time.monotonic() - start < 20
    assert [(s.status, s.rc) for s in plan] == [("failed", 3), ("timed out", None), ("passed", 0)]
    assert "boom" in (out / "fails.log").read_text()
    time.sleep(4)
    assert not marker.exists(), "the timed-out step's child outlived it"
    steps_json = json.loads((out / "steps.json").read_text())
    assert [s["status"] for s in steps_json] == ["failed", "timed out", "passed"]


def test_missing_tool_is_a_skip_not_a_failure(tmp_path):
    step = gpu_checks.Step("sanitizer", 5, "test", ["no-such-tool-here", "--version"])
    gpu_checks.run_step(step, tmp_path, {})
    assert step.status == "skipped"
    assert "not run" in gpu_checks.sanitizer_verdict(tmp_path, step)


def _junit(path, failures):
    cases = "".join(
        f'<testcase classname="tests.backends.test_x" name="test_{i}"><failure message="AssertionError: bad {i}&#10;'
        f'more">trace</failure></testcase>' for i in range(failures))
    cases += '<testcase classname="tests.a" name="ok"/><testcase classname="tests.a" name="s"><skipped/></testcase>'
    cases += '<testcase classname="tests.a" name="e"><error message="worker crashed"/></testcase>'
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite>{cases}</testsuite></testsuites>')


def test_summary_names_failures_and_fits_8_kb(tmp_path):
    _junit(tmp_path / "junit.xml", 2)
    (tmp_path / "sanitizer.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    (tmp_path / "benchmarks.log").write_text("progress\ndevice: H200 | torch 2.11\nshape  provider  ms\n")
    plan = gpu_checks.steps(tmp_path)
    for s in plan:
        s.status, s.rc, s.seconds = "passed", 0, 1.0
    plan[1].status, plan[1].rc = "failed", 1
    text = gpu_checks.summarize(tmp_path, plan, {"device": "H200"}, [])
    assert "| tests | failed | 1 |" in text and "| 1 / 3 / 1 |" in text
    assert "`tests.backends.test_x::test_0`: AssertionError: bad 0" in text and "more" not in text
    assert "`tests.a::e`: worker crashed" in text
    assert "Sanitizer: passed: ========= ERROR SUMMARY: 0 errors" in text
    assert "shape  provider  ms" in text

    _junit(tmp_path / "junit.xml", 1000)
    (tmp_path / "benchmarks.log").write_text("device: H200\n" + "row\n" * 5000)
    text = gpu_checks.summarize(tmp_path, plan, {"device": "H200"}, [])
    assert len(text.encode()) <= gpu_checks.SUMMARY_LIMIT
    assert "| 1 / 1001 / 1 |" in text and "cut to fit 8 KB" in text


def test_main_with_a_gpu_runs_every_step(tmp_path, monkeypatch):
    """The whole run with the probe saying there is a GPU and three stand-in steps."""
    monkeypatch.setattr(gpu_checks, "probe", lambda env: {"gpu": True, "device": "stand-in", "torch": "x"})
    monkeypatch.setattr(gpu_checks, "steps", lambda out: [_step("prepare", "print(1)"),
                                                          _step("tests", "raise SystemExit(1)"),
                                                          _step("e2e", "print('device: d'); print('table')")])
    monkeypatch.setattr(gpu_checks, "write_env", lambda out, facts, env: (out / "env.txt").write_text("x"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert gpu_checks.main([str(tmp_path / "out")]) == 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| prepare | passed |" in summary and "| tests | failed | 1 |" in summary
    assert "| e2e | passed |" in summary and "table" in summary
    assert "Triton kernels compiled: 0 by the warm-up, 0 more during the tests." in summary


def test_warm_up_cases_and_cache_count(tmp_path):
    from benchmarks.shapes import GPU_SHAPES
    from benchmarks.warm_triton import cached_kernels, cases

    labels = [label for label, _ in cases()]
    assert len(labels) == len(set(labels))
    for shape in GPU_SHAPES:
        assert any(f"step {shape.name} " in label for label in labels)
    assert sum(label.startswith("exercise") for label in labels) == 6

    # The count reads Triton's cache layout: one kernel compiled (no GPU needed) is one.
    kernel = tmp_path / "k.py"
    kernel.write_text(textwrap.dedent("""
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        @triton.jit
        def copy(x_ptr, n, B: tl.constexpr):
            o = tl.arange(0, B)
            tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n), mask=o < n)

        triton.compile(ASTSource(copy, {"x_ptr": "*fp32", "n": "i32", "B": "constexpr"}, {"B": 16}),
                       target=GPUTarget("cuda", 90, 32))
    """))
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    subprocess.run([sys.executable, str(kernel)], env=env, check=True, timeout=120, capture_output=True)
    assert cached_kernels(tmp_path / "cache") == 1
    assert cached_kernels(tmp_path / "none") == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_warm_up_without_gpu_says_so():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.warm_triton"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no GPU" in proc.stderr


@pytest.mark.parametrize("n, heads, d, channels, dtype", [(197, 12, 64, 96, "float16"), (5, 2, 4, 3, "bfloat16")])
def test_exercise_runs_every_operator_on_the_reference(n, heads, d, channels, dtype):
    from benchmarks.warm_triton import EXERCISE_SHAPES, exercise

    assert (n, heads, d, channels, dtype) in EXERCISE_SHAPES
    exercise("reference", n, heads, d, channels, getattr(torch, dtype), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answers on a machine without a GPU")
def test_crash_probe_runs_each_case_apart(capsys):
    from tests.backends import error_crash_probe
    from tome_kernels.backends.native import extension_build

    extension_build.load("cpu")  # built once here (cached); a build failure fails the test

    assert error_crash_probe.main() == 2  # the cases that need a GPU cannot be set up here
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "case 1 the cpu extension's error: raised RuntimeError"
    assert len(lines) == 4 and all("not run: AssertionError: Torch not compiled with CUDA" in x for x in lines[1:])
