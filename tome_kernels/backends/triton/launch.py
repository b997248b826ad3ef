"""Launchers of the Triton kernels: allocate outputs and scratch, pick block sizes, launch.

No input checking (the public API has done it before anything gets here) and no autograd
(``ops.py``). Every launcher works for B = 0 (nothing is launched) and for non-contiguous
inputs (kernels take strides); outputs are contiguous.
"""

from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from .fused import one_pass_kernel
from .layout import layout_kernel
from .match import match_kernel, rank_kernel
from .merge import MODE_IDS, merge_bwd_kernel, merge_kernel, merge_wavg_bwd_kernel, unmerge_kernel
from .similarity import assign_kernel, energy_kernel

# Rows of at most this many tokens take the one-pass kernel (match, select and merge in one
# program per row). Provisional: chosen from the kernels' structure (at most two 64-token
# tiles of A and two of B per row, which one program loops over), not yet from a measured
# crossover; the benchmark providers "triton_one_pass" and "triton_multi_kernel" measure
# both paths on a GPU.
ONE_PASS_MAX_TOKENS = 256


def use_one_pass(num_tokens: int) -> bool:
    return num_tokens <= ONE_PASS_MAX_TOKENS


# Block sizes are constants, not derived from each call's shape: each distinct value is one
# more Triton compilation (seconds of CPU per kernel variant on a GPU run), and rows of 64
# tokens and chunks of 16 features suit every size from the tests' few tokens to ViT and
# Stable Diffusion rows; a tile larger than a small input only masks its tail.
TOKEN_BLOCK = 64
RANK_BLOCK = 128
FEATURE_BLOCK = 16
# Merge tiles: 256 contiguous channels of 8 rows; for rows of at most 64 channels, whose
# 256-wide tile would be mostly masked off, 64 channels of 16 rows (16 x 128 spilled in the
# weighted merge's backward).
MERGE_BLOCKS = dict(BLOCK_R=8, BLOCK_C=256)
NARROW_MERGE_BLOCKS = dict(BLOCK_R=16, BLOCK_C=64)

# Warps per program. The kernels that multiply 64 x 64 tiles of scores (matching, the
# similarity kernels, the one-pass kernel) take 8: a thread then holds a 4 x 4 block of scores
# and the operands of one 16-feature chunk in registers, where with 4 warps, or whole rows of
# features, ptxas spilled (docs/triton.md, "Registers and spills"). Gathers and bookkeeping
# take 4.
SCORE_WARPS = 8
WARPS = 4


def _metric_layout(metric: Tensor):
    """Strides (batch, head, token, feature), heads and feature size of a metric or keys."""
    if metric.dim() == 4:
        s_b, s_h, s_n, s_d = metric.stride()
        return (s_b, s_h, s_n, s_d), metric.shape[1], metric.shape[3]
    s_b, s_n, s_d = metric.stride()
    return (s_b, 0, s_n, s_d), 1, metric.shape[2]


def _merge_blocks(channels: int):
    return NARROW_MERGE_BLOCKS if channels <= NARROW_MERGE_BLOCKS["BLOCK_C"] else MERGE_BLOCKS


def _row_tiles(batch: int, rows: int, channels: int):
    """Grid, tiles per batch row and launch options of the kernels over (rows, channels)."""
    blocks = _merge_blocks(channels)
    tiles = triton.cdiv(rows, blocks["BLOCK_R"])
    return (batch * tiles,), tiles, dict(blocks, num_warps=WARPS)


def _size_args(size: Optional[Tensor], fallback: Tensor):
    if size is None:
        return fallback, 0, 0
    return size, size.stride(0), size.stride(1)


