"""tome_kernels: fused token merging for transformers: ToMe, PiToMe, DSM, and merge /
unmerge for diffusion models.

Importing this package does no GPU work and never fails for want of a backend: a backend
that cannot load records why (see ``available_backends()``).
"""

from . import patch
from .api import bipartite_match, bipartite_merge
from .backends import ENV_VAR, BackendFallbackWarning, BackendStatus, available_backends, register_backend
from .backends.native.backend import NativeBackend
from .backends.triton.backend import TritonBackend
from .methods import grid_match, kth_bipartite_match, pitome_match, pitome_merge, random_bipartite_match, window_match
from .plan import MergePlan
from .reference import MERGE_MODES

# Preference order of "auto": each backend runs only some inputs, and the first that can
# run them wins. CPU tensors: the "cpu" extension, else the reference. CUDA tensors:
# "triton", then the "cuda" extension; that order is provisional until the GPU benchmarks
# (benchmarks/run.py) have measured both (README, "Backends").
register_backend(NativeBackend("cpu"))
register_backend(TritonBackend())
register_backend(NativeBackend("cuda"))

__version__ = "0.1.0"

# Modules that were attributes of this package before it was laid out in reference/,
# backends/ and patch/: ``from tome_kernels import energy`` keeps working, with a warning
# that names the new place. (Only as attributes: ``import tome_kernels.energy`` is gone.)
_MOVED = {
    "energy": "reference.energy", "partition": "reference.partition", "roles": "reference.roles",
    "op_table": "backends.op_table", "grouped_backend": "backends.grouped",
    "merge_autograd": "backends.merge_autograd", "native_backend": "backends.native.backend",
    "native_ops": "backends.native.ops", "extension_build": "backends.native.extension_build",
    "triton_backend": "backends.triton.backend", "triton_kernels": "backends.triton",
}


def __getattr__(name):
    if name not in _MOVED:
        raise AttributeError(f"module 'tome_kernels' has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(f"tome_kernels.{name} is now tome_kernels.{_MOVED[name]}", DeprecationWarning, stacklevel=2)
    module = globals()[name] = importlib.import_module(f"{__name__}.{_MOVED[name]}")  # warn once
    return module


__all__ = [
    "bipartite_merge",
    "bipartite_match",
    "pitome_match",
    "pitome_merge",
    "kth_bipartite_match",
    "random_bipartite_match",
    "grid_match",
    "window_match",
    "patch",
    "MergePlan",
    "available_backends",
    "BackendStatus",
    "BackendFallbackWarning",
    "ENV_VAR",
    "MERGE_MODES",
    "__version__",
]
