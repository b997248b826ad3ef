"""The prepared GPU run: every check that needs a GPU, in one command that fits 9 minutes on an H200.

    python scripts/gpu_checks.py [OUT] [--plan]        (or: bash scripts/gpu_checks.sh ...)

A GPU is lent now and then for minutes, and only what a run writes into its output folder
comes back (with the end of what it printed). So this runs a fixed list of steps, each with
its own time limit (``budget_s``; a step past it is stopped and recorded as timed out), and
a failing step never stops the ones after it. Everything goes into the output folder
(``OUT``: the first argument, else the environment variable, else a new
``benchmarks/results/gpu_<UTC time>/``):

    env.txt          GPU, driver, Python, torch, triton, nvcc, ninja, CUDA_HOME, sanitizer
    steps.json       each step's command, exit code, status and seconds
    junit.xml        the tests, one entry per test (pytest --junitxml)
    summary.md       per step: status, counts and time; every failing test with its reason;
                     the sanitizer's verdict; the benchmark tables (at most 8 KB, also printed)
    logs.tar.gz      each step's output, <step>.log (stdout and stderr, its last MiB; the
                     sanitizer's is sanitizer.log), and the JSON of the merge-step benchmarks
                     and the end-to-end ViT: packed at the end, since the GPU machine gives
                     back at most 8 files (16 MiB each) from its output folder

A step past its budget is stopped with SIGKILL, its whole process group; the tests get
SIGINT ``grace_s`` before that, so that pytest still writes its JUnit XML and summary. When
the run itself is stopped (SIGTERM, Ctrl-C), the running step's processes are killed and the
summary is still written.

Without a GPU (``torch.cuda.is_available()`` false, or no torch) it writes ``env.txt`` and a
``summary.md`` saying so within ``ENV_BUDGET_S`` seconds and exits with status 2 (as it does
for a bad argument). ``--plan`` prints the steps and their budgets. The exit status is 0
when every step passed, 1 otherwise.

Only the standard library is imported here: the steps run in their own processes, under the
Python that runs this file (on the GPU machine, the image's ``python3``).
"""

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file (python scripts/gpu_checks.py): the repository's modules
from benchmarks.warm_triton import cached_kernels  # noqa: E402  (standard library only until it runs a case)

PY = sys.executable
SUMMARY_LIMIT = 8 * 1024
ARCHIVE = "logs.tar.gz"
# What stays beside the archive. The GPU machine gives back at most 8 files from the output
# folder, and a run writes about 15 (a log per step, three benchmark JSONs).
PLAIN = ("summary.md", "env.txt", "steps.json", "junit.xml", ARCHIVE)
# Of each file in the archive, its end: the archive must come back whole (16 MiB a file), and
# the end of a huge log is the part that says how it ended.
LOG_KEEP = 1024 * 1024
JOBS = os.cpu_count() or 1

# The tests that put tensors on the GPU (the ``device`` fixture, or "cuda" directly) when
# TOME_TEST_DEVICE=cuda. The other test files run the same on any machine (builds, compile
# checks, the CPU extension, lint, model patches on CPU tensors) and CI runs them already;
# tests/tools/test_gpu_checks.py checks that every test file is in this list or in CPU_ONLY.
GPU_TESTS = [
    "tests/backends/test_compile_first_use.py",
    "tests/backends/test_dispatch.py",
    "tests/backends/test_fast_backends.py",
    "tests/backends/test_gpu_backends.py",
    "tests/backends/test_gpu_methods.py",
    "tests/backends/test_methods.py",
    "tests/backends/test_op_table.py",
    "tests/contract/test_ambient_modes.py",
    "tests/contract/test_bad_input.py",
    "tests/contract/test_handwritten.py",
    "tests/contract/test_pitome_authors.py",
    "tests/contract/test_shapes_dtypes_grad.py",
    "tests/tools/test_benchmark_harness.py",
    "tests/tools/test_e2e_benchmark.py",
    "benchmarks/test_merge_benchmarks.py",
]
CPU_ONLY = [
    "tests/backends/test_cpu_backend.py",
    "tests/backends/test_native_methods.py",
    "tests/builds/",
    "tests/contract/test_compiled_plans.py",
    "tests/contract/test_edge_values.py",
    "tests/contract/test_methods_oracle.py",
    "tests/contract/test_properties.py",
    "tests/patch/",
    "tests/tools/test_bench_flags.py",
    "tests/tools/test_bench_minilm.py",
    "tests/tools/test_bench_plot.py",
    "tests/tools/test_e2e_dit_benchmark.py",
    "tests/tools/test_e2e_hf_benchmark.py",
    "tests/tools/test_flops.py",
    "tests/tools/test_gpu_checks.py",
    "tests/tools/test_lint.py",
    "tests/tools/test_public_api.py",
    "tests/tools/test_readme.py",
    "tests/tools/test_report.py",
    "tests/tools/test_visualize.py",
]


