"""General merge plans: any grouping of tokens, made from roles, in plain PyTorch.

ToMe's bipartite matching (``bipartite.py``) fixes its two sets by position. The later
methods (PiToMe, kth / random bipartite, the 2-D partition of diffusion models, DSM's local
windows) choose the sets differently but then do the same thing, which this module is:

1. every token has a role: KEEP (never merged: protected tokens, leftovers), SOURCE (may be
   merged away) or DEST (may receive sources); an optional ``window`` id per token limits a
   source to the destinations of its own window;
2. ``assign``: each source's best destination by cosine similarity of the metric rows (the
   backends' fused kernels compute this without a score matrix);
3. ``select``: the r sources with the highest scores merge, the others are kept;
4. ``layout``: every token that is not merged keeps a row, in token order, and a merged
   source takes its destination's row: the plan's ``token_map``.

A ``Partition`` is applied by the same merge kernels as a ToMe plan (they only gather each
output row's group), and the functions at the end are their reference.
"""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import bipartite

KEEP, SOURCE, DEST = 0, 1, 2
# A destination whose score is NaN still beats every token that is no destination: it is
# ranked at this value (below any cosine) and reported as -inf.
_NAN_SCORE = -3.0


class Partition(NamedTuple):
    """A general merge plan: ``token_map`` (B, N) int64 gives the output row of every input
    token; there are N - r output rows. ``groups`` is how a fast backend stores the groups
    for its merge kernels, or None (derived from the token map when needed)."""

    r: int
    token_map: Tensor
    groups: Optional[Tuple[Tensor, Tensor]] = None


def identity(batch: int, tokens: int, device) -> Partition:
    """Nothing merged: every token keeps its own row."""
    return Partition(0, torch.arange(tokens, device=device).repeat(batch, 1))


@torch.no_grad()
def assign(metric: Tensor, roles: Tensor, window: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Best destination of every source: (best (B, N), dst (B, N) int64); best is float64
    for a float64 metric, float32 otherwise (``bipartite.score_dtype``).

    best is the highest cosine similarity to a destination (of the source's own window, when
    ``window`` is given), dst the lowest token index reaching it. NaN scores never win: a
    source whose scores are all NaN gets best = -inf and its first allowed destination.
    Tokens that are no source, or have no allowed destination, get best = -inf and dst = -1.
    """
    m = bipartite.normalized_metric(metric)
    roles = roles.expand(m.shape[0], -1)
    scores = bipartite.similarity(m, m)
    allowed = (roles == DEST)[:, None, :]
    if window is not None:
        window = window.expand(m.shape[0], -1)
        allowed = allowed & (window[:, :, None] == window[:, None, :])
    scores = torch.where(allowed, scores.nan_to_num(nan=_NAN_SCORE), float("-inf"))
    # torch.max returns the first maximal index: ties go to the lowest token index.
    best, dst = scores.max(dim=-1)
    source = (roles == SOURCE) & (best > float("-inf"))
    dst = torch.where(source, dst, -1)
    best = torch.where(source & (best > _NAN_SCORE), best, float("-inf"))
    return best, dst


def select(best: Tensor, dst: Tensor, r: int) -> Tensor:
    """(B, N) bool: the r sources (tokens with dst >= 0) of highest best, ties to the lower
    index. The caller guarantees every row has at least r sources."""
    order = torch.sort(best, dim=1, descending=True, stable=True).indices
    # Sources first, keeping the score order among them (a second stable sort).
    is_source = (dst >= 0).gather(1, order)
    order = order.gather(1, torch.sort((~is_source).to(torch.uint8), dim=1, stable=True).indices)
    top = order[:, :r]
    # A tensor source, not the scalar True: inductor (torch 2.13) miscompiles the in-place
    # scalar scatter of a slice whose length r became dynamic, marking one token, not B, at
    # r = 1 (tests/contract/test_compiled_plans.py).
    return torch.zeros_like(dst, dtype=torch.bool).scatter(1, top, torch.ones_like(top, dtype=torch.bool))


def layout(merged: Tensor, dst: Tensor) -> Tensor:
    """token_map (B, N) int64: tokens not merged take rows 0, 1, ... in token order; a merged
    token takes the row of its destination."""
    rows = torch.cumsum((~merged).long(), dim=1) - 1
    return torch.where(merged, rows.gather(1, dst.clamp_min(0)), rows)


def partition(metric: Tensor, roles: Tensor, r: int, window: Optional[Tensor] = None, backend=None) -> Partition:
    """Steps 2 to 4 for roles (B, N) or (1, N) of int8: the plan merging r sources.

    ``backend`` computes ``assign`` (its fused kernel); None means this module's reference.
    """
    batch, tokens = metric.shape[0], metric.shape[-2]
    if r == 0:
        return identity(batch, tokens, metric.device)
    best, dst = assign(metric, roles, window) if backend is None else backend.assign(metric, roles, window)
    return Partition(r, layout(select(best, dst, r), dst))


def group_sizes(token_map: Tensor, rows: int) -> Tensor:
    """(B, rows) int64: how many input tokens each output row stands for."""
    return torch.zeros(token_map.shape[0], rows, dtype=torch.long, device=token_map.device).scatter_add_(
        1, token_map, torch.ones_like(token_map)
    )


def merge_by_map(x: Tensor, size: Optional[Tensor], token_map: Tensor, rows: int, mode: str):
    """The merge of any plan as differentiable PyTorch ops over its token map: (x_out,
    size_out) for "wavg", x_out for "sum", "mean", "amax" and "amin". A row with a single
    member is that member's row, copied exactly."""
    B, _, C = x.shape
    index = token_map[..., None]
    if mode in ("amax", "amin"):
        return x.new_zeros(B, rows, C).scatter_reduce(1, index.expand(-1, -1, C), x, mode, include_self=False)
    acc = torch.promote_types(bipartite._accumulation_dtype(x.dtype), bipartite.size_dtype(size))
    s = x.new_ones(*x.shape[:2], 1, dtype=acc) if size is None or mode != "wavg" else size.to(acc)
    total = s.new_zeros(B, rows, 1).scatter_add(1, index, s)
    weighted = x.to(acc) * s if mode == "wavg" else x.to(acc)
    num = weighted.new_zeros(B, rows, C).scatter_add(1, index.expand(-1, -1, C), weighted)
    if mode == "sum":
        return num.to(x.dtype)
    x_out = (num / total).to(x.dtype)
    if mode == "wavg":
        # x * s / s can be an ulp off x: a token alone in its row is copied instead.
        alone = (group_sizes(token_map, rows) == 1)[..., None]
        copied = x.new_zeros(B, rows, C).scatter(1, index.expand(-1, -1, C), x)
        x_out = torch.where(alone, copied, x_out)
        return x_out, total.to(bipartite.size_dtype(size))
    return x_out


def merge_wavg(plan: Partition, x: Tensor, size: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if plan.r == 0:
        return bipartite.merge_wavg(plan, x, size)
    return merge_by_map(x, size, plan.token_map, x.shape[1] - plan.r, "wavg")


def merge(plan: Partition, x: Tensor, mode: str) -> Tensor:
    if plan.r == 0:
        return x
    if mode not in bipartite.MERGE_MODES:
        raise ValueError(f"mode must be one of {bipartite.MERGE_MODES}, got {mode!r}")
    return merge_by_map(x, None, plan.token_map, x.shape[1] - plan.r, mode)
