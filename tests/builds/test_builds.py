"""The three builds of the native extensions, each from a snapshot of the repository (as a
clean checkout has it, with no in-place build in it): the JIT loader (first build, cache hit,
two processes at once, failures), setup.py through pip (the wheel, its installation, the
FORCE_* switches) and CMake.

Every build compiles the same few C++ files (most of a minute on two cores), so each is
made once per session by a fixture and shared. Processes that load an extension run as
subprocesses: a process can register the ``tome_native`` operators only once, and the
loader's memory of a failure must start clean.
"""

import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.helpers import ROOT
from tome_kernels.backends.native import extension_build

# Builds the extensions three ways: most of the suite's time ("not build" leaves them out).
pytestmark = pytest.mark.build

BUILD_LINE = "tome_kernels: building the cpu extension"
TIMEOUT_S = 600
CPU_TORCH = torch.version.cuda is None

# Loads "cpu" and reports where from, how long it took and whether the operators exist.
LOAD_CPU = """
import json, time
t0 = time.perf_counter()
import torch
from tome_kernels.backends.native import extension_build as eb
t1 = time.perf_counter()
eb.load("cpu")
print(json.dumps({"load_s": time.perf_counter() - t1, "import_s": t1 - t0, "from": eb.loaded_from("cpu"),
                  "merge": hasattr(torch.ops.tome_native, "merge"), "match": hasattr(torch.ops.tome_native, "match")}))
"""

# Tries "cpu" twice, reporting each failure, its time and status() afterwards.
FAIL_CPU = """
import json, time
from tome_kernels.backends.native import extension_build as eb
out = {}
for attempt in ("first", "second"):
    t = time.perf_counter()
    try:
        eb.load("cpu")
        out[attempt] = None
    except eb.ExtensionUnavailable as error:
        out[attempt] = str(error)
    out[attempt + "_s"] = time.perf_counter() - t
out["status"] = eb.status("cpu")
print(json.dumps(out))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TOME_KERNELS_") and k not in ("FORCE_CUDA", "FORCE_ONLY_CPU", "PYTHONPATH")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _python(code, cwd, **env):
    """Runs ``code`` in a fresh interpreter (cwd is not the repository, so that only
    PYTHONPATH decides which tome_kernels it imports)."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def _report(proc):
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory):
    """The repository as a clean checkout has it: no build outputs, no .so, no .git."""
    dst = tmp_path_factory.mktemp("checkout") / "tome_kernels_src"
    junk = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "_csrc",
                                  ".pytest_cache", ".hypothesis", ".benchmarks", "results")
    shutil.copytree(ROOT, dst, ignore=junk)
    return dst


@pytest.fixture(scope="session")
def jit_cache(snapshot, tmp_path_factory):
    """First JIT build of "cpu" into a fresh cache, by two processes started together."""
    cache = tmp_path_factory.mktemp("jit-cache")
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: _python(LOAD_CPU, cache.parent, PYTHONPATH=snapshot, TOME_KERNELS_CACHE=cache),
                              range(2)))
    return cache, procs, time.perf_counter() - start


@pytest.fixture(scope="session")
def wheel(snapshot, tmp_path_factory):
    """``pip wheel`` of the snapshot (setup.py, no build isolation, nothing fetched). With a
    CUDA build of torch, _C alone (FORCE_ONLY_CPU=1): compiling _C_cuda for two architectures
    would take minutes more on two cores, and tests/builds/test_cuda_extension_load.py builds
    and loads it."""
    out = tmp_path_factory.mktemp("wheels")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--wheel-dir", str(out), str(snapshot)],
        cwd=out, env=_env() if CPU_TORCH else _env(FORCE_ONLY_CPU=1), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (path,) = out.glob("tome_kernels-*.whl")
    return path, proc.stdout + proc.stderr, time.perf_counter() - start


