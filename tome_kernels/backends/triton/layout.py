"""Triton kernel for the selection's bookkeeping: from ranks to every index the merge needs.

Given each A token's rank and destination (``match.py``), one program per batch row writes,
without any host synchronisation:

- the plan's index tensors: ``src_idx`` (B, r), ``dst_idx`` (B, r), ``unm_idx`` (B, Na - r)
  and ``token_map`` (B, N), all int64 (skipped with ``WRITE_INDICES=False``);
- the groups of the merge as a compressed list: output row o gathers the input tokens
  ``members[row_start[o]:row_start[o + 1]]`` (int32, a kept A token alone, a B token
  followed by its sources in A-index order). The merge kernels only ever gather through
  it, so they need no atomics and are deterministic.

The row walks its tokens in blocks, in order, carrying running counts from block to block;
the work is O(N) per row. Scratch, per batch row (int32): rank [0, Na), dst [Na, 2 Na),
pos [2 Na, 3 Na), and per B token its source count, later its group start, [3 Na, 3 Na + Nb).
"""

import triton
import triton.language as tl


@triton.jit
def _b_rows(o_j, n_unm, DISTILL: tl.constexpr):
    """Output row of B tokens ``o_j``: after the kept A tokens, but the distill token is row 1."""
    row = n_unm + o_j
    if DISTILL:
        row = tl.where(o_j == 0, 1, row)
    return row


@triton.jit
def _a_block(p_rank, p_dst, o_i, r, Na):
    """Rank and destination of A tokens ``o_i``, and which are sources and which are kept."""
    m_i = o_i < Na
    rank = tl.load(p_rank + o_i, mask=m_i, other=0)
    dst = tl.load(p_dst + o_i, mask=m_i, other=0)
    return m_i, rank, dst, m_i & (rank < r), m_i & (rank >= r)