@dataclass
class Step:
    name: str
    budget_s: int
    why: str  # the estimate behind the budget
    command: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    background: Optional[List[str]] = None  # runs beside the command, within the same budget
    # Seconds before the budget's end at which the step gets SIGINT: pytest then writes its
    # JUnit XML and summary (a killed pytest leaves neither), and SIGKILL follows at the end.
    grace_s: int = 0
    # filled in by run_step
    rc: Optional[int] = None
    status: str = "not run"
    seconds: float = 0.0


def steps(out: Path) -> List[Step]:
    """The run, most important first. Budgets add up to 495 s: 45 s under 9 minutes (and 105 s under
    the GPU machine's 10-minute limit per command) are left for what runs outside them (Python
    start, the summary, packing the logs)."""
    pytest_args = [
        "-m", "pytest", *GPU_TESTS, "-m", "not build and not compile", "--benchmark-disable",
        "-p", "no:cacheprovider", "-q", "-rfE", f"--junitxml={out / 'junit.xml'}",
    ]
    if importlib.util.find_spec("xdist"):
        # In parallel; a crash takes one worker, not the run (xdist restarts it and reports the test).
        pytest_args += ["-n", str(JOBS)]
    if importlib.util.find_spec("pytest_timeout"):
        pytest_args += ["--timeout", "120"]  # a hung test fails alone instead of eating the step's budget
    return [
        Step("prepare", 75,
             "CUDA extension build with TORCH_CUDA_ARCH_LIST=9.0 on 16 cores: 14 s measured (2026-11-30), "
             "the CPU extension 24 s; beside it the Triton warm-up (python -m benchmarks.warm_triton --list "
             "gives its 77 cases) over 16 processes, ~1 s per compilation in the CPU machine's compile check "
             "(of its former 120 s, 30 went to prop_attn and 15 to e2e_hf: no whole run has timed this step yet)",
             [PY, "-m", "benchmarks.warm_triton", "--jobs", str(JOBS)],
             background=[PY, "-c", "from tome_kernels.backends.native import extension_build as eb; "
                                   "eb.load('cpu'); eb.load('cuda'); print('loaded', eb.loaded_from('cuda'))"]),
        Step("tests", 130,
             "382 device tests passed in 79 s with -n 16 (2026-11-30, Triton compiling as it went); "
             "these files add about 250 small contract tests on the device, and the kernels are warm",
             [PY, *pytest_args], env={"TOME_TEST_DEVICE": "cuda"}, grace_s=10),
        Step("sanitizer", 45,
             "memcheck slows kernels 10-100x, but sanitize_case runs each operator on 3 small shapes, "
             "with the kernels compiled by prepare",
             ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
              PY, "-m", "tests.backends.sanitize_case"],
             env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
        Step("benchmarks", 55,
             "12 shapes, 5 providers, 1-2 passes: about 90 rows of 100 timed calls at 0.01-5 ms, "
             "plus each row's check against the reference and its peak memory (10 s of its former 65 s went "
             "to e2e_hf: no whole run has timed this step yet)",
             [PY, "-m", "benchmarks.run", "--providers", *BENCH_PROVIDERS, "--out", str(out)]),
        Step("benchmarks_compiled", 40,
             "the reference under torch.compile: one inductor compile per row (5 rows), ~5 s each on 16 cores",
             [PY, "-m", "benchmarks.run", "--providers", "reference_compiled", "reference",
              "--shapes", *COMPILED_SHAPES, "--out", str(out)]),
        Step("e2e", 35,
             "two ViTs (B/16 at B=256, L/16-512 at B=32), 30 timed passes per provider, timm model build; "
             "each at its own r only (--sweep with no values): the r sweep would time ViT-B/16 three times more",
             [PY, "-m", "benchmarks.e2e_vit", "--models", *E2E_TIMM, "--sweep", "--out", str(out)]),
        Step("prop_attn", 30,
             "proportional attention's implementations (benchmarks/prop_attn.py): ViT-B/16 attention at B=256, "
             "N = 197, 101, 21, 577, in float16, bfloat16, float32; SDPA with and without the log(size) mask under "
             "each sdpa_kernel backend, and FlexAttention, compiled once per dtype (dynamic shapes, a few seconds "
             "each); rows not started by --deadline-s are recorded as skipped, N-major so that every dtype gets "
             "N = 197 first; decides CHOICES['cuda'] in tome_kernels/patch/prop_attention.py",
             [PY, "-m", "benchmarks.prop_attn", "--deadline-s", "22", "--reps", "20", "--out", str(out)]),
        Step("e2e_hf", 25,
             "transformers CLIP ViT-B/16 vision tower and DINOv2-S/14 with registers at B=256, r = 16: unpatched, "
             "tome_reference, each fast backend, and auto's with compiled FlexAttention (last of each model); "
             "estimated, not yet timed on a GPU: transformers import and builds on the GPU ~5 s, ~1 s per row, "
             "one FlexAttention compile (after prop_attn's, which may have cached its kernel; cold, ~10 s); rows "
             "not started by --deadline-s are recorded as skipped",
             [PY, "-m", "benchmarks.e2e_vit", "--models", *E2E_HF, "--deadline-s", "18", "--out", str(out)]),
        Step("e2e_dit", 25,
             "diffusion transformers (benchmarks/e2e_dit.py): one denoising step of SD3 (medium's width, 3 joint "
             "blocks) and Flux (width 3072, 1 double + 2 single blocks) at a 64 x 64 latent, B=4, bfloat16: "
             "unpatched, then the merge and kv schemes at ratios 0.3 and 0.5, 20 timed steps and one profiled "
             "step per row; estimated, not yet timed on a GPU: diffusers import and builds on the GPU ~8 s, ~1 s "
             "per row (10 rows); rows not started by --deadline-s are recorded as skipped; decides "
             "DEFAULT_SCHEMES in tome_kernels/patch/diffusion.py",
             [PY, "-m", "benchmarks.e2e_dit", "--models", *E2E_DIT, "--schemes", "merge", "kv", "--dtype", "bfloat16",
              "--batch", "4", "--reps", "20", "--deadline-s", "18", "--out", str(out)]),
        Step("crash_probe", 15,
             "4 fresh processes at once (import torch, load the cached cpu extension, one small Triton "
             "launch): which condition turns a C++ argument error into a crash (docs/gpu_notes.md)",
             # Its cases share a deadline inside the budget: a hung case must not take the others' lines.
             [PY, "-m", "tests.backends.error_crash_probe", "--timeout", "12"]),
    ]


