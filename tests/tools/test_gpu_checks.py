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
import signal
import subprocess
import sys
import tarfile
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


def test_plan_fits_nine_minutes():
    proc = subprocess.run(["bash", "scripts/gpu_checks.sh", "--plan"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = gpu_checks.steps(Path("/nonexistent"))
    for step in plan:
        assert step.name in proc.stdout and step.budget_s > 0 and step.why
    total = gpu_checks.total_budget(plan)
    assert total == gpu_checks.ENV_BUDGET_S + sum(s.budget_s for s in plan)
    assert total <= 9 * 60  # the GPU machine's limit per command is 10 minutes
    printed = re.search(r"^total\s+(\d+) s", proc.stdout, re.M)
    assert printed and int(printed.group(1)) == total, proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop on a machine without a GPU")
@pytest.mark.parametrize("how", ["argument", "env", "relative"])
def test_without_gpu_stops_quickly_with_a_summary(tmp_path, how):
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path), "TOME_PYTHON": sys.executable}
    args = ["bash", str(Path(ROOT) / "scripts" / "gpu_checks.sh")]
    if how == "argument":
        args.append(str(out))
    elif how == "relative":
        args.append("out")  # from the caller's folder, not the repository's
    else:
        env["OUT"] = str(out)
    start = time.monotonic()
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert proc.returncode == 2, proc.stdout + proc.stderr
    summary = (out / "summary.md").read_text()
    assert "not run" in summary and "No GPU" in summary and torch.__version__ in summary
    env_txt = (out / "env.txt").read_text()
    assert f"torch: {torch.__version__}" in env_txt and "gpu: False" in env_txt
    assert sorted(p.name for p in out.iterdir()) == ["env.txt", "summary.md"]


def test_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as stop:
        gpu_checks.main([str(tmp_path / "file")])
    assert stop.value.code == 2 and "is a file" in capsys.readouterr().err


def test_environment_facts_fit_their_budget_and_odd_bytes(tmp_path, monkeypatch):
    """The version commands run beside the probe, so a hung tool costs ENV_BUDGET_S once, not
    once per tool; output that is not UTF-8 is kept, replaced, rather than ending the run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvcc").write_text("#!/bin/sh\nprintf 'nvcc \\377 odd\\n'\n")
    for hung in ("nvidia-smi", "ninja", "compute-sanitizer"):
        (bin_dir / hung).write_text("#!/bin/sh\nexec sleep 30\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(gpu_checks, "ENV_BUDGET_S", 2)
    monkeypatch.setattr(gpu_checks, "probe", lambda env: (time.sleep(2), {"gpu": False})[1])
    start = time.monotonic()
    facts, versions = gpu_checks.probe_and_versions(dict(os.environ))
    assert time.monotonic() - start < 3.5
    assert "nvcc \ufffd odd" in versions[1] and "timed out after 2 s" in versions[0]


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
    not_runnable = tmp_path / "not_runnable.sh"
    not_runnable.write_text("echo hi\n")
    plan = [
        _step("fails", "import sys; print('boom'); sys.exit(3)"),
        # Runs past its budget, with a child of its own: both must be stopped.
        _step("slow", f"""
            import subprocess, sys, time
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3); open({str(marker)!r}, 'w')"])
            time.sleep(60)
        """, budget=1),
        # Passes, leaving a child behind that would run on into the next steps.
        _step("leaves_a_child", f"""
            import subprocess, sys
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3); open({str(marker) + '2'!r}, 'w')"])
        """),
        gpu_checks.Step("not_runnable", 5, "test", [str(not_runnable)]),  # there, but not executable
        _step("benchmarks", "print('device: test | torch x'); print('row 1')"),
    ]
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    start = time.monotonic()
    gpu_checks.run_plan(plan, out, env)
    assert time.monotonic() - start < 20
    assert [(s.status, s.rc) for s in plan] == [("failed", 3), ("timed out", None), ("passed", 0), ("failed", None),
                                                 ("passed", 0)]
    assert "boom" in (out / "fails.log").read_text()
    assert "PermissionError" in (out / "not_runnable.log").read_text()
    time.sleep(4)
    assert not marker.exists(), "the timed-out step's child outlived it"
    assert not Path(str(marker) + "2").exists(), "the passing step's child outlived it"
    steps_json = json.loads((out / "steps.json").read_text())
    assert [s["status"] for s in steps_json] == ["failed", "timed out", "passed", "failed", "passed"]


def test_timed_out_tests_still_write_junit(tmp_path):
    """pytest gets SIGINT grace_s before its budget ends: the JUnit XML of the tests so far is written."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_ok():\n    pass\n\n"
                                           "def test_hangs():\n    time.sleep(60)\n")
    step = gpu_checks.Step("tests", 15, "test", [sys.executable, "-m", "pytest", str(tmp_path / "test_slow.py"), "-q",
                                                 "-p", "no:cacheprovider", f"--junitxml={tmp_path / 'junit.xml'}"],
                           grace_s=10)
    start = time.monotonic()
    # As when the run is started with "&" by a shell: SIGINT ignored, which children inherit.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        gpu_checks.run_step(step, tmp_path, dict(os.environ))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 16
    assert step.status == "timed out"
    counts = gpu_checks.junit_counts(tmp_path / "junit.xml")
    assert counts is not None and counts["passed"] == 1, (tmp_path / "tests.log").read_text()