def _matching(
    metric: Tensor, r: int, class_token: bool, distill_token: bool, one_pass: bool, write_indices: bool,
    x: Optional[Tensor] = None, size: Optional[Tensor] = None,
):
    """Match (and, given x, merge in the one-pass kernel). Returns the index outputs, the
    groups (members, row_start) and, given x, (x_out, size_out)."""
    B, N = metric.shape[0], metric.shape[-2]
    Na, Nb = (N + 1) // 2, N // 2
    dev = metric.device
    index = dict(dtype=torch.long, device=dev)
    if write_indices:
        src_idx, dst_idx = torch.empty(B, r, **index), torch.empty(B, r, **index)
        unm_idx, token_map = torch.empty(B, Na - r, **index), torch.empty(B, N, **index)
    members = torch.empty(B, N, dtype=torch.int32, device=dev)
    row_start = torch.empty(B, N - r + 1, dtype=torch.int32, device=dev)
    if not write_indices:
        # Never written with WRITE_INDICES=False; any valid pointer will do.
        src_idx = dst_idx = unm_idx = token_map = members
    merged = None
    if x is not None:
        C = x.shape[2]
        merged = (torch.empty(B, N - r, C, dtype=x.dtype, device=dev),
                  torch.empty(B, N - r, 1, dtype=torch.float32, device=dev))
    if B == 0:
        return (src_idx, dst_idx, unm_idx, token_map), (members, row_start), merged

    # Per row: best score (float32), and rank, dst, pos, and per-B count / start (int32).
    best = torch.empty(B, Na, dtype=torch.float32, device=dev)
    scratch = torch.empty(B, 3 * Na + Nb, dtype=torch.int32, device=dev)
    strides, H, D = _metric_layout(metric)
    idx_args = (src_idx, dst_idx, unm_idx, token_map, members, row_start)

    if one_pass:
        if x is None:
            # Not merging: the merge blocks are unused, the wide ones keep to one compilation.
            x_args, C, merge_blocks = (metric, 0, 0, 0, metric, 0, 0, best, best), 0, MERGE_BLOCKS
        else:
            C = x.shape[2]
            x_args = (x, *x.stride()) + _size_args(size, x) + merged
            merge_blocks = _merge_blocks(C)
        one_pass_kernel[(B,)](
            metric, *strides, *x_args, best, scratch, scratch.stride(0), *idx_args,
            r, N, Na, Nb, H, D, C,
            IS_KEYS=metric.dim() == 4, CLASS=class_token, DISTILL=distill_token,
            HAS_SIZE=size is not None, WRITE_INDICES=write_indices, DO_MERGE=x is not None,
            BLOCK_A=TOKEN_BLOCK, BLOCK_B=TOKEN_BLOCK, BLOCK_D=FEATURE_BLOCK, BLOCK_I=TOKEN_BLOCK, BLOCK_K=RANK_BLOCK,
            BLOCK_L=TOKEN_BLOCK, **merge_blocks, num_warps=SCORE_WARPS,
        )
        return idx_args[:4], (members, row_start), merged

    tiles = triton.cdiv(Na, TOKEN_BLOCK)
    match_kernel[(B * tiles,)](
        metric, *strides, best, scratch, scratch.stride(0), Na, Nb, H, D, tiles,
        IS_KEYS=metric.dim() == 4, DISTILL=distill_token,
        BLOCK_A=TOKEN_BLOCK, BLOCK_B=TOKEN_BLOCK, BLOCK_D=FEATURE_BLOCK, num_warps=SCORE_WARPS,
    )
    rank_kernel[(B * tiles,)](
        best, scratch, scratch.stride(0), Na, tiles, CLASS=class_token, BLOCK_I=TOKEN_BLOCK,
        BLOCK_K=RANK_BLOCK, num_warps=WARPS,
    )
    layout_kernel[(B,)](
        scratch, scratch.stride(0), *idx_args, r, N, Na, Nb,
        CLASS=class_token, DISTILL=distill_token, WRITE_INDICES=write_indices,
        BLOCK=TOKEN_BLOCK, num_warps=WARPS,
    )
    if x is not None:
        merge(x, size, members, row_start, "wavg", out=merged)
    return idx_args[:4], (members, row_start), merged


def match(metric: Tensor, r: int, class_token: bool, distill_token: bool, one_pass: bool):
    """(src_idx, dst_idx, unm_idx, token_map, members, row_start) for 0 < r <= clamp."""
    indices, groups, _ = _matching(metric, r, class_token, distill_token, one_pass, True)
    return indices + groups


def bipartite_merge(
    x: Tensor, metric: Tensor, size: Optional[Tensor], r: int, class_token: bool, distill_token: bool, one_pass: bool
):
    """(x_out, size_out, members, row_start): the weighted merge straight from the metric."""
    _, groups, merged = _matching(metric, r, class_token, distill_token, one_pass, False, x, size)
    return merged + groups


def merge(
    x: Tensor, size: Optional[Tensor], members: Tensor, row_start: Tensor, mode: str,
    out: Optional[Tuple[Tensor, Tensor]] = None,
):
    """(x_out, size_out) for mode "wavg"; (x_out, empty) for "sum", "mean", "amax", "amin"."""
    B, N, C = x.shape
    n_out = row_start.shape[1] - 1
    if out is None:
        size_out = x.new_empty((B, n_out, 1) if mode == "wavg" else (0,), dtype=torch.float32)
        out = (torch.empty(B, n_out, C, dtype=x.dtype, device=x.device), size_out)
    if B == 0:
        return out
    grid, tiles, options = _row_tiles(B, n_out, C)
    merge_kernel[grid](
        x, *x.stride(), *_size_args(size, x), *out, members, row_start, N, n_out, C, tiles,
        MODE=MODE_IDS[mode], HAS_SIZE=size is not None, **options,
    )
    return out