@pytest.fixture(scope="session")
def installed(wheel, tmp_path_factory):
    """The wheel installed with pip into a folder of its own."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(site), str(wheel[0])],
                   env=_env(), check=True, timeout=TIMEOUT_S)
    return site


# ----------------------------------------------------------------------------- JIT


def test_jit_first_build_registers_the_operators_once_for_two_processes(jit_cache):
    cache, procs, seconds = jit_cache
    reports = [_report(p) for p in procs]
    for report in reports:
        assert report["merge"] and report["match"], report
        assert report["from"].startswith(str(cache)), report
    assert reports[0]["from"] == reports[1]["from"]
    # One process built, announcing it in one line; the other waited on the lock and loaded it.
    stderr = "".join(p.stderr for p in procs)
    assert stderr.count(BUILD_LINE) == 1, stderr
    assert stderr.count("waiting for another process") == 1, stderr
    # The build says when it ended (and, every 15 s before that, how far it is).
    assert stderr.count("tome_kernels: cpu extension build: ended after") == 1, stderr
    print(f"first JIT build (two processes): {seconds:.1f} s")


def test_jit_second_load_is_a_quiet_cache_hit(jit_cache, snapshot):
    cache, procs, _ = jit_cache
    first = _report(procs[0])
    proc = _python(LOAD_CPU, cache.parent, PYTHONPATH=snapshot, TOME_KERNELS_CACHE=cache)
    report = _report(proc)
    assert report["from"] == first["from"] and report["merge"]
    assert proc.stderr.strip() == "", proc.stderr  # no build line, no compiler, no warning
    assert report["load_s"] < 5, report  # hashing the sources and a dlopen; a build takes a minute
    print(f"cached load: {report['load_s']:.2f} s")


def test_jit_load_from_several_threads_loads_once(jit_cache, snapshot):
    code = """
import json, threading, torch
from tome_kernels.backends.native import extension_build as eb
errors = []
def worker():
    try:
        eb.load("cpu")
    except Exception as error:
        errors.append(repr(error))