# The benchmark providers on the GPU: the fast backends (Triton on its default path and forced
# onto each) and the eager reference. The compiled reference takes an inductor compile per
# row, so it gets its own step over the three shapes that stand for the rest (a ViT-B, a
# ViT-L and a diffusion row).
BENCH_PROVIDERS = ["triton", "triton_one_pass", "triton_multi_kernel", "cuda", "reference"]
COMPILED_SHAPES = ["vit_b16_224", "vit_l16_512", "diffusion"]
# benchmarks.e2e_vit's models, by library: the transformers ones in a step of their own, so that
# a transformers problem on the GPU image (it has another version than requirements/) costs the
# timm rows nothing.
E2E_TIMM = ["vit_b16_224", "vit_l16_512"]
E2E_HF = ["clip_b16_224", "dinov2_s14_reg_224"]
# benchmarks.e2e_dit's models (diffusers), in their own step.
E2E_DIT = ["sd3", "flux"]

# The environment facts: version commands, and one Python that imports torch and triton (a
# few seconds warm; a cold disk on a fresh machine can take several times that). They run
# side by side, each with this limit, so that together they take at most this long.
ENV_BUDGET_S = 20
VERSION_COMMANDS = [
    ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"],
    ["nvcc", "--version"], ["ninja", "--version"], ["compute-sanitizer", "--version"],
]


def total_budget(plan: List[Step]) -> int:
    return ENV_BUDGET_S + sum(s.budget_s for s in plan)


