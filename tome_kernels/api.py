"""The public functions: check the inputs, choose a backend, run it."""

from typing import Optional, Tuple

from torch import Tensor

from . import checks
from .backends import select_backend
from .backends.ambient import fixed_numerics
from .plan import MergePlan


@fixed_numerics
def bipartite_merge(
    x: Tensor,
    metric: Tensor,
    r: int,
    size: Optional[Tensor] = None,
    *,
    class_token: bool = False,
    distill_token: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """One ToMe step: match tokens on ``metric`` and merge ``r`` of them out of ``x``.

    Args:
        x: (B, N, C) tokens, float16 / bfloat16 / float32 / float64.
        metric: (B, N, D) similarity features, or attention keys (B, H, N, Dh), whose mean
            over the heads is the metric.
        r: tokens to remove, clamped to (N - protected tokens) // 2.
        size: optional (B, N, 1) token sizes; None means all ones.
        class_token: token 0 is never merged away.
        distill_token: nothing merges into token 1.
        backend: "auto", or a name from ``available_backends()``; the environment variable
            TOME_KERNELS_BACKEND replaces "auto".

    Returns:
        ``(x_merged, size_merged)``: (B, N - r, C) in x's dtype and (B, N - r, 1) in float32
        (float64 if ``size`` was float64). With nothing to merge, ``x`` itself is returned.
    """
    r = checks.check_merge_inputs(x, metric, r, size, class_token, distill_token)
    tensors = (x, metric) if size is None else (x, metric, size)
    impl = select_backend(backend, tensors)
    return impl.bipartite_merge(x, metric, r, size, class_token, distill_token)


@fixed_numerics
def bipartite_match(
    metric: Tensor,
    r: int,
    *,
    class_token: bool = False,
    distill_token: bool = False,
    backend: str = "auto",
) -> MergePlan:
    """Match tokens on ``metric`` (as in ``bipartite_merge``) and return the plan, whose
    ``merge_wavg``, ``merge`` and ``unmerge`` apply it to any (B, N, C) tensor."""
    r = checks.check_match_inputs(metric, r, class_token, distill_token)
    impl = select_backend(backend, (metric,))
    return MergePlan(impl.match(metric, r, class_token, distill_token), impl)
