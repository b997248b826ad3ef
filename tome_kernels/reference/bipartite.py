"""The merge contract (docs/semantics.md) in plain, device-agnostic PyTorch.

This is the executable form of the contract: the fallback backend, the tests and the
benchmarks all import it, and every fast backend is tested against it. It is differentiable
in ``x`` and ``size``; the matching itself produces indices and is not.

The functions here assume valid inputs; the public API (``tome_kernels.api``) checks them
first. Shapes: ``x`` (B, N, C); ``metric`` (B, N, D) or keys (B, H, N, Dh); ``size``
(B, N, 1). A tokens are the even positions 0, 2, 4, ... (Na = ceil(N/2) of them), B tokens
the odd positions (Nb = floor(N/2)).
"""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

# A zero metric row stays zero after normalisation instead of becoming NaN.
NORM_EPS = 1e-12
MERGE_MODES = ("sum", "mean", "amax", "amin")


class MatchResult(NamedTuple):
    """The decisions of one bipartite matching: int64 index tensors on the metric's device.

    ``src_idx`` (B, r): A-index of each merged-away token, in rank order.
    ``dst_idx`` (B, r): B-index each of those tokens merges into.
    ``unm_idx`` (B, Na - r): A-index of each kept A token, in output order.
    ``token_map`` (B, N): output row of every input token.
    ``groups``: how a backend that made this result stores the groups for its merge kernels
    (the Triton backend's ``(members, row_start)``), or None; other backends ignore it.
    """

    r: int
    src_idx: Tensor
    dst_idx: Tensor
    unm_idx: Tensor
    token_map: Tensor
    class_token: bool
    distill_token: bool
    groups: Optional[Tuple[Tensor, Tensor]] = None