threads = [threading.Thread(target=worker) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"errors": errors, "from": eb.loaded_from("cpu"), "libraries": sorted(torch.ops.loaded_libraries)}))
"""
    out = _report(_python(code, jit_cache[0].parent, PYTHONPATH=snapshot, TOME_KERNELS_CACHE=jit_cache[0]))
    assert out["errors"] == [] and out["libraries"] == [out["from"]], out


def test_jit_reads_the_repository_sources_by_default(monkeypatch):
    monkeypatch.delenv(extension_build.ENV_CSRC, raising=False)
    csrc = extension_build.source_dir()
    assert csrc == pathlib.Path(ROOT) / "csrc"
    groups = extension_build.read_sources(csrc)
    assert "module.cpp" in groups["module"] and "ops.cpp" in groups["cpu"]
    for path in extension_build.extension_sources(groups, "cpu"):
        assert (csrc / path).is_file(), path


def test_cache_key_covers_every_file_and_the_kind(tmp_path):
    tree = tmp_path / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), tree)
    key = extension_build.cache_key("cpu", tree)
    assert extension_build.cache_key("cpu", tree) == key
    assert extension_build.cache_key("cuda", tree) != key
    (tree / "cpu" / "new_header.h").write_text("#pragma once\n")  # an unlisted header counts too
    assert extension_build.cache_key("cpu", tree) != key


def test_build_progress_counts_compiled_sources(tmp_path, capsys):
    progress = extension_build._BuildProgress("cpu", tmp_path, total=3, interval=0.02)
    (tmp_path / "ops.o").write_bytes(b"")
    (tmp_path / "merge.o").write_bytes(b"")
    (tmp_path / "build.ninja").write_text("")  # not an object file: not counted
    deadline = time.monotonic() + 10
    while "2 of 3 sources compiled" not in capsys.readouterr().err and time.monotonic() < deadline:
        time.sleep(0.02)
    assert progress.compiled() == 2
    progress.stop()
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("tome_kernels: cpu extension build: ended after"), err
    assert not progress._thread.is_alive()


def test_build_progress_is_quiet_when_the_compiler_is_shown(tmp_path, capsys):
    progress = extension_build._BuildProgress("cpu", tmp_path, total=3, quiet=True, interval=0.01)
    time.sleep(0.05)
    progress.stop()
    assert capsys.readouterr().err == ""


def test_sources_list_rejects_unknown_groups(tmp_path):
    (tmp_path / "sources.txt").write_text("# comment\ncpu ops.cpp\ngpu kernel.cu\n")
    with pytest.raises(ValueError, match="sources.txt:3"):
        extension_build.read_sources(tmp_path)


def test_broken_source_gives_the_compiler_message_once(tmp_path):
    tree = tmp_path / "csrc"
    tree.mkdir()
    shutil.copy(os.path.join(ROOT, "csrc", "module.cpp"), tree)
    (tree / "sources.txt").write_text("module module.cpp\ncpu broken.cpp\n")
    (tree / "broken.cpp").write_text("int tome_broken( {\n")
    cache = tmp_path / "cache"
    out = _report(_python(FAIL_CPU, tmp_path, PYTHONPATH=ROOT, TOME_KERNELS_CSRC=tree, TOME_KERNELS_CACHE=cache))
    message = out["first"]
    assert message and "building or loading the cpu extension" in message
    assert "broken.cpp:1" in message and "error" in message, message  # the compiler's own words
    assert "TOME_KERNELS_VERBOSE_BUILD=1" in message
    (log,) = cache.glob("cpu-*/build.log")
    assert "broken.cpp" in log.read_text() and str(log) in message
    # Remembered: the second call raises the same reason without compiling again.
    assert out["second"] == message and out["second_s"] < 0.5
    assert out["status"] == message


def test_verbose_build_shows_the_compiler(tmp_path):
    tree = tmp_path / "csrc"
    tree.mkdir()
    (tree / "sources.txt").write_text("cpu broken.cpp\n")
    (tree / "broken.cpp").write_text("int tome_broken( {\n")
    proc = _python(FAIL_CPU, tmp_path, PYTHONPATH=ROOT, TOME_KERNELS_CSRC=tree, TOME_KERNELS_CACHE=tmp_path / "c",
                   TOME_KERNELS_VERBOSE_BUILD=1)
    out = _report(proc)
    assert out["first"] and "the compiler output is above" in out["first"]
    assert "broken.cpp:1" in proc.stdout + proc.stderr.replace(out["first"], "")


def test_no_jit_without_an_installed_build_says_so(snapshot, tmp_path):
    proc = _python(FAIL_CPU, tmp_path, PYTHONPATH=snapshot, TOME_KERNELS_NO_JIT=1, TOME_KERNELS_CACHE=tmp_path)
    out = _report(proc)
    assert "tome_kernels._C is not installed" in out["first"] and "TOME_KERNELS_NO_JIT=1" in out["first"]
    assert out["status"] == out["first"]
    assert BUILD_LINE not in proc.stderr and not list(tmp_path.glob("cpu-*"))


def test_cuda_fails_fast_on_a_cpu_torch(monkeypatch):
    # A CPU build of torch is one whose torch.version.cuda is None (also where this torch is
    # a CUDA build, as the README's environment has).
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(extension_build, "_failed", {})
    # As if the cuda extension had not been loaded in this process.
    monkeypatch.setattr(extension_build, "_loaded", {k: v for k, v in extension_build._loaded.items() if k != "cuda"})
    reason = extension_build.status("cuda")
    assert reason and "torch.version.cuda is None" in reason
    start = time.perf_counter()
    with pytest.raises(extension_build.ExtensionUnavailable, match="torch.version.cuda is None"):
        extension_build.load("cuda")
    assert time.perf_counter() - start < 0.5  # no compile attempt
    assert extension_build.loaded_from("cuda") is None


# ----------------------------------------------------------------------------- setup.py


def test_setup_py_builds_the_cpu_extension_and_ships_the_sources(wheel):
    path, output, seconds = wheel
    names = zipfile.ZipFile(path).namelist()
    assert any(n.startswith("tome_kernels/_C.") and n.endswith(".so") for n in names), names
    assert "tome_kernels/_csrc/sources.txt" in names and "tome_kernels/_csrc/ops.cpp" in names
    for module in ["__init__", "api", "checks", "methods", "plan", "reference/__init__", "reference/bipartite",
                   "reference/partition", "reference/roles", "reference/energy", "backends/__init__", "backends/base",
                   "backends/registry", "backends/op_table", "backends/grouped", "backends/merge_autograd",
                   "backends/native/backend", "backends/native/ops", "backends/native/extension_build",
                   "patch/state", "patch/options", "patch/hooks"]:
        assert f"tome_kernels/{module}.py" in names
    for module in ["__init__", "backend", "match", "layout", "merge", "fused", "similarity", "launch", "ops",
                   "compile_check"]:
        assert f"tome_kernels/backends/triton/{module}.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    # The licence travels with the wheel, as a file and in the metadata pip shows.
    archive = zipfile.ZipFile(path)
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = archive.read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text and "Requires-Python: >=3.11" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert not any(n.startswith("tome_kernels/_C_cuda") for n in names)
    why = f"torch {torch.__version__} is not a CUDA build" if CPU_TORCH else "FORCE_ONLY_CPU=1"
    assert f"setup.py: building tome_kernels._C only ({why})" in output
    print(f"pip wheel (setup.py build): {seconds:.1f} s")


def test_pip_install_into_a_fresh_environment_with_torch_there(wheel, tmp_path):
    """A user's install: a new virtual environment in which torch is already importable, the
    wheel installed with its dependencies resolved (--no-index: nothing can be fetched, so
    a resolver that wanted another torch would fail here), then used from another folder."""
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=TIMEOUT_S)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=TIMEOUT_S).stdout.strip()
    # torch "already there": this interpreter's site-packages (torch and what it needs) is on
    # the new environment's path, after its own; .pth files in it are not run, so the
    # checkout's editable install there is not importable.
    pathlib.Path(purelib, "with_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # The venv's own setuptools (Python 3.11's venv still installs one) is older than torch
    # needs and would shadow the one installed beside torch; a real environment with torch in
    # it has that one.
    subprocess.run([python, "-m", "pip", "uninstall", "--yes", "--quiet", "setuptools"], env=_env(),
                   capture_output=True, check=True, timeout=TIMEOUT_S)
    install = subprocess.run([python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
                              str(wheel[0])], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    output = install.stdout + install.stderr
    assert install.returncode == 0, output
    for requirement in ("torch>=2.11", "ninja>=1.11"):
        assert f"Requirement already satisfied: {requirement}" in output, output
    assert "Uninstalling torch" not in output and "Collecting torch" not in output, output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    used = subprocess.run(
        [python, "-c", "import torch, tome_kernels\n"
         "x, size = tome_kernels.bipartite_merge(torch.randn(2, 17, 8), torch.randn(2, 17, 4), 4, class_token=True,"
         " backend='cpu')\n"
         "print(tome_kernels.__file__, tuple(x.shape))"],
        cwd=elsewhere, env=_env(TOME_KERNELS_NO_JIT=1), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert used.returncode == 0, used.stderr[-3000:]
    where, shape = used.stdout.strip().split(" ", 1)
    assert where.startswith(purelib) and shape == "(2, 13, 8)", used.stdout
    # What `pip show` prints, by the pip of the README's environment (requirements/dev.txt; the
    # new venv's own pip, 23.2 with Python 3.11, predates licence expressions and shows none).
    shown = subprocess.run([sys.executable, "-m", "pip", "--python", python, "show", "tome_kernels"], env=_env(),
                           capture_output=True, text=True, timeout=TIMEOUT_S)
    assert "Requires: ninja, torch" in shown.stdout, shown.stdout + shown.stderr
    if _pip_version() >= (26, 3):  # the pinned pip, seen to show it; older ones may not
        assert "License-Expression: Apache-2.0" in shown.stdout, shown.stdout


def _pip_version():
    # Read from the metadata, never `import pip`: on Python < 3.12 importing pip makes
    # setuptools' distutils shim hand out the standard library's distutils for the rest of the
    # process, and every later `import setuptools` in this pytest worker (torch's cpp_extension,
    # inductor's C++ builds) then fails an assertion.
    return tuple(int(part) for part in importlib.metadata.version("pip").split(".")[:2])


def test_installed_build_wins(installed, tmp_path):
    proc = _python(LOAD_CPU, tmp_path, PYTHONPATH=installed, TOME_KERNELS_CACHE=tmp_path / "unused")
    report = _report(proc)
    assert report["merge"] and report["from"].startswith(str(installed / "tome_kernels" / "_C."))
    assert BUILD_LINE not in proc.stderr and not (tmp_path / "unused").exists()


def test_installed_package_jit_builds_from_its_shipped_sources(installed, jit_cache, tmp_path):
    # Without its _C, the installed package builds from tome_kernels/_csrc; those files are
    # the checkout's csrc/, so the key is the same and the session's JIT build is a hit.
    site = tmp_path / "site"
    shutil.copytree(installed, site, ignore=shutil.ignore_patterns("_C.*", "_C_cuda.*"))
    cache = jit_cache[0]
    proc = _python(LOAD_CPU, tmp_path, PYTHONPATH=site, TOME_KERNELS_CACHE=cache)
    report = _report(proc)
    assert report["merge"] and report["from"] == _report(jit_cache[1][0])["from"]
    assert BUILD_LINE not in proc.stderr


def _setup_py(snapshot, *args, **env):
    return subprocess.run([sys.executable, "setup.py", *args], cwd=snapshot, env=_env(**env), capture_output=True,
                          text=True, timeout=TIMEOUT_S)


@pytest.mark.skipif(not CPU_TORCH, reason="torch here is a CUDA build: FORCE_CUDA=1 would build")
def test_force_cuda_on_a_cpu_torch_fails_with_the_reason(snapshot, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--target", str(tmp_path), str(snapshot)],
        cwd=tmp_path, env=_env(FORCE_CUDA=1), capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode != 0
    assert (f"FORCE_CUDA=1, but tome_kernels._C_cuda cannot be built: torch {torch.__version__} is not a CUDA build"
            in proc.stdout + proc.stderr), proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("_C*.so"))


def test_force_only_cpu_wins_over_force_cuda(snapshot):
    proc = _setup_py(snapshot, "--name", FORCE_CUDA=1, FORCE_ONLY_CPU=1)
    assert proc.returncode == 0, proc.stderr
    assert "setup.py: building tome_kernels._C only (FORCE_ONLY_CPU=1)" in proc.stderr
    assert proc.stdout.strip().endswith("tome_kernels")


# ----------------------------------------------------------------------------- CMake

needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on PATH")


def _cmake(*args, cwd):
    return subprocess.run(["cmake", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


@needs_cmake
def test_cmake_builds_the_cpu_extension_and_the_cxx_library(snapshot, tmp_path):
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    start = time.perf_counter()
    # With a CUDA torch, the CPU targets alone, as in the wheel's build (see ``wheel``).
    cuda = [] if CPU_TORCH else ["-DTOME_KERNELS_CUDA=OFF"]
    configure = _cmake("-S", str(snapshot), "-B", str(build), *generator, *cuda,
                       f"-DPython3_EXECUTABLE={sys.executable}", cwd=tmp_path)
    output = configure.stdout + configure.stderr
    if configure.returncode != 0 and not CPU_TORCH and "cannot find the CUDA" in output:
        # Torch's CMake package of a CUDA build needs the CUDA runtime's headers and
        # libraries even for CPU targets; pip's torch carries them only for itself.
        pytest.skip(f"torch {torch.__version__} is a CUDA build and its CMake package finds no CUDA runtime "
                    "here (a full CUDA toolkit is needed): " + output[output.index("Your installed"):][:120])
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = _cmake("--build", str(build), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stdout[-4000:] + compiled.stderr[-3000:]
    seconds = time.perf_counter() - start
    (module,) = build.glob("tome_kernels/_C.*.so")
    (library,) = build.glob("libtome_kernels_ops.so")
    # The Python extension imports as tome_kernels._C; the plain library loads with
    # torch.ops.load_library, as a C++ program would link it. Each registers the operators.
    imported = _python("import torch, tome_kernels._C\nprint(hasattr(torch.ops.tome_native, 'merge'))", tmp_path,
                       PYTHONPATH=build)
    assert imported.returncode == 0 and imported.stdout.strip() == "True", imported.stderr
    loaded = _python(f"import torch\ntorch.ops.load_library({str(library)!r})\n"
                     "print(hasattr(torch.ops.tome_native, 'merge'))", tmp_path)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "True", loaded.stderr
    print(f"cmake configure + build: {seconds:.1f} s")


@needs_cmake
@pytest.mark.skipif(not CPU_TORCH, reason="torch here is a CUDA build")
def test_cmake_cuda_on_with_a_cpu_torch_fails_with_the_reason(snapshot, tmp_path):
    proc = _cmake("-S", str(snapshot), "-B", str(tmp_path / "build"), "-DTOME_KERNELS_CUDA=ON",
                  f"-DPython3_EXECUTABLE={sys.executable}", cwd=tmp_path)
    assert proc.returncode != 0
    assert f"TOME_KERNELS_CUDA=ON, but torch {torch.__version__} is not a CUDA build" in proc.stdout + proc.stderr