@triton.jit
def layout_row(
    scratch_ptr, scratch_stride,
    src_idx_ptr, dst_idx_ptr, unm_idx_ptr, token_map_ptr, members_ptr, row_start_ptr,
    b, r, N, Na, Nb,
    CLASS: tl.constexpr, DISTILL: tl.constexpr, WRITE_INDICES: tl.constexpr, BLOCK: tl.constexpr,
):
    b64 = b.to(tl.int64)
    n_unm = Na - r
    n_out = N - r
    p_rank = scratch_ptr + b64 * scratch_stride
    p_dst = p_rank + Na
    p_pos = p_rank + 2 * Na
    p_cnt = p_rank + 3 * Na
    ar = tl.arange(0, BLOCK)

    for j0 in range(0, Nb, BLOCK):
        tl.store(p_cnt + j0 + ar, tl.zeros((BLOCK,), tl.int32), mask=j0 + ar < Nb)
    tl.debug_barrier()

    # Pass 1, A tokens in index order. A source's slot in its group = sources already
    # counted for its destination + earlier sources of this block with the same one. A kept
    # token's position among the kept: its rank - r, or with a class token its index order.
    kept_before = tl.zeros((), tl.int32)
    for i0 in range(0, Na, BLOCK):
        o_i = i0 + ar
        m_i, rank, dst, src, kept = _a_block(p_rank, p_dst, o_i, r, Na)
        same = src[:, None] & src[None, :] & (dst[:, None] == dst[None, :])
        slot = tl.load(p_cnt + dst, mask=src, other=0)
        slot += tl.sum((same & (ar[None, :] < ar[:, None])).to(tl.int32), axis=1)
        last_of_dst = src & (tl.sum((same & (ar[None, :] > ar[:, None])).to(tl.int32), axis=1) == 0)
        if CLASS:
            k = kept.to(tl.int32)
            upos = kept_before + tl.cumsum(k, axis=0) - k
            kept_before += tl.sum(k, axis=0)
        else:
            upos = rank - r
        tl.store(p_pos + o_i, tl.where(src, slot, upos), mask=m_i)
        if WRITE_INDICES:
            tl.store(src_idx_ptr + b64 * r + rank, o_i.to(tl.int64), mask=src)
            tl.store(dst_idx_ptr + b64 * r + rank, dst.to(tl.int64), mask=src)
            tl.store(unm_idx_ptr + b64 * n_unm + upos, o_i.to(tl.int64), mask=kept)
        # Every thread has read the old counts before any is overwritten, and the new
        # counts are visible before the next block reads them.
        tl.debug_barrier()
        tl.store(p_cnt + dst, slot + 1, mask=last_of_dst)
        tl.debug_barrier()

    # With a distill token, the kept A tokens after the first start after B token 0's group.
    cnt0 = tl.load(p_cnt)
    tl.debug_barrier()

    # Pass 2, B tokens: rows and group starts (an exclusive running sum of the counts, which
    # are replaced by the starts in place); each B token leads its own group.
    sources_before = tl.zeros((), tl.int32)
    for j0 in range(0, Nb, BLOCK):
        o_j = j0 + ar
        m_j = o_j < Nb
        cnt = tl.load(p_cnt + o_j, mask=m_j, other=0)
        row = _b_rows(o_j, n_unm, DISTILL)
        start = n_unm + o_j + sources_before + tl.cumsum(cnt, axis=0) - cnt
        if DISTILL:
            start = tl.where(o_j == 0, 1, start)
        sources_before += tl.sum(cnt, axis=0)
        tl.store(p_cnt + o_j, start, mask=m_j)
        tl.store(members_ptr + b64 * N + start, 2 * o_j + 1, mask=m_j)
        tl.store(row_start_ptr + b64 * (n_out + 1) + row, start, mask=m_j)
        if WRITE_INDICES:
            tl.store(token_map_ptr + b64 * N + 2 * o_j + 1, row.to(tl.int64), mask=m_j)
    tl.debug_barrier()

    # Pass 3, A tokens: sources join their destination's group, kept tokens get a row.
    for i0 in range(0, Na, BLOCK):
        o_i = i0 + ar
        m_i, rank, dst, src, kept = _a_block(p_rank, p_dst, o_i, r, Na)
        pos = tl.load(p_pos + o_i, mask=m_i, other=0)
        group_start = tl.load(p_cnt + dst, mask=src, other=0)
        kept_row = pos
        kept_start = pos
        if DISTILL:
            kept_row = tl.where(pos >= 1, pos + 1, pos)
            kept_start = tl.where(pos >= 1, pos + 1 + cnt0, pos)
        tl.store(members_ptr + b64 * N + tl.where(src, group_start + 1 + pos, kept_start), 2 * o_i, mask=m_i)
        tl.store(row_start_ptr + b64 * (n_out + 1) + kept_row, kept_start, mask=kept)
        if WRITE_INDICES:
            row = tl.where(src, _b_rows(dst, n_unm, DISTILL), kept_row)
            tl.store(token_map_ptr + b64 * N + 2 * o_i, row.to(tl.int64), mask=m_i)
    tl.store(row_start_ptr + b64 * (n_out + 1) + n_out, N)


# Counts and small tensors' strides: a 1 or a multiple of 16 there widens no load, and would
# be one more compilation each (docs/triton.md, "Compilations").
@triton.jit(do_not_specialize=["scratch_stride", "r", "N", "Na", "Nb"])
def layout_kernel(
    scratch_ptr, scratch_stride,
    src_idx_ptr, dst_idx_ptr, unm_idx_ptr, token_map_ptr, members_ptr, row_start_ptr,
    r, N, Na, Nb,
    CLASS: tl.constexpr, DISTILL: tl.constexpr, WRITE_INDICES: tl.constexpr, BLOCK: tl.constexpr,
):
    layout_row(
        scratch_ptr, scratch_stride, src_idx_ptr, dst_idx_ptr, unm_idx_ptr, token_map_ptr, members_ptr,
        row_start_ptr, tl.program_id(0), r, N, Na, Nb, CLASS, DISTILL, WRITE_INDICES, BLOCK,
    )
