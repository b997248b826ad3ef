"""The backends: each computes the contract of ``tome_kernels.reference`` for the inputs it
supports, and the registry chooses one per call.

- ``base.py``: the interface (``Backend``), whose own methods are the reference backend;
- ``registry.py``: the registry, ``backend="auto"`` and the errors of a backend asked for by name;
- ``op_table.py``: every operator's output shapes and dtypes (the fake kernels of both families);
- ``grouped.py``, ``merge_autograd.py``: what both kernel families share (a plan applied
  through its groups; the merge operators' autograd);
- ``triton/``: the Triton kernels, their launchers and operators, and the "triton" backend;
- ``native/``: the C++ / CUDA extensions (sources in ``csrc/``): loading and building them,
  their operators' fakes and autograd, and the "cpu" / "cuda" backends.
"""

from .base import Backend, Plan
from .registry import (
    ENV_VAR,
    BackendFallbackWarning,
    BackendStatus,
    available_backends,
    cannot_run_reasons,
    check_backend_name,
    register_backend,
    requested_backend,
    select_backend,
)

__all__ = [
    "Backend", "Plan", "ENV_VAR", "BackendFallbackWarning", "BackendStatus", "available_backends",
    "cannot_run_reasons", "check_backend_name", "register_backend", "requested_backend", "select_backend",
]
