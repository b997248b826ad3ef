"""The one-pass Triton kernel: one program matches, selects and merges a whole batch row.

It runs the same phases as the multi-kernel path (``match.py``, ``layout.py``,
``merge.py``) in a single launch, looping over the row's tiles itself, with a barrier
between phases (each phase reads what the previous one wrote to the row's scratch). It
wins where there are many short rows: one launch instead of four, and each row's tokens
stay in this SM's cache from matching to merging. Long rows with a small batch leave most
of the GPU idle this way and take the multi-kernel path instead (see ``launch.py``).
"""

import triton
import triton.language as tl

from .layout import layout_row
from .match import match_tile, rank_tile
from .merge import WAVG, merge_rows


# Counts and small tensors' strides: a 1 or a multiple of 16 there widens no load, and would
# be one more compilation each (docs/triton.md, "Compilations").
@triton.jit(do_not_specialize=["ss_b", "scratch_stride", "r", "N", "Na", "Nb", "H"])
def one_pass_kernel(
    metric_ptr, sm_b, sm_h, sm_n, sm_d,
    x_ptr, sx_b, sx_n, sx_c, size_ptr, ss_b, ss_n, out_ptr, size_out_ptr,
    best_ptr, scratch_ptr, scratch_stride,
    src_idx_ptr, dst_idx_ptr, unm_idx_ptr, token_map_ptr, members_ptr, row_start_ptr,
    r, N, Na, Nb, H, D, C,
    IS_KEYS: tl.constexpr, CLASS: tl.constexpr, DISTILL: tl.constexpr,
    HAS_SIZE: tl.constexpr, WRITE_INDICES: tl.constexpr, DO_MERGE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    for i_tile in range(0, tl.cdiv(Na, BLOCK_A)):
        match_tile(
            metric_ptr, sm_b, sm_h, sm_n, sm_d, best_ptr, scratch_ptr, scratch_stride, b, i_tile,
            Na, Nb, H, D, IS_KEYS, DISTILL, BLOCK_A, BLOCK_B, BLOCK_D,
        )
    tl.debug_barrier()
    for i_tile in range(0, tl.cdiv(Na, BLOCK_I)):
        rank_tile(best_ptr, scratch_ptr, scratch_stride, b, i_tile, Na, CLASS, BLOCK_I, BLOCK_K)
    tl.debug_barrier()
    layout_row(
        scratch_ptr, scratch_stride, src_idx_ptr, dst_idx_ptr, unm_idx_ptr, token_map_ptr, members_ptr,
        row_start_ptr, b, r, N, Na, Nb, CLASS, DISTILL, WRITE_INDICES, BLOCK_L,
    )
    if DO_MERGE:
        tl.debug_barrier()
        for o_tile in range(0, tl.cdiv(N - r, BLOCK_R)):
            merge_rows(
                x_ptr, sx_b, sx_n, sx_c, size_ptr, ss_b, ss_n, out_ptr, size_out_ptr, members_ptr,
                row_start_ptr, b, o_tile, N, N - r, C, WAVG, HAS_SIZE, BLOCK_R, BLOCK_C,
            )
