"""The CUDA sources compile without a GPU: every ``.cu`` file of the cuda group of
``csrc/sources.txt`` (the list every build reads) with ``nvcc -c`` for sm_80 and sm_90, and
its PyTorch glue (the group's ``.cpp`` files) through a host-compiler syntax check against
torch's headers.

Nothing here can run a kernel (CI has no GPU); this catches what only a compiler sees, on
every change. Warnings are errors, in nvcc and in the host compiler, for our own code
(torch's and CUDA's headers are system headers). The compilations run two at a time in one
module-level fixture, so the module takes well under a minute and a half on two cores.
"""

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import ROOT
from tome_kernels.backends.native import extension_build

pytestmark = pytest.mark.compile

CSRC = os.path.join(ROOT, "csrc")
# What the builds compile, not a glob of our own: a source left out of the list would be
# left out of the compile check too, and test_source_list.py checks the list is complete.
CUDA_GROUP = extension_build.read_sources(CSRC)["cuda"]
KERNEL_FILES = sorted(p for p in CUDA_GROUP if p.endswith(".cu"))
GLUE_FILES = sorted(p for p in CUDA_GROUP if p.endswith(".cpp"))
ARCHS = ("80", "90")
TIMEOUT_S = 300

NVCC = shutil.which("nvcc")
HOST_CXX = shutil.which("g++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compiled here")


def _cuda_include_dir():
    """CUDA's include directory, as nvcc itself reports it (nvcc may be a wrapper script, so
    its own location says little), else the usual places."""
    candidates = []
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [NVCC, "--dryrun", "-c", os.path.join(tmp, "probe.cu")], capture_output=True, text=True, timeout=60
        )
    for line in (proc.stdout + proc.stderr).splitlines():
        if "INCLUDES=" in line:
            candidates += re.findall(r'-I"?([^"\s]+)', line)
    real = os.path.realpath(NVCC)
    candidates += [
        os.path.join(os.environ.get("CUDA_HOME", ""), "include"),
        os.path.join(os.path.dirname(os.path.dirname(real)), "include"),
        "/usr/local/cuda/include",
    ]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "cuda_runtime.h")):
            return os.path.normpath(path)
    return None


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    return cmd, proc.returncode, proc.stdout + proc.stderr


# What torch's CUDA extensions add to every nvcc command (no implicit half / bfloat16
# conversions or operators), plus the project's own flag (extension_build.NVCC_FLAGS).
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
]


def _nvcc_cmd(source, arch, out_dir):
    return [
        NVCC, "-c", "-O3", "-std=c++17", *TORCH_NVCC_DEFINES,
        "-gencode", f"arch=compute_{arch},code=sm_{arch}",
        "-Werror", "all-warnings",
        "-Xcompiler", "-Wall,-Wextra,-Werror",
        os.path.join(CSRC, source),
        "-o", os.path.join(out_dir, f"{os.path.basename(source)}.sm_{arch}.o"),
    ]


def _glue_cmd(source):
    """The syntax check of one glue file, or the reason it cannot run here."""
    if HOST_CXX is None:
        return None, "g++ is not on PATH"
    try:
        from torch.utils.cpp_extension import include_paths
    except Exception as error:  # a broken torch is a reason to skip, reported as such
        return None, f"torch's C++ headers cannot be located: {type(error).__name__}: {error}"
    cuda_include = _cuda_include_dir()
    if cuda_include is None:
        return None, "CUDA's include directory (cuda_runtime.h) was not found next to nvcc"
    includes = [arg for path in include_paths() + [cuda_include] for arg in ("-isystem", path)]
    # C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU build of torch ships no cuda_cmake_macros.h.
    return [
        HOST_CXX, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-Werror",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *includes,
        os.path.join(CSRC, source),
    ], None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every compilation of the module, run two at a time, slowest first: {key: (cmd, rc, output)}."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    out_dir = str(tmp_path_factory.mktemp("cuda_objects"))
    jobs = {(source, arch): _nvcc_cmd(source, arch, out_dir) for source in KERNEL_FILES for arch in ARCHS}
    skipped = {}
    for source in GLUE_FILES:
        glue, reason = _glue_cmd(source)
        if glue is None:
            skipped[(source, "skip")] = reason
        else:
            jobs[(source, "host")] = glue
    # Largest sources first: the two workers then finish at about the same time.
    order = sorted(jobs, key=lambda key: -os.path.getsize(os.path.join(CSRC, key[0])))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(_run, jobs[key], out_dir) for key in order}
        results = {key: future.result() for key, future in futures.items()}
    return {**results, **skipped}


def _assert_ok(result):
    cmd, rc, output = result
    assert rc == 0, f"exit status {rc} from:\n{' '.join(cmd)}\n\n{output[-20000:]}"


def test_the_cuda_group_has_kernels_and_glue():
    assert set(KERNEL_FILES) >= {f"cuda/{name}_cuda.cu" for name in ("match", "select", "merge", "similarity")}
    assert GLUE_FILES == ["cuda/ops_cuda.cpp"]
    assert os.path.isfile(os.path.join(CSRC, "cuda", "launchers.h"))


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", KERNEL_FILES)
def test_kernels_compile(compiled, source, arch):
    _assert_ok(compiled[(source, arch)])


def test_kernel_files_include_no_torch_header():
    # Torch headers make nvcc take a minute and gigabytes of memory per file (docs/native.md).
    for name in KERNEL_FILES + ["cuda/launchers.h"]:
        with open(os.path.join(CSRC, name)) as f:
            includes = re.findall(r"^\s*#\s*include\s*[<\"]([^>\"]+)", f.read(), re.M)
        torch_like = [h for h in includes if h.split("/")[0] in ("torch", "ATen", "c10")]
        assert not torch_like, f"{name} includes {torch_like}"


@needs_nvcc
@pytest.mark.parametrize("source", GLUE_FILES)
def test_glue_passes_host_syntax_check(compiled, source):
    if (source, "host") not in compiled:
        pytest.skip(compiled[(source, "skip")])
    _assert_ok(compiled[(source, "host")])
