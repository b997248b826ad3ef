"""Triton kernels for the matching half of the contract: best destination and rank per A token.

``match_tile`` computes, for a tile of A tokens of one batch row, the best cosine score
over all B tokens and its argmax, streaming B tiles so that no score matrix is ever
written. ``rank_tile`` turns the scores into each A token's rank in the contract's order
by counting, for every A token, the A tokens ranked ahead of it.

Both are helpers that the multi-kernel path launches over a (batch row, tile) grid and the
one-pass kernel (``fused.py``) loops over itself. Scratch layout, per batch row (see
``launch.py``): ``best`` float32 (Na,), and in the int32 scratch ``rank`` at [0, Na) and
``dst`` at [Na, 2 Na). Square roots and divisions round to nearest (``tl.sqrt_rn``,
``tl.div_rn``), as the reference's do: docs/semantics.md, "Arithmetic".
"""

import triton
import triton.language as tl

# Same eps as reference.NORM_EPS: a zero metric row stays zero instead of becoming NaN.
NORM_EPS: tl.constexpr = tl.constexpr(1e-12)


@triton.jit
def _load_metric(
    metric_ptr, s_b, s_h, s_n, s_d, b64, o_tok, m_tok, d0, norm, H, D,
    IS_KEYS: tl.constexpr, UNIT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """float32 metric rows of tokens ``o_tok``, columns [d0, d0 + BLOCK_D), with ``UNIT``
    divided by the rows' norms ``norm`` (unused otherwise); keys are averaged over their H
    heads here, so the (B, N, D) mean is never materialised.

    One helper for both: the interpreter re-patches the language module at every call of a
    @triton.jit helper (about a millisecond a call under cProfile), and this runs once per
    chunk of features."""
    o_d = d0 + tl.arange(0, BLOCK_D)
    m = m_tok[:, None] & (o_d[None, :] < D)
    p = metric_ptr + b64 * s_b + o_tok.to(tl.int64)[:, None] * s_n + o_d[None, :] * s_d
    rows = tl.load(p, mask=m, other=0.0).to(tl.float32)
    if IS_KEYS:
        for h in range(1, H):
            rows += tl.load(p + h * s_h, mask=m, other=0.0).to(tl.float32)
        # The mean, then the normalisation, each rounded once: as the reference computes them.
        rows = tl.div_rn(rows, tl.full(rows.shape, H, tl.float32))
    if UNIT:
        rows = tl.div_rn(rows, tl.broadcast_to(norm[:, None], rows.shape))
    return rows


@triton.jit
def _metric_norms(
    metric_ptr, s_b, s_h, s_n, s_d, b64, o_tok, m_tok, H, D, IS_KEYS: tl.constexpr, BLOCK_D: tl.constexpr
):
    """L2 norm of each metric row, clamped below at NORM_EPS."""
    sq = tl.zeros(o_tok.shape, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rows = _load_metric(metric_ptr, s_b, s_h, s_n, s_d, b64, o_tok, m_tok, d0, sq, H, D, IS_KEYS, False, BLOCK_D)
        sq += tl.sum(rows * rows, axis=1)
    return tl.maximum(tl.sqrt_rn(sq), NORM_EPS)


@triton.jit
def match_tile(
    metric_ptr, s_b, s_h, s_n, s_d, best_ptr, scratch_ptr, scratch_stride,
    b, i_tile, Na, Nb, H, D,
    IS_KEYS: tl.constexpr, DISTILL: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """best[i] = max_j score(a_i, b_j) and dst[i] = its lowest argmax, for one tile of A tokens.

    Scores are float32 dot products of unit rows (IEEE, not TF32: decisions must agree with
    the reference). NaN scores and masked columns (padding, the distill token) are -inf, so a
    row with no finite score keeps best = -inf and the initial dst (0, or 1 with a distill
    token, whose column 0 is no candidate at all).
    """
    b64 = b.to(tl.int64)
    o_i = i_tile * BLOCK_A + tl.arange(0, BLOCK_A)
    m_i = o_i < Na
    norm_a = _metric_norms(metric_ptr, s_b, s_h, s_n, s_d, b64, 2 * o_i, m_i, H, D, IS_KEYS, BLOCK_D)

    best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
    dst = tl.zeros((BLOCK_A,), tl.int32)
    if DISTILL:
        dst += 1
    for j0 in range(0, Nb, BLOCK_B):
        o_j = j0 + tl.arange(0, BLOCK_B)
        m_j = o_j < Nb
        norm_b = _metric_norms(metric_ptr, s_b, s_h, s_n, s_d, b64, 2 * o_j + 1, m_j, H, D, IS_KEYS, BLOCK_D)
        # The features stream through in chunks of BLOCK_D: a tl.dot on float32 is a loop of
        # FMAs whose operands each thread holds whole, so a (tile x D) operand at D = 64
        # does not fit in registers and spills; a 16-wide chunk does. The chunks accumulate
        # in feature order, so the sum is the same as one dot over all of D.
        score = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            a_c = _load_metric(metric_ptr, s_b, s_h, s_n, s_d, b64, 2 * o_i, m_i, d0, norm_a, H, D, IS_KEYS, True,
                               BLOCK_D)
            b_c = _load_metric(metric_ptr, s_b, s_h, s_n, s_d, b64, 2 * o_j + 1, m_j, d0, norm_b, H, D, IS_KEYS, True,
                               BLOCK_D)
            score = tl.dot(a_c, tl.trans(b_c), score, input_precision="ieee")
        candidate = m_j
        if DISTILL:
            candidate = candidate & (o_j != 0)
        score = tl.where(candidate[None, :] & (score == score), score, float("-inf"))
        tile_best = tl.max(score, axis=1)
        tile_dst = tl.argmax(score, axis=1, tie_break_left=True).to(tl.int32) + j0
        # Strictly greater: on a tie the earlier tile, i.e. the lower j, keeps the win.
        take = tile_best > best
        best = tl.where(take, tile_best, best)
        dst = tl.where(take, tile_dst, dst)

    tl.store(best_ptr + b64 * Na + o_i, best, mask=m_i)
    tl.store(scratch_ptr + b64 * scratch_stride + Na + o_i, dst, mask=m_i)


@triton.jit
def rank_tile(
    best_ptr, scratch_ptr, scratch_stride, b, i_tile, Na,
    CLASS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """rank[i] = how many A tokens come before i: higher best, or equal best and lower index.

    The class token (A token 0 with ``CLASS``) comes after every other A token, so it is
    never among the first r (the sources), whatever its scores.
    """
    b64 = b.to(tl.int64)
    o_i = i_tile * BLOCK_I + tl.arange(0, BLOCK_I)
    m_i = o_i < Na
    best_i = tl.load(best_ptr + b64 * Na + o_i, mask=m_i, other=float("-inf"))
    rank = tl.zeros((BLOCK_I,), tl.int32)
    for k0 in range(0, Na, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < Na
        best_k = tl.load(best_ptr + b64 * Na + o_k, mask=m_k, other=float("-inf"))
        ahead = (best_k[None, :] > best_i[:, None]) | (
            (best_k[None, :] == best_i[:, None]) & (o_k[None, :] < o_i[:, None])
        )
        if CLASS:
            ahead = (ahead | (o_i[:, None] == 0)) & (o_k[None, :] != 0)
        ahead = ahead & m_k[None, :]
        rank += tl.sum(ahead.to(tl.int32), axis=1)
    tl.store(scratch_ptr + b64 * scratch_stride + o_i, rank, mask=m_i)


# Counts and small tensors' strides: a 1 or a multiple of 16 there widens no load, and would
# be one more compilation each (docs/triton.md, "Compilations").
@triton.jit(do_not_specialize=["scratch_stride", "Na", "Nb", "H", "tiles"])
def match_kernel(
    metric_ptr, s_b, s_h, s_n, s_d, best_ptr, scratch_ptr, scratch_stride, Na, Nb, H, D, tiles,
    IS_KEYS: tl.constexpr, DISTILL: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One flat grid of (batch row, tile): the tiles of a row run side by side and share its
    # B tokens in L2; a flat axis also has no 65535 limit on the batch.
    pid = tl.program_id(0)
    match_tile(
        metric_ptr, s_b, s_h, s_n, s_d, best_ptr, scratch_ptr, scratch_stride, pid // tiles, pid % tiles,
        Na, Nb, H, D, IS_KEYS, DISTILL, BLOCK_A, BLOCK_B, BLOCK_D,
    )


# Counts and small tensors' strides: a 1 or a multiple of 16 there widens no load, and would
# be one more compilation each (docs/triton.md, "Compilations").
@triton.jit(do_not_specialize=["scratch_stride", "Na", "tiles"])
def rank_kernel(
    best_ptr, scratch_ptr, scratch_stride, Na, tiles,
    CLASS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rank_tile(best_ptr, scratch_ptr, scratch_stride, pid // tiles, pid % tiles, Na, CLASS, BLOCK_I, BLOCK_K)
