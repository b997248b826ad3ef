"""A second, deliberately naive statement of the contract, for checking the reference.

Plain Python loops over one batch row at a time, written from docs/semantics.md without
looking at how the reference (tome_kernels/reference/bipartite.py) vectorises it. It shares
only the float32 score computation with the reference (so that both see bitwise the same
scores, ties included) and works in float64 everywhere else.
"""

import math
from typing import List, Optional, Tuple

import torch

from tome_kernels import reference


def expected_r(r: int, n: int, class_token: bool, distill_token: bool) -> int:
    protected = int(class_token) + int(distill_token)
    r = max(0, min(r, (n - protected) // 2))
    # distill without class at N = 3: the single B token is the distill token.
    return 0 if distill_token and n < 4 else r


def scores_of(metric: torch.Tensor) -> torch.Tensor:
    m = reference.normalized_metric(metric)
    return m[:, ::2] @ m[:, 1::2].transpose(-1, -2)


def groups_of_row(scores: torch.Tensor, n: int, r: int, class_token: bool, distill_token: bool) -> List[List[int]]:
    """The output rows of one batch row, each as the list of input tokens merged into it."""
    n_a, n_b = (n + 1) // 2, n // 2
    if r == 0:
        return [[k] for k in range(n)]
    best, dst = [], []
    for i in range(n_a):
        top, arg = -math.inf, None
        for j in range(n_b):
            if distill_token and j == 0:
                continue
            s = float(scores[i, j])
            if not math.isnan(s) and s > top:
                top, arg = s, j
        best.append(top)
        dst.append(arg if arg is not None else (1 if distill_token else 0))
    ranked = sorted((i for i in range(n_a) if not (class_token and i == 0)), key=lambda i: (-best[i], i))
    if class_token:
        ranked.append(0)
    sources, kept = ranked[:r], ranked[r:]
    if class_token:
        kept.sort()
    a_groups = [[2 * i] for i in kept]
    b_groups = [[2 * j + 1] for j in range(n_b)]
    for i in sources:
        b_groups[dst[i]].append(2 * i)
    if distill_token:
        return a_groups[:1] + b_groups[:1] + a_groups[1:] + b_groups[1:]
    return a_groups + b_groups


def oracle_groups(metric, r, class_token=False, distill_token=False) -> Tuple[int, List[List[List[int]]]]:
    n = metric.shape[-2]
    r = expected_r(r, n, class_token, distill_token)
    scores = scores_of(metric)
    return r, [groups_of_row(scores[b], n, r, class_token, distill_token) for b in range(metric.shape[0])]


def token_map_of(groups: List[List[List[int]]], n: int) -> torch.Tensor:
    out = torch.empty(len(groups), n, dtype=torch.long)
    for b, row in enumerate(groups):
        for o, members in enumerate(row):
            for k in members:
                out[b, k] = o
    return out


def merge_groups(groups, x: torch.Tensor, size: Optional[torch.Tensor], mode: str = "wavg"):
    """Reduce x (and sizes) over each group in float64; returns (x_out, size_out)."""
    x64 = x.double()
    s64 = torch.ones(*x.shape[:2], 1, dtype=torch.float64) if size is None else size.double()
    xs, ss = [], []
    for b, row in enumerate(groups):
        x_rows, s_rows = [], []
        for members in row:
            xm, sm = x64[b, members], s64[b, members]
            if mode == "wavg":
                x_rows.append((xm * sm).sum(0) / sm.sum())
            elif mode == "sum":
                x_rows.append(xm.sum(0))
            elif mode == "mean":
                x_rows.append(xm.mean(0))
            elif mode == "amax":
                x_rows.append(xm.amax(0))
            elif mode == "amin":
                x_rows.append(xm.amin(0))
            s_rows.append(sm.sum(0))
        xs.append(torch.stack(x_rows) if x_rows else x64.new_empty(0, x.shape[-1]))
        ss.append(torch.stack(s_rows) if s_rows else x64.new_empty(0, 1))
    if not xs:
        return x64.new_empty(0, 0, x.shape[-1]), x64.new_empty(0, 0, 1)
    return torch.stack(xs), torch.stack(ss)
