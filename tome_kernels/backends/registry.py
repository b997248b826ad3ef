"""The registry of backends and the choice between them: ``backend="auto"`` takes the first
in preference order that has no reason not to run the inputs, and a backend asked for by
name that has reasons raises them all in one message. The interface is ``base.Backend``.
"""

import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor

from .base import Backend

ENV_VAR = "TOME_KERNELS_BACKEND"


class BackendFallbackWarning(UserWarning):
    """A faster backend was expected for these inputs but could not load."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: Optional[str]


# Preference order for "auto": fastest first, the reference (which runs anywhere) last.
# Later backends are inserted ahead of it with ``register_backend``.
_REGISTRY: Dict[str, Backend] = {"reference": Backend()}
_warned: set = set()


def register_backend(backend: Backend) -> None:
    """Add a backend ahead of the reference in the ``auto`` preference order; a backend of the
    same name is replaced. Raises ``TypeError`` for anything but a ``Backend``, and
    ``ValueError`` for a name that is not a non-empty str or is "auto" or "reference" (names
    the choice itself uses), before the registry changes."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a tome_kernels.backends.Backend, got {type(backend).__name__}")
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name or name in ("auto", "reference"):
        raise ValueError(f"backend.name must be a non-empty str other than 'auto' and 'reference', got {name!r}")
    ref = _REGISTRY.pop("reference")
    _REGISTRY.pop(backend.name, None)
    _REGISTRY[backend.name] = backend
    _REGISTRY["reference"] = ref


def _constant_under_compile(fn):
    """What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo
    (that import alone would add seconds to ``import tome_kernels``): the decorator only sets
    this attribute, which dynamo reads when traced code calls ``fn``.
    tests/backends/test_compile_first_use.py checks that the decorator still sets it."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def _load_error(name: str) -> Optional[str]:
    """``load_error()`` of the backend ``name``, which loads it on first use.

    Under torch.compile, dynamo runs this as plain Python at trace time and keeps the result
    as a constant. Loading imports modules, takes locks and may build an extension, none of
    which dynamo can trace: when a backend's first use was inside a compiled function, a
    fullgraph compile failed on the extension loader's lock. The result may be a constant
    because it never changes once known: a backend loads once, and a failure is kept."""
    return _REGISTRY[name].load_error()


def registered_backends() -> List[str]:
    """The backends' names in ``auto``'s order of preference, without loading any."""
    return list(_REGISTRY)


def available_backends() -> Dict[str, BackendStatus]:
    """Every backend, whether it can run here, and if not, why."""
    status = {}
    for name in _REGISTRY:
        reason = _load_error(name)
        status[name] = BackendStatus(name, reason is None, reason)
    return status


def cannot_run_reasons(name: str, tensors: Sequence[Tensor]) -> List[str]:
    """Why the backend ``name`` cannot run ``tensors`` here; empty when it can."""
    error = _load_error(name)
    return [error] if error else _REGISTRY[name].unsupported_reasons(tensors)


def _warn_once(backend: Backend, reason: str) -> None:
    key = (backend.name, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"tome_kernels: the {backend.name!r} backend could not load ({reason}); "
            "falling back to a slower backend. See tome_kernels.available_backends().",
            BackendFallbackWarning,
            stacklevel=4,
        )


def requested_backend(backend) -> Tuple[str, str]:
    """The backend name in force and where it came from (for error messages)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str (one of auto, {', '.join(_REGISTRY)}), got {type(backend).__name__}")
    if backend == "auto" and os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR], f"the environment variable {ENV_VAR}"
    return backend, "backend"


def check_backend_name(backend) -> str:
    """Check a ``backend=`` argument without choosing a backend or loading one: "auto" or a
    registered name; returns it unchanged. Raises ``TypeError`` / ``ValueError`` naming the
    argument. The model patches call it at patch time, so that a misspelt name fails there,
    not at the first forward pass."""
    _name_in_force(backend)
    return backend


def _name_in_force(backend) -> Tuple[str, str]:
    name, source = requested_backend(backend)
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"{source}={name!r} is not a backend: expected one of auto, {', '.join(_REGISTRY)}")
    return name, source


def select_backend(backend, tensors: Sequence[Tensor]) -> Backend:
    """The backend that will run ``tensors``; raises if one named explicitly cannot."""
    name, source = _name_in_force(backend)
    if name == "auto":
        for candidate_name, candidate in _REGISTRY.items():
            if candidate.unsupported_reasons(tensors):
                continue
            error = _load_error(candidate_name)
            if error is None:
                return candidate
            if tensors and candidate.expected_for(tensors[0].device):
                _warn_once(candidate, error)
        raise AssertionError("the reference backend runs every valid input")
    reasons = cannot_run_reasons(name, tensors)
    if reasons:
        raise ValueError(f"{source}={name!r} cannot run these inputs: " + "; ".join(reasons))
    return _REGISTRY[name]
