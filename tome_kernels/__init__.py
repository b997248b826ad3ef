"""tome_kernels: fused token merging (ToMe) for transformers.

Importing this package does no GPU work and never fails for want of a backend: a backend
that cannot load records why (see ``available_backends()``).
"""

from .api import bipartite_match, bipartite_merge
from .backends import ENV_VAR, BackendFallbackWarning, BackendStatus, available_backends, register_backend
from .plan import MergePlan
from .reference import MERGE_MODES
from .triton_backend import TritonBackend

# Preference order of "auto": triton, then the reference.
register_backend(TritonBackend())

__version__ = "0.1.0"

__all__ = [
    "bipartite_merge",
    "bipartite_match",
    "MergePlan",
    "available_backends",
    "BackendStatus",
    "BackendFallbackWarning",
    "ENV_VAR",
    "MERGE_MODES",
    "__version__",
]