def clamp_r(r: int, n: int, class_token: bool = False, distill_token: bool = False) -> int:
    """The number of tokens actually removed from N: at most half of the unprotected ones."""
    protected = int(class_token) + int(distill_token)
    r = min(int(r), (n - protected) // 2)
    # With a distill token but no class token and N = 3, the only B token is the distill
    # token, which nothing may merge into: there is no destination at all.
    if distill_token and n < 4:
        r = 0
    return max(r, 0)


def score_dtype(metric: Tensor) -> torch.dtype:
    """Scoring is float32; float64 inputs keep float64 so gradcheck-style tests stay exact."""
    return torch.float64 if metric.dtype == torch.float64 else torch.float32


def normalized_metric(metric: Tensor) -> Tensor:
    """(B, N, D) unit-norm rows in the scoring dtype; keys (B, H, N, Dh) are head-averaged."""
    m = metric.to(score_dtype(metric))
    if m.dim() == 4:
        m = m.mean(dim=1)
    return m / m.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _ieee_float32_products() -> bool:
    """Whether float32 matrix products are IEEE (the matmul precision "highest")."""
    return torch.get_float32_matmul_precision() == "highest"


# torch.compile cannot trace a function returning a str: dynamo runs this one at trace time
# and keeps its answer as a constant (as ``torch.compiler.assume_constant_result`` would,
# without importing torch._dynamo here: see ``backends.registry._constant_under_compile``).
_ieee_float32_products._dynamo_marked_constant = True


def similarity(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b^T`` of unit rows in the scoring dtype, at IEEE precision whatever
    ``torch.set_float32_matmul_precision`` says.

    A precision other than "highest" lets PyTorch compute float32 products in TF32 on CUDA
    (and, where oneDNN offers it, bfloat16 on CPU): scores with a 10-bit mantissa, hence other
    decisions than the contract's float32 ones. Then the products are made in float64 and
    rounded once to float32, as exact as a float32 accumulation or more (docs/semantics.md,
    "Ambient modes")."""
    if a.dtype == torch.float32 and not _ieee_float32_products():
        return (a.double() @ b.double().transpose(-1, -2)).float()
    return a @ b.transpose(-1, -2)


def output_rows(n_unm: int, n_b: int, distill_token: bool, device) -> Tuple[Tensor, Tensor]:
    """Output row of each kept A token (in output order) and of each B token."""
    unm_rows = torch.arange(n_unm, device=device)
    b_rows = torch.arange(n_unm, n_unm + n_b, device=device)
    if distill_token:
        # Layout [first kept A (the class token), distill token (B 0), other kept A, other B].
        unm_rows[1:] += 1
        b_rows[0] = 1
    return unm_rows, b_rows


def identity_match(metric: Tensor, class_token: bool, distill_token: bool) -> MatchResult:
    """The "no merge" result: every token keeps its own row."""
    b, n = metric.shape[0], metric.shape[-2]
    device = metric.device
    empty = torch.empty(b, 0, dtype=torch.long, device=device)
    unm_idx = torch.arange((n + 1) // 2, device=device).expand(b, -1)
    # A real (B, N) tensor, not an expanded view: callers may write to or compose it.
    token_map = torch.arange(n, device=device).repeat(b, 1)
    return MatchResult(0, empty, empty, unm_idx, token_map, class_token, distill_token)


@torch.no_grad()
def match(metric: Tensor, r: int, class_token: bool = False, distill_token: bool = False) -> MatchResult:
    """Bipartite soft matching: which A tokens merge away, and into which B token."""
    n = metric.shape[-2]
    r = clamp_r(r, n, class_token, distill_token)
    if r == 0:
        return identity_match(metric, class_token, distill_token)

    m = normalized_metric(metric)
    a, b = m[:, ::2], m[:, 1::2]
    scores = similarity(a, b)
    # NaN never wins a max: it ranks with -inf.
    scores = scores.masked_fill(scores.isnan(), float("-inf"))
    if distill_token:
        scores[..., 0] = float("-inf")
    # torch.max returns the first maximal index, which is the contract's lowest-j tie rule.
    best, dst = scores.max(dim=-1)
    if distill_token:
        # Column 0 is not a candidate at all: a row with nothing finite goes to column 1.
        dst = dst.masked_fill(best == float("-inf"), 1)

    if class_token:
        # The class token (A 0) is protected: it ranks after every other A token, so even an
        # all -inf row ties no earlier than it and it is never chosen as a source.
        rest = torch.sort(best[:, 1:], dim=1, descending=True, stable=True).indices + 1
        order = torch.cat([rest, torch.zeros_like(rest[:, :1])], dim=1)
    else:
        order = torch.sort(best, dim=1, descending=True, stable=True).indices
    src_idx, unm_idx = order[:, :r], order[:, r:]
    if class_token:
        unm_idx = unm_idx.sort(dim=1).values
    dst_idx = dst.gather(1, src_idx)

    n_unm, n_b = unm_idx.shape[1], b.shape[1]
    unm_rows, b_rows = output_rows(n_unm, n_b, distill_token, metric.device)
    a_rows = torch.empty_like(order)
    a_rows.scatter_(1, unm_idx, unm_rows.expand_as(unm_idx))
    a_rows.scatter_(1, src_idx, b_rows[dst_idx])
    token_map = torch.empty(metric.shape[0], n, dtype=torch.long, device=metric.device)
    token_map[:, ::2] = a_rows
    token_map[:, 1::2] = b_rows
    return MatchResult(r, src_idx, dst_idx, unm_idx, token_map, class_token, distill_token)


def _gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def _assemble(unm: Tensor, b: Tensor, distill_token: bool) -> Tensor:
    """Concatenate kept A rows and B rows in the contract's output layout."""
    if distill_token:
        return torch.cat([unm[:, :1], b[:, :1], unm[:, 1:], b[:, 1:]], dim=1)
    return torch.cat([unm, b], dim=1)


def _group_reduce(plan: MatchResult, t: Tensor, reduce: str = "sum") -> Tensor:
    """For each B token, ``reduce`` over its own row and the rows of every source merging into it."""
    sources = _gather_rows(t[:, ::2], plan.src_idx)
    index = plan.dst_idx.unsqueeze(-1).expand(-1, -1, t.shape[-1])
    return t[:, 1::2].scatter_reduce(1, index, sources, reduce=reduce, include_self=True)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def size_dtype(size: Optional[Tensor]) -> torch.dtype:
    """Sizes come back in float32 unless they were given in float64."""
    return torch.float64 if size is not None and size.dtype == torch.float64 else torch.float32


def merge_wavg(plan: MatchResult, x: Tensor, size: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Size-weighted average of each group; returns (x_merged, size_merged)."""
    out_size_dtype = size_dtype(size)
    if size is None:
        size = torch.ones(*x.shape[:2], 1, dtype=out_size_dtype, device=x.device)
    if plan.r == 0:
        return x, size.to(out_size_dtype)

    acc = torch.promote_types(_accumulation_dtype(x.dtype), out_size_dtype)
    s = size.to(acc)
    total = _group_reduce(plan, s)
    x_b = (_group_reduce(plan, x.to(acc) * s) / total).to(x.dtype)
    # A B token nothing merged into is copied: x * s / s can be an ulp off x.
    alone = _group_reduce(plan, torch.ones_like(s)) == 1
    x_b = torch.where(alone, x[:, 1::2], x_b)
    x_unm = _gather_rows(x[:, ::2], plan.unm_idx)
    s_unm = _gather_rows(s[:, ::2], plan.unm_idx)
    x_out = _assemble(x_unm, x_b, plan.distill_token)
    size_out = _assemble(s_unm, total, plan.distill_token).to(out_size_dtype)
    return x_out, size_out


def merge(plan: MatchResult, x: Tensor, mode: str = "mean") -> Tensor:
    """Reduce each group with ``mode`` in MERGE_MODES; kept A tokens are copied."""
    if plan.r == 0:
        return x
    if mode in ("sum", "mean"):
        acc = _accumulation_dtype(x.dtype)
        x_b = _group_reduce(plan, x.to(acc))
        if mode == "mean":
            ones = torch.ones(*x.shape[:2], 1, dtype=acc, device=x.device)
            x_b = x_b / _group_reduce(plan, ones)
        x_b = x_b.to(x.dtype)
    elif mode in ("amax", "amin"):
        # Max and min are exact in any dtype: no accumulation dtype needed.
        x_b = _group_reduce(plan, x, mode)
    else:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    return _assemble(_gather_rows(x[:, ::2], plan.unm_idx), x_b, plan.distill_token)


def unmerge(plan: MatchResult, y: Tensor) -> Tensor:
    """(B, N - r, C) back to (B, N, C): each input token gets the row it ended in."""
    if plan.r == 0:
        return y
    return _gather_rows(y, plan.token_map)


def bipartite_merge(
    x: Tensor,
    metric: Tensor,
    r: int,
    size: Optional[Tensor] = None,
    class_token: bool = False,
    distill_token: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Match on ``metric`` and merge ``x`` by size-weighted average: the whole ToMe step."""
    plan = match(metric, r, class_token, distill_token)
    return merge_wavg(plan, x, size)
