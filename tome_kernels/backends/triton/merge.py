"""Triton kernels that apply a matching: merge (every mode), its backward, and unmerge.

All of them walk the output rows of one batch row in tiles of BLOCK_R rows and gather each
row's group ``members[row_start[o]:row_start[o + 1]]`` (see ``layout.py``): every output
element is written by exactly one program in a fixed order, so there are no atomics and the
results are identical run after run. Accumulation is float32; channels stream through in
blocks of BLOCK_C contiguous elements (wide loads when the channel stride is 1).

A row with a single member (a kept token, or a destination nothing merged into) is copied
exactly, as in the reference; any other row is a group reduction. Divisions round to nearest
(``tl.div_rn``, which wants operands of one shape: hence the broadcasts), as the reference's
do: docs/semantics.md, "Arithmetic".
"""

import triton
import triton.language as tl

# Modes of merge_rows / merge_bwd_rows (tome_kernels.reference.MERGE_MODES plus the weighted one).
WAVG: tl.constexpr = tl.constexpr(0)
SUM: tl.constexpr = tl.constexpr(1)
MEAN: tl.constexpr = tl.constexpr(2)
AMAX: tl.constexpr = tl.constexpr(3)
AMIN: tl.constexpr = tl.constexpr(4)
MODE_IDS = {"wavg": 0, "sum": 1, "mean": 2, "amax": 3, "amin": 4}


@triton.jit
def _groups(members_ptr, row_start_ptr, b64, o_tile, N, n_out, BLOCK_R: tl.constexpr):
    """Rows of this tile, their group start and size, and whether each is a plain copy."""
    o_r = o_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < n_out
    p_start = row_start_ptr + b64 * (n_out + 1) + o_r
    start = tl.load(p_start, mask=m_r, other=0)
    count = tl.load(p_start + 1, mask=m_r, other=0) - start
    copy = count == 1
    return o_r, m_r, start, count, copy


@triton.jit
def _member(members_ptr, b64, N, start, count, m_r, k):
    """Token index of each row's k-th group member, and which rows have one."""
    m_k = m_r & (k < count)
    return tl.load(members_ptr + b64 * N + start + k, mask=m_k, other=0).to(tl.int64), m_k


@triton.jit
def _sizes(size_ptr, ss_b, ss_n, b64, tok, m_k, HAS_SIZE: tl.constexpr):
    if HAS_SIZE:
        return tl.load(size_ptr + b64 * ss_b + tok * ss_n, mask=m_k, other=0.0).to(tl.float32)
    return m_k.to(tl.float32)


@triton.jit
def _group_sizes(members_ptr, size_ptr, ss_b, ss_n, b64, N, start, count, m_r, HAS_SIZE: tl.constexpr):
    """sum(size) over each row's group, float32."""
    total = tl.zeros(start.shape, tl.float32)
    for k in range(0, tl.max(count, axis=0)):
        tok, m_k = _member(members_ptr, b64, N, start, count, m_r, k)
        total += _sizes(size_ptr, ss_b, ss_n, b64, tok, m_k, HAS_SIZE)
    # Padding rows (never stored) divide by 1 rather than 0.
    return tl.where(m_r, total, 1.0)