def print_plan(plan: List[Step]) -> None:
    w = max(len(s.name) for s in plan) + 2  # "benchmarks_compiled" is wider than the other names
    print(f"{'step':<{w}}{'budget':>8}  estimate")
    print(f"{'env':<{w}}{ENV_BUDGET_S:>6} s  version commands (nvidia-smi, nvcc, python -c)")
    for s in plan:
        print(f"{s.name:<{w}}{s.budget_s:>6} s  {s.why}")
        print(f"{'':<{w + 10}}$ {shlex.join(s.command)}")
    total = total_budget(plan)
    print(f"{'total':<{w}}{total:>6} s  ({total / 60:.1f} min; the limit is 9 min)")


# ----------------------------------------------------------------------------- running

def _command_output(cmd: List[str], timeout: float = ENV_BUDGET_S, env: Optional[Dict[str, str]] = None) -> str:
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        return f"{cmd[0]}: not found"
    try:
        # errors="replace": a tool's bytes that are not UTF-8 must not end the run before env.txt
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, env=env,
                              cwd=ROOT)
        return (proc.stdout + proc.stderr).strip() or f"(no output, exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        return f"{shlex.join(cmd)}: timed out after {timeout} s"
    except OSError as error:  # there, but not runnable
        return f"{shlex.join(cmd)}: {error}"


_PROBE = """
import json, os, sys
facts = {"python": sys.version.split()[0]}
try:
    import torch
    facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda, gpu=torch.cuda.is_available())
    if facts["gpu"]:
        facts["device"] = torch.cuda.get_device_name(0)
        facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
except Exception as error:
    facts.update(torch=f"not importable: {error}", gpu=False)
try:
    import triton
    facts["triton"] = triton.__version__
except Exception as error:
    facts["triton"] = f"not importable: {error}"
try:
    from tome_kernels.backends.native import extension_build
    # What the extension builds will use: the user's CUDA_HOME, else the toolkit nvcc reports.
    facts["cuda_home"] = extension_build.use_real_cuda_home()
    facts["toolkit_of_nvcc"] = extension_build.cuda_home_of_nvcc()
except Exception as error:
    facts["cuda_home"] = f"unknown: {type(error).__name__}: {error}"
print(json.dumps(facts))
"""


def probe(env: Dict[str, str]) -> Dict[str, object]:
    """Python-side facts, from a separate process (importing torch here would tie this
    process to one CUDA context for the whole run)."""
    try:
        # errors="replace": bytes that are not UTF-8 in a warning on stderr must not read as "no GPU"
        proc = subprocess.run([PY, "-c", _PROBE], capture_output=True, text=True, errors="replace",
                              timeout=ENV_BUDGET_S, env=env, cwd=ROOT)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as error:  # no Python facts is itself the fact to report
        return {"gpu": False, "torch": f"probe failed: {type(error).__name__}: {error}"}


def probe_and_versions(env: Dict[str, str]) -> Tuple[Dict[str, object], List[str]]:
    """The probe's facts and each version command's output, all run at once: one after the
    other, their time limits would add up to several times ENV_BUDGET_S."""
    with ThreadPoolExecutor(len(VERSION_COMMANDS)) as pool:
        outputs = [pool.submit(_command_output, cmd, ENV_BUDGET_S, env) for cmd in VERSION_COMMANDS]
        facts = probe(env)
        return facts, [f"$ {shlex.join(cmd)}\n{o.result()}" for cmd, o in zip(VERSION_COMMANDS, outputs)]


