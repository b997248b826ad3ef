"""What a bug report needs, as text: ``python -m tome_kernels`` prints it.

The package's version and location; Python, platform, torch (and its CUDA), Triton; the
GPU if there is one; each backend and whether it can run here, and why not; where the
native extensions come from (an installed build, a cached JIT build, or one still to make)
and the build cache folder. By default nothing is built: a backend that would build its
extension on first use says so. ``load=True`` loads every backend as a first use would
(which may compile the CPU extension for minutes) and reports ``available_backends()``.
"""

import importlib.metadata
import os
import platform
import sys
from typing import List

import torch

import tome_kernels

from .backends import available_backends
from .backends.native import extension_build
from .backends.native.backend import no_cuda_device_reason
from .backends.registry import ENV_VAR, registered_backends
from .patch import prop_attention

SWITCHES = (ENV_VAR, extension_build.ENV_NO_JIT, extension_build.ENV_CSRC, extension_build.ENV_CACHE,
            prop_attention.ENV_VAR, "TRITON_INTERPRET", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _backend_lines(load: bool) -> List[str]:
    if load:
        return [f"  {s.name:<10} {'available' if s.available else 'unavailable: ' + str(s.reason)}"
                for s in available_backends().values()]
    lines = []
    for name in registered_backends():
        if name == "cuda" and no_cuda_device_reason():
            # Not asking build_state also keeps torch's cpp_extension (and its log line) out.
            state = f"unavailable: {no_cuda_device_reason()}"
        elif name in extension_build.KINDS:
            state = extension_build.build_state(name)
        elif name == "reference":
            state = "available (plain PyTorch, runs anywhere)"
        elif name == "triton":
            triton = _version("triton")
            state = (f"needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones); triton {triton}"
                     if triton != "not installed" else "unavailable: triton is not installed")
        else:
            state = "registered (its status is known once loaded: --load)"
        lines.append(f"  {name:<10} {state}")
    return lines


def environment_report(load: bool = False) -> str:
    """The report as lines of text (see the module docstring); ``load`` loads every backend."""
    cuda = torch.cuda.is_available()
    lines = [
        f"tome_kernels {tome_kernels.__version__} ({os.path.dirname(tome_kernels.__file__)})",
        f"python {platform.python_version()} ({sys.executable}), {platform.platform()}, {platform.machine()}",
        f"torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}; "
        f"CUDA available: {'yes' if cuda else 'no'}",
    ]
    if cuda:
        lines.append(f"GPU: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    lines += [
        f"triton {_version('triton')}, timm {_version('timm')}, transformers {_version('transformers')}, "
        f"sentence-transformers {_version('sentence-transformers')}, diffusers {_version('diffusers')}, "
        f"matplotlib {_version('matplotlib')}",
        # The switches that change which backend runs or whether anything is compiled.
        "environment: " + (", ".join(f"{k}={os.environ[k]}" for k in SWITCHES if k in os.environ) or "no switches set"),
        f"CPU capability (ATen): {torch.backends.cpu.get_cpu_capability()}, threads: {torch.get_num_threads()}",
        "backends (auto tries them in this order):",
        *_backend_lines(load),
        f"extension build cache: {extension_build.cache_root()} ({extension_build.ENV_CACHE} to move it)",
    ]
    return "\n".join(lines)