def merge_wavg_backward(
    grad_out: Tensor, grad_size_out: Tensor, x: Tensor, size: Optional[Tensor], members: Tensor,
    row_start: Tensor, size_grad: bool,
):
    """(grad_x (B, N, C) in x's dtype, grad_size (B, N, 1) in size's dtype, or empty)."""
    B, N, C = x.shape
    n_out = row_start.shape[1] - 1
    size_grad = size_grad and size is not None
    grad_x = torch.empty(B, N, C, dtype=x.dtype, device=x.device)
    grad_size = torch.empty((B, N, 1) if size_grad else (0,), dtype=size.dtype if size_grad else torch.float32,
                            device=x.device)
    if B == 0:
        return grad_x, grad_size
    grid, tiles, options = _row_tiles(B, n_out, C)
    merge_wavg_bwd_kernel[grid](
        grad_out, *grad_out.stride(), grad_size_out, grad_size_out.stride(0), grad_size_out.stride(1),
        x, *x.stride(), *_size_args(size, x), grad_x, grad_size if size_grad else grad_x,
        members, row_start, N, n_out, C, tiles,
        HAS_SIZE=size is not None, SIZE_GRAD=size_grad, **options,
    )
    return grad_x, grad_size


def merge_backward(grad_out: Tensor, x: Tensor, y: Tensor, members: Tensor, row_start: Tensor, mode: str) -> Tensor:
    """grad_x (B, N, C) of merge(x, mode) = y, for the unweighted modes."""
    B, N, C = x.shape
    n_out = row_start.shape[1] - 1
    grad_x = torch.empty(B, N, C, dtype=x.dtype, device=x.device)
    if B == 0:
        return grad_x
    grid, tiles, options = _row_tiles(B, n_out, C)
    merge_bwd_kernel[grid](
        grad_out, *grad_out.stride(), x, *x.stride(), y.contiguous(), grad_x, members, row_start, N, n_out, C, tiles,
        MODE=MODE_IDS[mode], **options,
    )
    return grad_x


def unmerge(y: Tensor, token_map: Tensor) -> Tensor:
    """(B, N, C): every input token's output row, gathered from y (B, N - r, C)."""
    B, n_out, C = y.shape
    N = token_map.shape[1]
    out = torch.empty(B, N, C, dtype=y.dtype, device=y.device)
    if B == 0:
        return out
    grid, tiles, options = _row_tiles(B, N, C)
    unmerge_kernel[grid](y, *y.stride(), token_map.contiguous(), out, N, n_out, C, tiles, **options)
    return out


def _similarity_launch(metric: Tensor):
    """Grid, tiles per batch row, metric arguments and options of the similarity kernels."""
    B, N = metric.shape[0], metric.shape[-2]
    strides, H, D = _metric_layout(metric)
    tiles = triton.cdiv(N, TOKEN_BLOCK)
    options = dict(
        IS_KEYS=metric.dim() == 4, BLOCK_I=TOKEN_BLOCK, BLOCK_J=TOKEN_BLOCK, BLOCK_D=FEATURE_BLOCK,
        num_warps=SCORE_WARPS,
    )
    return (B * tiles,), tiles, (metric, *strides), (N, H, D, tiles), options


def assign(metric: Tensor, roles: Tensor, window: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(best (B, N) float32, dst (B, N) int64): each source's best destination."""
    B, N = metric.shape[0], metric.shape[-2]
    best = torch.empty(B, N, dtype=torch.float32, device=metric.device)
    dst = torch.empty(B, N, dtype=torch.long, device=metric.device)
    if B == 0 or N == 0:
        return best, dst
    grid, _, metric_args, sizes, options = _similarity_launch(metric)
    # A (1, N) roles or window tensor is shared by the whole batch: batch stride 0.
    roles = roles.expand(B, N)
    window_args = (roles, 0, 0) if window is None else (window, *window.expand(B, N).stride())
    assign_kernel[grid](
        *metric_args, roles, *roles.stride(), *window_args, best, dst, *sizes,
        HAS_WINDOW=window is not None, **options,
    )
    return best, dst


def energy(metric: Tensor, margin: float, alpha: float, form: int) -> Tensor:
    """(B, N) float32 PiToMe energy of every token, f of the form with code ``form``
    (``energy.FORMS.index(name)``)."""
    B, N = metric.shape[0], metric.shape[-2]
    out = torch.empty(B, N, dtype=torch.float32, device=metric.device)
    if B == 0 or N == 0:
        return out
    grid, _, metric_args, sizes, options = _similarity_launch(metric)
    # sigma = 1 - margin in double, then rounded to float32 as the kernel's argument: the
    # reference's Python-float `1.0 - margin`, rounded to float32 where it divides.
    sigma = 1.0 - float(margin)
    energy_kernel[grid](*metric_args, out, float(margin), float(alpha), sigma, *sizes, FORM=form, **options)
    return out