def test_stopped_run_kills_the_step_and_still_summarizes(tmp_path):
    """SIGTERM to the run (a time limit around it): the running step's process group, which
    the signal misses, is killed, and summary.md and steps.json are written."""
    marker = tmp_path / "child_alive"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import importlib.util, sys
        runner, out, marker = sys.argv[1:]
        spec = importlib.util.spec_from_file_location("g", runner)
        g = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(g)
        child = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                 "'import pathlib, sys, time; time.sleep(4); pathlib.Path(sys.argv[1]).touch()', sys.argv[1]]); "
                 "time.sleep(60)")
        g.probe = lambda env: {"gpu": True, "device": "stand-in"}
        g.steps = lambda out: [g.Step("prepare", 60, "t", [sys.executable, "-c", child, marker]),
                               g.Step("tests", 60, "t", [sys.executable, "-c", "pass"])]
        sys.exit(g.main([out]))
    """))
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    proc = subprocess.Popen([sys.executable, str(driver), str(Path(ROOT) / "scripts" / "gpu_checks.py"),
                             str(tmp_path / "out"), str(marker)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "out" / "prepare.log").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # the step's child started
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1, stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "The run broke off" in summary and "| prepare | stopped |" in summary and "| tests | not run |" in summary
    assert [s["status"] for s in json.loads((tmp_path / "out" / "steps.json").read_text())] == ["stopped", "not run"]
    time.sleep(5)
    assert not marker.exists(), "the stopped step's child outlived the run"


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

    # A long benchmark table (the real one is about 90 rows of 130 characters) leaves room for the others.
    _junit(tmp_path / "junit.xml", 0)
    (tmp_path / "benchmarks.log").write_text("device: H200\n" + f"{'row':<130}\n" * 100)
    (tmp_path / "benchmarks_compiled.log").write_text("device: H200\ncompiled row\n")
    (tmp_path / "e2e.log").write_text("device: H200\ne2e row\n")
    text = gpu_checks.summarize(tmp_path, plan, {"device": "H200"}, [])
    assert len(text.encode()) <= gpu_checks.SUMMARY_LIMIT
    assert "## benchmarks\n" in text and "compiled row" in text and "e2e row" in text and "cut to fit" in text
    assert text.count("```") == 6  # each table's code block closed, the cut one too

    # What is not cut to fit before the end: crash-probe lines, a long output folder, bytes that are not UTF-8.
    (tmp_path / "crash_probe.log").write_bytes(b"".join(b"case %d: crashed: signal 11; \xff" % i + b"x" * 600 + b"\n"
                                                        for i in range(40)))
    (tmp_path / "sanitizer.log").write_text("ERROR SUMMARY: " + "y" * 20000 + "\n")
    text = gpu_checks.summarize(tmp_path, plan, {"device": "H200"}, ["z" * 9000])
    assert len(text.encode()) <= gpu_checks.SUMMARY_LIMIT and "cut to fit 8 KB" in text


def test_summary_without_logs_or_with_an_unreadable_junit(tmp_path, monkeypatch):
    _junit(tmp_path / "junit.xml", 1)

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(gpu_checks.ET, "parse", unreadable)
    plan = gpu_checks.steps(tmp_path)
    for s in plan:
        s.status, s.rc = "failed", 1
    text = gpu_checks.summarize(tmp_path, plan, {"device": "H200"}, [])  # no log at all
    assert "Sanitizer: failed: no ERROR SUMMARY line" in text and "| tests | failed | 1 |" in text


def test_main_with_a_gpu_runs_every_step(tmp_path, monkeypatch):
    """The whole run with the probe saying there is a GPU and three stand-in steps."""
    monkeypatch.setattr(gpu_checks, "probe", lambda env: {"gpu": True, "device": "stand-in", "torch": "x"})
    monkeypatch.setattr(gpu_checks, "steps", lambda out: [_step("prepare", "print(1)"),
                                                          _step("tests", "raise SystemExit(1)"),
                                                          _step("e2e", "print('device: d'); print('table')")])
    monkeypatch.setattr(gpu_checks, "write_env", lambda out, facts, versions: (out / "env.txt").write_text("x"))
    # A given TRITON_CACHE_DIR that holds kernels already: they are not counted as this run's.
    (tmp_path / "triton" / "k").mkdir(parents=True)
    (tmp_path / "triton" / "k" / "k.json").write_text("{}")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.json").write_text("{}")  # the user's: stays
    _junit(out / "junit.xml", 1)  # an earlier run's: not this run's counts
    assert gpu_checks.main([str(out)]) == 1
    summary = (out / "summary.md").read_text()
    assert "| prepare | passed |" in summary and "| tests | failed | 1 |" in summary
    assert "| e2e | passed |" in summary and "table" in summary
    assert "Triton kernels compiled: 0 by the warm-up, 0 more during the tests." in summary
    assert "test_x" not in summary and not (out / "junit.xml").exists()
    # The GPU machine gives back at most 8 files: the logs are packed.
    assert sorted(p.name for p in out.iterdir()) == ["env.txt", "logs.tar.gz", "mine.json", "steps.json",
                                                     "summary.md"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["e2e.log", "prepare.log", "tests.log"]


def test_logs_are_packed_with_their_ends_and_the_results(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_checks, "LOG_KEEP", 100)
    plan = [_step("benchmarks", "")]
    (tmp_path / "benchmarks.log").write_text("start\n" + "x" * 1000 + "\nthe end\n")
    (tmp_path / "cpu_h200_1.json").write_text("{}")
    (tmp_path / "summary.md").write_text("s")
    gpu_checks.pack_logs(tmp_path, plan, before=set())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "summary.md"]
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["benchmarks.log", "cpu_h200_1.json"]
        log = tar.extractfile("benchmarks.log").read()
    assert len(log) == 100 and log.endswith(b"the end\n")


def test_a_summary_that_fails_is_still_written(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_checks, "probe", lambda env: {"gpu": True, "device": "stand-in"})
    monkeypatch.setattr(gpu_checks, "steps", lambda out: [_step("prepare", "print(1)")])
    monkeypatch.setattr(gpu_checks, "write_env", lambda out, facts, versions: None)
    monkeypatch.setattr(gpu_checks, "summarize", lambda *args: 1 / 0)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert gpu_checks.main([str(tmp_path / "out")]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "could not be made: ZeroDivisionError" in summary and "- prepare: passed (exit 0" in summary


def test_warm_up_cases_and_cache_count(tmp_path):
    from benchmarks.providers import applies
    from benchmarks.shapes import GPU_SHAPES
    from benchmarks.warm_triton import cached_kernels, cases

    labels = [label for label, _ in cases()]
    assert len(labels) == len(set(labels))
    for shape in GPU_SHAPES:
        assert any(f"step {shape.name} " in label for label in labels)
    # Each step case is one benchmarks.run would time (make_step refuses the forced Triton
    # paths on the other methods' shapes).
    for label, args in cases():
        if args[0] == "step":
            shape = next(s for s in GPU_SHAPES if s.name == args[1])
            assert applies(args[4], shape), label
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
    # The runner counts the same way without importing torch.
    assert gpu_checks.cached_kernels(tmp_path / "cache") == 1 and gpu_checks.cached_kernels(tmp_path / "none") == 0


def _crashing_worker(case):  # for the warm-up's pool: the case "crash" kills its process as a segfault would
    if case[0] == "crash":
        os._exit(139)
    return case[0], 0.0, None


def test_warm_up_survives_a_crashed_worker(capsys):
    """A worker that dies fails the cases not done, at once (multiprocessing.Pool would wait forever)."""
    from benchmarks.warm_triton import run_cases

    todo = [("ok 1", ()), ("crash", ()), ("ok 2", ())]
    start = time.monotonic()
    failed = run_cases(todo, 1, worker=_crashing_worker)
    assert time.monotonic() - start < 60
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and failed == 2  # one worker: "ok 1" ran before the crash, "ok 2" never ran
    assert any(line.startswith("ok") and line.endswith("ok 1") for line in lines)
    assert any(line.startswith("FAIL") and "crash" in line and "died" in line for line in lines)


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
    # Not run, because CUDA cannot start: a CPU torch says it has no CUDA, a CUDA torch on a
    # machine without a GPU that it finds no driver.
    cannot_start = ("not run: AssertionError: Torch not compiled with CUDA",
                    "not run: RuntimeError: Found no NVIDIA driver")
    assert len(lines) == 4 and all(any(c in x for c in cannot_start) for x in lines[1:]), lines


def test_crash_probe_cases_share_one_deadline():
    """A hung case is reported at the deadline and the others keep their lines; the step's
    --timeout leaves the crash_probe step time to print them."""
    from tests.backends import error_crash_probe

    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    start = time.monotonic()
    verdicts = [error_crash_probe._verdict(p, start + 1, 1) for p in procs]
    assert time.monotonic() - start < 3 and verdicts == ["crashed: hung past 1 s"] * 3
    step = next(s for s in gpu_checks.steps(Path("/nonexistent")) if s.name == "crash_probe")
    assert float(step.command[step.command.index("--timeout") + 1]) <= step.budget_s - 2


def test_prop_attn_step_stops_starting_rows_inside_its_budget():
    """The proportional-attention step starts no row past --deadline-s, which leaves its budget
    room for the Python start before it and the last row after it; its table is in the summary."""
    step = next(s for s in gpu_checks.steps(Path("/nonexistent")) if s.name == "prop_attn")
    assert step.command[1:3] == ["-m", "benchmarks.prop_attn"]
    deadline = float(step.command[step.command.index("--deadline-s") + 1])
    assert 0 < deadline <= step.budget_s - 5


def test_prop_attn_benchmark_saves_rows_and_skips_past_its_deadline(tmp_path, capsys):
    """benchmarks.prop_attn on a tiny CPU case (no FlexAttention: its compile takes tens of
    seconds here; tests/patch/test_prop_attention.py covers that path): every row saved with
    its raw times, and the rows after the deadline recorded as skipped, not dropped."""
    from benchmarks import prop_attn

    args = ["--device", "cpu", "--batch", "1", "--tokens", "5", "3", "--dtypes", "float32", "--providers", "sdpa",
            "sdpa_bias", "--reps", "2", "--min-seconds", "0", "--retries", "0", "--out", str(tmp_path)]
    results = prop_attn.main(args)
    saved = json.loads(next(tmp_path.glob("prop_attn_cpu_*.json")).read_text())
    assert saved["complete"] and [r["tokens"] for r in saved["rows"]] == [5, 3]
    for row in saved["rows"]:
        for name in ("sdpa", "sdpa_bias"):
            p = row["providers"][name]
            assert p["status"] == "ok" and len(p["times_s"]) >= 2 and p["max_abs_err"] >= 0
    assert "| float32 | 5 |" in capsys.readouterr().out
    assert results["settings"]["choice"]["cpu"]["implementation"] in ("bias", "flex")

    late = prop_attn.main(args[:-2] + ["--deadline-s", "0", "--no-save"])
    assert [r["status"] for r in late["rows"]] == ["ok", "skipped"]  # the first row starts at 0 s


@pytest.mark.parametrize("step, row", [("prop_attn", "| float16 | 197 |"), ("e2e_hf", "| clip_b16_224 | 256 |"),
                                       ("e2e_dit", "| sd3 | 4 | kv | 0.5 |")])
def test_summary_shows_the_newer_benchmark_tables(tmp_path, step, row):
    plan = gpu_checks.steps(tmp_path)
    for s in plan:
        s.status, s.rc, s.seconds = "passed", 0, 1.0
    (tmp_path / f"{step}.log").write_text(f"[1/12] progress\ndevice: H200 | torch 2.11\n{row}\n")
    text = gpu_checks.summarize(tmp_path, plan, {"device": "H200"}, [])
    assert f"## {step}" in text and row in text


def test_e2e_steps_split_the_models_by_library():
    """The timm ViTs and the transformers encoders each run in a step of their own, together every
    model of benchmarks.e2e_vit once; the transformers step starts no row past its deadline."""
    from benchmarks import e2e_vit

    plan = {s.name: s for s in gpu_checks.steps(Path("/nonexistent"))}

    def models(step):
        args = step.command[step.command.index("--models") + 1:]
        return args[:next((i for i, a in enumerate(args) if a.startswith("--")), len(args))]

    timm, hf = models(plan["e2e"]), models(plan["e2e_hf"])
    assert sorted(timm + hf) == sorted(e2e_vit.MODELS)
    assert all(hasattr(e2e_vit.MODELS[m], "timm_name") for m in timm)
    assert all(hasattr(e2e_vit.MODELS[m], "hf_class") for m in hf)
    step = plan["e2e_hf"]
    assert step.command[1:3] == ["-m", "benchmarks.e2e_vit"]
    deadline = float(step.command[step.command.index("--deadline-s") + 1])
    assert 0 < deadline <= step.budget_s - 5


def test_e2e_dit_step_runs_both_models_inside_its_budget():
    """The diffusion transformers' step runs every model of benchmarks.e2e_dit, in a half-precision dtype,
    and starts no row past its deadline."""
    from benchmarks import e2e_dit

    step = next(s for s in gpu_checks.steps(Path("/nonexistent")) if s.name == "e2e_dit")
    assert step.command[1:3] == ["-m", "benchmarks.e2e_dit"]
    args = e2e_dit.parse_args(step.command[3:])
    assert sorted(args.models) == sorted(e2e_dit.MODELS) and args.dtype in ("bfloat16", "float16")
    assert {"merge", "kv"} <= set(args.schemes) and not args.tiny
    assert 0 < args.deadline_s <= step.budget_s - 5