def write_env(out: Path, facts: Dict[str, object], versions: List[str]) -> None:
    lines = [f"{k}: {v}" for k, v in facts.items()]
    lines.append(f"CUDA_HOME (environment): {os.environ.get('CUDA_HOME', '(not set)')}")
    lines.append(f"cores: {JOBS}")
    lines += versions
    (out / "env.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group is gone already
        pass


def _wait_until(proc: subprocess.Popen, deadline: float) -> Optional[int]:
    """The exit code, or None if the process still runs at ``deadline`` (time.monotonic())."""
    try:
        return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def _sigint_default() -> None:
    """Run in each step's child before it starts: SIGINT back to its default. A shell starts a
    command run with "&" with SIGINT ignored and children inherit that, so pytest would never
    take the grace period's SIGINT that makes it write its JUnit XML."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_step(step: Step, out: Path, env: Dict[str, str]) -> None:
    log_path = out / f"{step.name}.log"
    step_env = {**env, **step.env}
    start = time.monotonic()
    deadline = start + step.budget_s
    print(f"[gpu_checks] {step.name}: start (budget {step.budget_s} s)", file=sys.stderr, flush=True)
    if shutil.which(step.command[0]) is None and not os.path.exists(step.command[0]):
        log_path.write_text(f"{step.command[0]}: not found on this machine\n")
        step.status, step.rc = "skipped", None
        print(f"[gpu_checks] {step.name}: skipped ({step.command[0]} not found)", file=sys.stderr, flush=True)
        return
    procs: List[subprocess.Popen] = []
    step.status = "stopped"  # stays so only if the run itself is stopped during the step (SIGTERM, Ctrl-C)
    try:
        with open(log_path, "w") as log:
            log.write(f"$ {shlex.join(step.command)}\n")
            log.flush()
            # Each process in its own process group, so that the step's end takes its children too.
            procs.append(subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, env=step_env,
                                          cwd=ROOT, start_new_session=True, preexec_fn=_sigint_default))
        if step.background:
            with open(out / f"{step.name}_background.log", "w") as background_log:
                procs.append(subprocess.Popen(step.background, stdout=background_log, stderr=subprocess.STDOUT,
                                              env=step_env, cwd=ROOT, start_new_session=True,
                                              preexec_fn=_sigint_default))
        rcs = [_wait_until(p, deadline - step.grace_s) for p in procs]
        if None in rcs:
            if step.grace_s:
                for p in procs:
                    _signal_group(p, signal.SIGINT)
                for p in procs:
                    _wait_until(p, deadline)
            step.rc, step.status = None, "timed out"
        else:
            step.rc = next((rc for rc in rcs if rc), 0)  # the command's failure first, else the background's
            step.status = "passed" if step.rc == 0 else "failed"
    except Exception as error:  # e.g. a command that is there but cannot be run: recorded, and the run goes on
        with open(log_path, "a") as log:
            log.write(f"\n[gpu_checks] the step could not run: {type(error).__name__}: {error}\n")
        step.rc, step.status = None, "failed"
    finally:
        # Kill each process group even when its first process has exited: pytest workers,
        # pool processes or a daemon the command left behind would run on into later steps.
        for p in procs:
            _signal_group(p, signal.SIGKILL)
            p.wait()
        step.seconds = time.monotonic() - start
        print(f"[gpu_checks] {step.name}: {step.status} in {step.seconds:.0f} s (exit {step.rc})",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- summary

def junit_counts(path: Path) -> Optional[Dict[str, object]]:
    """Counts and failures from pytest's JUnit XML (None if there is none, or unreadable)."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):  # cut short (pytest killed while writing it), or unreadable
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        if not case.get("name"):  # pytest's entry for the test that SIGINT interrupted: no name, no verdict
            continue
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            reason = (bad.get("message") or bad.text or "").strip().splitlines()
            counts["failures"].append((test_id, reason[0][:200] if reason else "(no message)"))
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def _read_end(path: Path) -> str:
    """A log's last LOG_KEEP bytes as text ("" if it is missing or unreadable): what the summary
    takes is at a log's end, and a step may have printed gigabytes, or bytes that are not UTF-8."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_KEEP))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def sanitizer_verdict(out: Path, step: Step) -> str:
    if step.status in ("not run", "skipped"):
        return f"not run ({step.status}: compute-sanitizer not found)" if step.status == "skipped" else "not run"
    summary = [line for line in _read_end(out / "sanitizer.log").splitlines() if "ERROR SUMMARY" in line]
    verdict = summary[-1].strip()[:300] if summary else "no ERROR SUMMARY line"
    return f"{step.status}: {verdict}"


def _tail_table(log: Path, marker: str) -> str:
    """The table a benchmark printed: from the line starting with ``marker`` to the end."""
    lines = _read_end(log).splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(marker)]
    return "\n".join(lines[starts[-1]:]) if starts else ""


def summarize(out: Path, plan: List[Step], facts: Dict[str, object], extra: List[str]) -> str:
    lines = [f"# GPU checks: {facts.get('device', 'no GPU')}", "",
             f"torch {facts.get('torch')} (CUDA {facts.get('torch_cuda')}), triton {facts.get('triton')}, "
             f"Python {facts.get('python')}; output folder `{out}`", ""]
    lines += extra
    lines += ["| step | status | exit | seconds | budget | tests passed / failed / skipped |",
              "| --- | --- | --- | --- | --- | --- |"]
    tests = junit_counts(out / "junit.xml")
    for s in plan:
        counts = ""
        if s.name == "tests" and tests is not None:
            counts = f"{tests['passed']} / {tests['failed']} / {tests['skipped']}"
        lines.append(f"| {s.name} | {s.status} | {s.rc if s.rc is not None else '-'} | {s.seconds:.0f} | "
                     f"{s.budget_s} | {counts} |")
    by_name = {s.name: s for s in plan}
    if "sanitizer" in by_name:
        lines += ["", f"Sanitizer: {sanitizer_verdict(out, by_name['sanitizer'])}"]
    probe_lines = [line for line in _read_end(out / "crash_probe.log").splitlines() if line.startswith("case ")]
    if probe_lines:
        # Each cut short: a crash's line carries the end of its stack.
        lines += ["", "Crash probe:"] + [f"- {line[:300]}" for line in probe_lines[:8]]
    body = "\n".join(lines)
    tables = {}
    for name in ("benchmarks", "benchmarks_compiled", "e2e", "prop_attn", "e2e_hf", "e2e_dit"):
        table = _tail_table(out / f"{name}.log", "device:")  # each benchmark's table starts so
        if table:
            tables[name] = table
    failures = ["", "## Failing tests", ""] if tests and tests["failures"] else []
    for test_id, reason in (tests or {}).get("failures", []):
        failures.append(f"- `{test_id}`: {reason}")
    # Steps and verdicts first, then failures, then tables, each cut to what still fits 8 KB.
    text = body
    part = "\n".join(failures)
    room = SUMMARY_LIMIT - len(text.encode()) - 120
    if len(part.encode()) > room:
        part = _cut(part, room)
    text += "\n" + part if part else ""
    room = SUMMARY_LIMIT - len(text.encode()) - 120
    text += "".join(f"\n\n## {name}\n\n```\n{table}\n```" for name, table in _fit_tables(tables, room).items())
    return _fit(text + "\n")


_CUT_NOTE = "... (cut to fit 8 KB; see the logs)"


def _cut(text: str, room: int) -> str:
    """``text``'s whole lines that fit ``room`` bytes with the note after them."""
    kept = text.encode()[: max(0, room - len(_CUT_NOTE) - 1)].decode(errors="ignore")
    return (kept.rsplit("\n", 1)[0] + "\n" if "\n" in kept else "") + _CUT_NOTE


def _fit_tables(tables: Dict[str, str], room: int) -> Dict[str, str]:
    """The tables cut to ``room`` bytes together: the shortest first, each to an even share of
    what is left, so that a long table (benchmarks has about 90 rows of 130 characters, more
    than 8 KB) leaves room for the others."""
    fitted = {}
    for name in sorted(tables, key=lambda n: len(tables[n])):
        share = room // (len(tables) - len(fitted)) - 30  # 30: the heading and the code fences
        fitted[name] = tables[name] if len(tables[name].encode()) <= share else _cut(tables[name], share)
        room -= len(fitted[name].encode()) + 30
    return {name: fitted[name] for name in tables}


def _fit(text: str) -> str:
    # The head alone can be too long too (a long output folder path, a long line in the extra lines).
    if len(text.encode()) <= SUMMARY_LIMIT:
        return text
    return _cut(text, SUMMARY_LIMIT - 1) + "\n"


def fallback_summary(plan: List[Step], error: BaseException) -> str:
    """What summary.md says when summarize() itself failed: the steps as steps.json has them."""
    lines = ["# GPU checks", "", f"The summary could not be made: {type(error).__name__}: {error}", ""]
    lines += [f"- {s.name}: {s.status} (exit {s.rc}, {s.seconds:.0f} s of {s.budget_s} s)" for s in plan]
    return _fit("\n".join(lines) + "\n")


def pack_logs(out: Path, plan: List[Step], before: set) -> None:
    """Move this run's logs and the benchmark JSONs into ARCHIVE (each file's last LOG_KEEP
    bytes); files that were in the folder before the run stay where they are."""
    logs = {f"{s.name}.log" for s in plan} | {f"{s.name}_background.log" for s in plan}
    files = [f for f in sorted(out.iterdir()) if f.is_file() and f.name not in PLAIN
             and (f.name in logs or (f.suffix == ".json" and f not in before))]
    if not files:
        return
    with tarfile.open(out / ARCHIVE, "w:gz") as tar:
        for f in files:
            info = tar.gettarinfo(str(f), arcname=f.name)
            with open(f, "rb") as data:
                if info.size > LOG_KEEP:
                    data.seek(info.size - LOG_KEEP)
                    info.size = LOG_KEEP
                tar.addfile(info, data)
    for f in files:
        f.unlink()


def run_plan(plan: List[Step], out: Path, env: Dict[str, str]) -> List[str]:
    """Run every step (whatever the ones before did), write steps.json, and return the
    summary's extra lines: how many Triton kernels the warm-up compiled, and the tests after it."""
    cache = Path(env["TRITON_CACHE_DIR"])
    extra, start_count, warmed = [], cached_kernels(cache), None  # a TRITON_CACHE_DIR given may hold kernels
    try:
        for step in plan:
            run_step(step, out, env)
            if step.name == "prepare":
                warmed = cached_kernels(cache) - start_count
            elif step.name == "tests" and warmed is not None:
                during = cached_kernels(cache) - start_count - warmed
                extra += [f"Triton kernels compiled: {warmed} by the warm-up, {during} more during the tests.", ""]
    finally:  # also when the run is stopped: the steps so far
        (out / "steps.json").write_text(json.dumps(
            [{"name": s.name, "command": s.command, "budget_s": s.budget_s, "rc": s.rc, "status": s.status,
              "seconds": round(s.seconds, 1)} for s in plan], indent=1))
    return extra


def default_out() -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return ROOT / "benchmarks" / "results" / f"gpu_{stamp}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_checks.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="output folder (default: $OUT, else benchmarks/results/gpu_<time>/)")
    p.add_argument("--plan", action="store_true", help="print the steps and their budgets, run nothing")
    args = p.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or default_out()).resolve()
    if out.exists() and not out.is_dir():
        p.error(f"the output folder {out} is a file")
    plan = steps(out)
    if args.plan:
        print_plan(plan)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    start = time.monotonic()

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("TRITON_INTERPRET", None)  # the run is about compiled kernels
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # the H200; one architecture builds fastest
    env.setdefault("MAX_JOBS", str(JOBS))
    # A fresh Triton cache and extension cache per run: the counts below are this run's, and
    # a stale build of an older tree cannot be picked up.
    scratch = Path(tempfile.mkdtemp(prefix="gpu_checks_"))
    env.setdefault("TRITON_CACHE_DIR", str(scratch / "triton"))
    env.setdefault("TOME_KERNELS_CACHE", str(scratch / "extensions"))

    facts, versions = probe_and_versions(env)
    write_env(out, facts, versions)
    if not facts.get("gpu"):
        text = _fit(f"# GPU checks: not run\n\nNo GPU here: `torch.cuda.is_available()` is false or torch did "
                    f"not import (torch: {facts.get('torch')}). Nothing was run; `env.txt` has the machine's facts.\n")
        (out / "summary.md").write_text(text, encoding="utf-8")
        print(text, end="")
        return 2

    (out / "junit.xml").unlink(missing_ok=True)  # an earlier run's, in a folder used again, is not this run's
    # SIGTERM (a time limit around this run) stops the run as Ctrl-C does: the running step's
    # processes are killed (they are in process groups of their own, which the signal misses),
    # and the summary is still written.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        extra = run_plan(plan, out, env)
    except BaseException as error:  # stopped, or a bug here: the steps so far are still summarized
        extra = [f"**The run broke off**: {type(error).__name__}: {error}".rstrip(": "), ""]
    finally:
        signal.signal(signal.SIGTERM, previous)
    extra += [f"Whole run: {time.monotonic() - start:.0f} s (budget {total_budget(plan)} s).", ""]
    try:
        text = summarize(out, plan, facts, extra)
    except Exception as error:  # summary.md is written whatever happened
        text = fallback_summary(plan, error)
    (out / "summary.md").write_text(text, encoding="utf-8")
    try:
        pack_logs(out, plan, before)
    except OSError as error:
        print(f"[gpu_checks] the logs stay unpacked: {error}", file=sys.stderr, flush=True)
    print(text, end="")
    return 0 if all(s.status == "passed" for s in plan) else 1


if __name__ == "__main__":
    sys.exit(main())
