"""Package build: the Python package and its native extensions, from csrc/sources.txt.

- ``tome_kernels._C`` (schemas and CPU kernels) is always built.
- ``tome_kernels._C_cuda`` (CUDA kernels) is built when torch is a CUDA build and a CUDA
  toolkit is found. ``FORCE_CUDA=1``: build it or fail saying why (never skip it silently).
  ``FORCE_ONLY_CPU=1``: never build it (wins over FORCE_CUDA). ``TORCH_CUDA_ARCH_LIST``:
  the architectures (default: extension_build.DEFAULT_CUDA_ARCHS).
- ``TOME_KERNELS_NO_BUILD=1``: build no extension at all (seconds instead of minutes); the
  first use JIT-builds what it needs, once, into the cache.
- The sources are shipped in the package (``tome_kernels/_csrc/``), so that an installation
  without ``_C_cuda`` (or without any extension) can still JIT-build it
  (tome_kernels/backends/native/extension_build.py).

Build with the torch you run with: ``pip install --no-build-isolation .`` (``-e`` for an
in-place build). Nothing here queries a GPU or the network.
"""

import importlib.util
import os
import shutil
import sys

import setuptools
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))

# Without build isolation (how this package is built) the environment's setuptools builds it,
# and Python 3.11's venv brings 65.5, which rejects the licence expression in pyproject.toml
# with a schema error that does not say what to do.
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"setup.py: setuptools {setuptools.__version__} is too old: pyproject.toml's licence expression needs "
             "setuptools 77 or newer. Run: pip install 'setuptools>=77' (a build without isolation uses the "
             "environment's setuptools).")

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:
    sys.exit(f"setup.py: torch is needed to build tome_kernels' extensions and cannot be imported ({error}). "
             "Install torch first, then build without isolation: pip install --no-build-isolation .")


def _extension_build():
    # The loader's flags and source list, read without importing the package.
    path = os.path.join(ROOT, "tome_kernels", "backends", "native", "extension_build.py")
    spec = importlib.util.spec_from_file_location("_tome_kernels_extension_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_wanted():
    """(build _C_cuda?, why); exits when FORCE_CUDA=1 cannot be honoured."""
    torch_build = f"torch {torch.__version__}"
    if os.environ.get("FORCE_ONLY_CPU") == "1":
        return False, "FORCE_ONLY_CPU=1"
    if torch.version.cuda is None:
        why = f"{torch_build} is not a CUDA build"
    elif CUDA_HOME is None:
        why = "no CUDA toolkit was found (set CUDA_HOME)"
    else:
        return True, f"{torch_build} is a CUDA {torch.version.cuda} build and the toolkit is at {CUDA_HOME}"
    if os.environ.get("FORCE_CUDA") == "1":
        sys.exit(f"setup.py: FORCE_CUDA=1, but tome_kernels._C_cuda cannot be built: {why}. Install a CUDA "
                 "build of torch and the CUDA toolkit, or unset FORCE_CUDA (FORCE_ONLY_CPU=1 builds _C alone).")
    return False, why


class BuildPyWithSources(build_py):
    """Copies csrc/ into the package as _csrc/ (an editable install reads csrc/ itself)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "tome_kernels", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        # The same files the JIT cache key hashes: a shipped tree hits the cache of its checkout.
        shutil.copytree(os.path.join(ROOT, "csrc"), target, ignore=shutil.ignore_patterns(".*", "__pycache__"))


eb = _extension_build()
groups = eb.read_sources(os.path.join(ROOT, "csrc"))
# torch guesses CUDA_HOME from where `nvcc` is, which is wrong for a wrapper script such as
# /usr/local/bin/nvcc; the loader asks nvcc for its toolkit (and sets it in cpp_extension,
# which BuildExtension reads), unless CUDA_HOME or CUDA_PATH is set.
CUDA_HOME = eb.use_real_cuda_home() or CUDA_HOME


def _sources(kind):
    return [f"csrc/{path}" for path in eb.extension_sources(groups, kind)]  # setuptools wants relative paths


if os.environ.get("TOME_KERNELS_NO_BUILD") == "1":
    ext_modules = []
    print("setup.py: building no extension (TOME_KERNELS_NO_BUILD=1): the first use JIT-builds them",
          file=sys.stderr)
else:
    # -g0: Python's CFLAGS carry -g, which costs ~40% more compile time and 17x the object size.
    ext_modules = [
        CppExtension("tome_kernels._C", _sources("cpu"), include_dirs=[os.path.join(ROOT, "csrc")],
                     extra_compile_args={"cxx": eb.CXX_FLAGS + ["-g0"]}, extra_link_args=eb.LD_FLAGS),
    ]
    with_cuda, why = _cuda_wanted()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", eb.DEFAULT_CUDA_ARCHS)  # else torch would query the GPUs
        ext_modules.append(
            CUDAExtension("tome_kernels._C_cuda", _sources("cuda"), include_dirs=[os.path.join(ROOT, "csrc")],
                          extra_compile_args={"cxx": eb.CUDA_CXX_FLAGS + ["-g0"], "nvcc": eb.NVCC_FLAGS}))
    names = " and ".join(ext.name for ext in ext_modules) + ("" if with_cuda else " only")
    print(f"setup.py: building {names} ({why})", file=sys.stderr)

setup(
    packages=find_packages(include=["tome_kernels", "tome_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithSources},
    zip_safe=False,
)