@triton.jit
def merge_rows(
    x_ptr, sx_b, sx_n, sx_c, size_ptr, ss_b, ss_n, out_ptr, size_out_ptr, members_ptr, row_start_ptr,
    b, o_tile, N, n_out, C,
    MODE: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[o] = reduction of x over row o's group; with WAVG also size_out[o] = sum(size)."""
    b64 = b.to(tl.int64)
    o_r, m_r, start, count, copy = _groups(members_ptr, row_start_ptr, b64, o_tile, N, n_out, BLOCK_R)
    max_count = tl.max(count, axis=0)
    if MODE == WAVG:
        total = _group_sizes(members_ptr, size_ptr, ss_b, ss_n, b64, N, start, count, m_r, HAS_SIZE)
        tl.store(size_out_ptr + b64 * n_out + o_r, total, mask=m_r)
    tok0, m_0 = _member(members_ptr, b64, N, start, count, m_r, 0)
    s0 = _sizes(size_ptr, ss_b, ss_n, b64, tok0, m_0, HAS_SIZE)
    x_b = x_ptr + b64 * sx_b
    out_b = out_ptr + b64 * n_out * C
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        # Every row has at least one member: start the reduction with it.
        x0 = tl.load(x_b + tok0[:, None] * sx_n + o_c[None, :] * sx_c, mask=m_0[:, None] & m_c[None, :], other=0.0)
        x0 = x0.to(tl.float32)
        acc = x0
        if MODE == WAVG:
            acc = x0 * s0[:, None]
        for k in range(1, max_count):
            tok, m_k = _member(members_ptr, b64, N, start, count, m_r, k)
            xk = tl.load(x_b + tok[:, None] * sx_n + o_c[None, :] * sx_c, mask=m_k[:, None] & m_c[None, :], other=0.0)
            xk = xk.to(tl.float32)
            if MODE == WAVG:
                acc += xk * _sizes(size_ptr, ss_b, ss_n, b64, tok, m_k, HAS_SIZE)[:, None]
            elif MODE == AMAX:
                acc = tl.where(m_k[:, None], tl.maximum(acc, xk, propagate_nan=tl.PropagateNan.ALL), acc)
            elif MODE == AMIN:
                acc = tl.where(m_k[:, None], tl.minimum(acc, xk, propagate_nan=tl.PropagateNan.ALL), acc)
            else:
                acc += xk
        if MODE == WAVG:
            acc = tl.div_rn(acc, tl.broadcast_to(total[:, None], acc.shape))
        elif MODE == MEAN:
            acc = tl.div_rn(acc, tl.broadcast_to(tl.maximum(count, 1).to(tl.float32)[:, None], acc.shape))
        # Kept tokens are copies: x0 converts back to x's dtype exactly.
        y = tl.where(copy[:, None], x0, acc)
        tl.store(out_b + o_r[:, None] * C + o_c[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_r[:, None] & m_c[None, :])


# Counts and small tensors' strides: a 1 or a multiple of 16 there widens no load, and would
# be one more compilation each (docs/triton.md, "Compilations").
@triton.jit(do_not_specialize=["ss_b", "N", "n_out", "tiles"])
def merge_kernel(
    x_ptr, sx_b, sx_n, sx_c, size_ptr, ss_b, ss_n, out_ptr, size_out_ptr, members_ptr, row_start_ptr,
    N, n_out, C, tiles,
    MODE: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    merge_rows(
        x_ptr, sx_b, sx_n, sx_c, size_ptr, ss_b, ss_n, out_ptr, size_out_ptr, members_ptr, row_start_ptr,
        pid // tiles, pid % tiles, N, n_out, C, MODE, HAS_SIZE, BLOCK_R, BLOCK_C,
    )


# Counts and small tensors' strides: a 1 or a multiple of 16 there widens no load, and would
# be one more compilation each (docs/triton.md, "Compilations").
@triton.jit(do_not_specialize=["sgs_b", "ss_b", "N", "n_out", "tiles"])
def merge_wavg_bwd_kernel(
    gy_ptr, sg_b, sg_n, sg_c, gsize_ptr, sgs_b, sgs_n, x_ptr, sx_b, sx_n, sx_c, size_ptr, ss_b, ss_n,
    gx_ptr, gs_ptr, members_ptr, row_start_ptr, N, n_out, C, tiles,
    HAS_SIZE: tl.constexpr, SIZE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Gradients of the weighted merge, one output row's group at a time.

    With y = sum_k x_k s_k / S and S = sum_k s_k over the group of row o:
    dx_k = (gy_o / S) s_k and ds_k = (<gy_o, x_k> - <gy_o, y_o>) / S + gsize_o.
    A kept token's row is a copy: dx = gy, ds = gsize. gx is (B, N, C) and gs (B, N),
    both contiguous; every input token belongs to exactly one group, so each element of
    them is written exactly once.
    """
    pid = tl.program_id(0)
    b64 = (pid // tiles).to(tl.int64)
    o_r, m_r, start, count, copy = _groups(members_ptr, row_start_ptr, b64, pid % tiles, N, n_out, BLOCK_R)
    max_count = tl.max(count, axis=0)
    total = _group_sizes(members_ptr, size_ptr, ss_b, ss_n, b64, N, start, count, m_r, HAS_SIZE)
    gy_rows = gy_ptr + b64 * sg_b + o_r.to(tl.int64)[:, None] * sg_n
    x_b = x_ptr + b64 * sx_b

    if SIZE_GRAD:
        gsize = tl.load(gsize_ptr + b64 * sgs_b + o_r * sgs_n, mask=m_r, other=0.0).to(tl.float32)
        # <gy_o, y_o>, with y recomputed in float32 from the group (it was never stored).
        gy_dot_y = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            num = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
            for k in range(0, max_count):
                tok, m_k = _member(members_ptr, b64, N, start, count, m_r, k)
                xk = tl.load(x_b + tok[:, None] * sx_n + o_c[None, :] * sx_c, mask=m_k[:, None] & m_c[None, :],
                             other=0.0)
                num += xk.to(tl.float32) * _sizes(size_ptr, ss_b, ss_n, b64, tok, m_k, HAS_SIZE)[:, None]
            gy = tl.load(gy_rows + o_c[None, :] * sg_c, mask=m_r[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            gy_dot_y += tl.sum(gy * tl.div_rn(num, tl.broadcast_to(total[:, None], num.shape)), axis=1)

    for k in range(0, max_count):
        tok, m_k = _member(members_ptr, b64, N, start, count, m_r, k)
        s = _sizes(size_ptr, ss_b, ss_n, b64, tok, m_k, HAS_SIZE)
        gy_dot_x = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_kc = m_k[:, None] & (o_c[None, :] < C)
            gy = tl.load(gy_rows + o_c[None, :] * sg_c, mask=m_kc, other=0.0).to(tl.float32)
            gx = tl.where(copy[:, None], gy, tl.div_rn(gy, tl.broadcast_to(total[:, None], gy.shape)) * s[:, None])
            tl.store(gx_ptr + (b64 * N + tok)[:, None] * C + o_c[None, :], gx.to(gx_ptr.dtype.element_ty), mask=m_kc)
            if SIZE_GRAD:
                xk = tl.load(x_b + tok[:, None] * sx_n + o_c[None, :] * sx_c, mask=m_kc, other=0.0)
                gy_dot_x += tl.sum(gy * xk.to(tl.float32), axis=1)
        if SIZE_GRAD:
            gs = tl.where(copy, gsize, tl.div_rn(gy_dot_x - gy_dot_y, total) + gsize)
            tl.store(gs_ptr + b64 * N + tok, gs.to(gs_ptr.dtype.element_ty), mask=m_k)


# Counts and small tensors' strides: a 1 or a multiple of 16 there widens no load, and would
# be one more compilation each (docs/triton.md, "Compilations").
@triton.jit(do_not_specialize=["N", "n_out", "tiles"])
def merge_bwd_kernel(
    gy_ptr, sg_b, sg_n, sg_c, x_ptr, sx_b, sx_n, sx_c, y_ptr, gx_ptr, members_ptr, row_start_ptr,
    N, n_out, C, tiles,
    MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Gradient of merge(x, mode) for sum, mean, amax and amin, into contiguous gx (B, N, C).

    sum: every member gets gy; mean: gy / group size; amax / amin: gy is shared evenly by the
    members equal to the result (as PyTorch's scatter_reduce does); kept tokens: gy.
    y is the forward output (contiguous), needed by amax / amin only.
    """
    pid = tl.program_id(0)
    b64 = (pid // tiles).to(tl.int64)
    o_r, m_r, start, count, copy = _groups(members_ptr, row_start_ptr, b64, pid % tiles, N, n_out, BLOCK_R)
    max_count = tl.max(count, axis=0)
    gy_rows = gy_ptr + b64 * sg_b + o_r.to(tl.int64)[:, None] * sg_n
    x_b = x_ptr + b64 * sx_b
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_rc = m_r[:, None] & (o_c[None, :] < C)
        gy = tl.load(gy_rows + o_c[None, :] * sg_c, mask=m_rc, other=0.0).to(tl.float32)
        if MODE == MEAN:
            gy = tl.div_rn(gy, tl.broadcast_to(tl.maximum(count, 1).to(tl.float32)[:, None], gy.shape))
        if MODE == AMAX or MODE == AMIN:
            y = tl.load(y_ptr + (b64 * n_out + o_r)[:, None] * C + o_c[None, :], mask=m_rc, other=0.0)
            y = y.to(tl.float32)
            ties = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
            for k in range(0, max_count):
                tok, m_k = _member(members_ptr, b64, N, start, count, m_r, k)
                xk = tl.load(x_b + tok[:, None] * sx_n + o_c[None, :] * sx_c, mask=m_k[:, None] & m_rc, other=0.0)
                ties += ((xk.to(tl.float32) == y) & m_k[:, None]).to(tl.float32)
        for k in range(0, max_count):
            tok, m_k = _member(members_ptr, b64, N, start, count, m_r, k)
            m_kc = m_k[:, None] & m_rc
            g = gy
            if MODE == AMAX or MODE == AMIN:
                xk = tl.load(x_b + tok[:, None] * sx_n + o_c[None, :] * sx_c, mask=m_kc, other=0.0)
                g = tl.where(xk.to(tl.float32) == y, tl.div_rn(gy, tl.maximum(ties, 1.0)), 0.0)
                g = tl.where(copy[:, None], gy, g)
            tl.store(gx_ptr + (b64 * N + tok)[:, None] * C + o_c[None, :], g.to(gx_ptr.dtype.element_ty), mask=m_kc)


# Counts and small tensors' strides: a 1 or a multiple of 16 there widens no load, and would
# be one more compilation each (docs/triton.md, "Compilations").
@triton.jit(do_not_specialize=["N", "n_out", "tiles"])
def unmerge_kernel(
    y_ptr, sy_b, sy_n, sy_c, token_map_ptr, out_ptr, N, n_out, C, tiles,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[k] = y[token_map[k]] for every input token k, into contiguous out (B, N, C)."""
    pid = tl.program_id(0)
    b64 = (pid // tiles).to(tl.int64)
    o_k = (pid % tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_k = o_k < N
    row = tl.load(token_map_ptr + b64 * N + o_k, mask=m_k, other=0)
    y_rows = y_ptr + b64 * sy_b + row[:, None] * sy_n
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_kc = m_k[:, None] & (o_c[None, :] < C)
        v = tl.load(y_rows + o_c[None, :] * sy_c, mask=m_kc, other=0.0)
        tl.store(out_ptr + (b64 * N + o_k)[:, None] * C + o_c[None, :], v, mask=m_kc)
