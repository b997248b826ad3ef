"""The contract in plain PyTorch: what every backend must compute, imported by the
``reference`` backend, the tests and the benchmarks alike. Its statement is docs/semantics.md.

- ``bipartite``: ToMe's bipartite soft matching and the merges (this package re-exports it,
  so ``tome_kernels.reference.match`` etc. are the contract's functions);
- ``partition``: general merge plans (roles, each source's best destination, selection,
  layout) for the methods beyond ToMe; ``roles``: each method's roles; ``energy``: PiToMe's
  energy score.
"""

from .bipartite import (
    MERGE_MODES,
    NORM_EPS,
    MatchResult,
    bipartite_merge,
    clamp_r,
    identity_match,
    match,
    merge,
    merge_wavg,
    normalized_metric,
    output_rows,
    score_dtype,
    size_dtype,
    unmerge,
)

__all__ = [
    "MERGE_MODES", "NORM_EPS", "MatchResult", "bipartite_merge", "clamp_r", "identity_match", "match", "merge",
    "merge_wavg", "normalized_metric", "output_rows", "score_dtype", "size_dtype", "unmerge",
]
