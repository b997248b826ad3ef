"""Triton kernels for row reductions over the token-token cosine similarity of one batch row.

- ``assign_kernel``: for every source token, the best destination (``partition.assign``):
  max and lowest argmax of the similarity over the tokens whose role is DEST (and, with a
  window tensor, whose window is the source's).
- ``energy_kernel``: PiToMe's energy (``energy.energy``), the mean of f(similarity) over
  every token, for the form of f given by ``FORM`` (its index in ``energy.FORMS``).

Each program takes a tile of BLOCK_I tokens and streams the row's tokens in tiles of
BLOCK_J, normalising the metric rows as it loads them (keys are averaged over heads on the
fly): the N x N similarity is never written, and the work per row is O(N^2 D) with O(N D)
memory traffic per tile. Scores are IEEE float32 dot products, as in the bipartite matching;
the energy's mean and the Gaussian form's (1 - x) / sigma are IEEE divisions
(docs/semantics.md, "Arithmetic").
"""

import triton
import triton.language as tl

from .match import _load_metric, _metric_norms

# Roles, as in tome_kernels.reference.partition.
SOURCE: tl.constexpr = tl.constexpr(1)
DEST: tl.constexpr = tl.constexpr(2)
# partition._NAN_SCORE: a NaN score of an allowed destination ranks below any cosine.
NAN_SCORE: tl.constexpr = tl.constexpr(-3.0)
# The forms of PiToMe's f, by their codes: energy.FORMS.index(name).
PAPER: tl.constexpr = tl.constexpr(0)
ELU: tl.constexpr = tl.constexpr(1)
GAUSSIAN: tl.constexpr = tl.constexpr(2)


@triton.jit
def _similarity(
    metric_ptr, s_b, s_h, s_n, s_d, b64, o_i, m_i, norm_i, o_j, m_j, H, D,
    IS_KEYS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(BLOCK_I, BLOCK_J) float32 cosine similarities of tokens o_i (whose norms are
    ``norm_i``) and tokens o_j, accumulated over chunks of BLOCK_D features in feature order
    (a whole-row operand of a float32 tl.dot spills, see ``match.match_tile``)."""
    norm_j = _metric_norms(metric_ptr, s_b, s_h, s_n, s_d, b64, o_j, m_j, H, D, IS_KEYS, BLOCK_D)
    score = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        a_c = _load_metric(metric_ptr, s_b, s_h, s_n, s_d, b64, o_i, m_i, d0, norm_i, H, D, IS_KEYS, True, BLOCK_D)
        b_c = _load_metric(metric_ptr, s_b, s_h, s_n, s_d, b64, o_j, m_j, d0, norm_j, H, D, IS_KEYS, True, BLOCK_D)
        score = tl.dot(a_c, tl.trans(b_c), score, input_precision="ieee")
    return score


# Counts and small tensors' strides: a 1 or a multiple of 16 there widens no load, and would
# be one more compilation each (docs/triton.md, "Compilations").
@triton.jit(do_not_specialize=["sr_b", "sw_b", "N", "H", "tiles"])
def assign_kernel(
    metric_ptr, s_b, s_h, s_n, s_d, roles_ptr, sr_b, sr_n, window_ptr, sw_b, sw_n,
    best_ptr, dst_ptr, N, H, D, tiles,
    IS_KEYS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """best[i], dst[i] (B, N) float32 / int64, contiguous: see ``partition.assign``."""
    pid = tl.program_id(0)
    b64 = (pid // tiles).to(tl.int64)
    o_i = (pid % tiles) * BLOCK_I + tl.arange(0, BLOCK_I)
    m_i = o_i < N
    role_i = tl.load(roles_ptr + b64 * sr_b + o_i * sr_n, mask=m_i, other=0)
    is_source = m_i & (role_i == SOURCE)
    if HAS_WINDOW:
        win_i = tl.load(window_ptr + b64 * sw_b + o_i * sw_n, mask=m_i, other=0)
    best = tl.full((BLOCK_I,), float("-inf"), tl.float32)
    dst = tl.full((BLOCK_I,), -1, tl.int32)
    # A tile without sources has nothing to compute (most tiles, for PiToMe at small r).
    n_scan = tl.where(tl.max(is_source.to(tl.int32), axis=0) > 0, N, 0)
    if n_scan > 0:
        norm_i = _metric_norms(metric_ptr, s_b, s_h, s_n, s_d, b64, o_i, m_i, H, D, IS_KEYS, BLOCK_D)
        for j0 in range(0, n_scan, BLOCK_J):
            o_j = j0 + tl.arange(0, BLOCK_J)
            m_j = o_j < N
            role_j = tl.load(roles_ptr + b64 * sr_b + o_j * sr_n, mask=m_j, other=0)
            score = _similarity(
                metric_ptr, s_b, s_h, s_n, s_d, b64, o_i, m_i, norm_i, o_j, m_j, H, D,
                IS_KEYS, BLOCK_I, BLOCK_J, BLOCK_D,
            )
            allowed = (m_j & (role_j == DEST))[None, :]
            if HAS_WINDOW:
                win_j = tl.load(window_ptr + b64 * sw_b + o_j * sw_n, mask=m_j, other=0)
                allowed = allowed & (win_i[:, None] == win_j[None, :])
            score = tl.where(score == score, score, NAN_SCORE)
            score = tl.where(allowed, score, float("-inf"))
            tile_best = tl.max(score, axis=1)
            tile_dst = tl.argmax(score, axis=1, tie_break_left=True).to(tl.int32) + j0
            # Strictly greater: on a tie the earlier tile, i.e. the lower index, keeps the win.
            take = tile_best > best
            best = tl.where(take, tile_best, best)
            dst = tl.where(take, tile_dst, dst)
    found = is_source & (best > float("-inf"))
    tl.store(best_ptr + b64 * N + o_i, tl.where(found & (best > NAN_SCORE), best, float("-inf")), mask=m_i)
    tl.store(dst_ptr + b64 * N + o_i, tl.where(found, dst, -1).to(tl.int64), mask=m_i)


# Counts and small tensors' strides: a 1 or a multiple of 16 there widens no load, and would
# be one more compilation each (docs/triton.md, "Compilations").
@triton.jit(do_not_specialize=["N", "H", "tiles"])
def energy_kernel(
    metric_ptr, s_b, s_h, s_n, s_d, energy_ptr, margin, alpha, sigma, N, H, D, tiles,
    IS_KEYS: tl.constexpr, FORM: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """energy[i] (B, N) float32, contiguous: see ``energy.energy``. f by FORM:

    - PAPER: x if x >= margin else alpha * (exp(x - margin) - 1)
    - ELU: x - margin if x >= margin else alpha * (exp(x - margin) - 1)
    - GAUSSIAN: exp(-0.5 * t * t), t = (1 - x) / sigma, sigma = 1 - margin (from the host)
    """
    pid = tl.program_id(0)
    b64 = (pid // tiles).to(tl.int64)
    o_i = (pid % tiles) * BLOCK_I + tl.arange(0, BLOCK_I)
    m_i = o_i < N
    norm_i = _metric_norms(metric_ptr, s_b, s_h, s_n, s_d, b64, o_i, m_i, H, D, IS_KEYS, BLOCK_D)
    total = tl.zeros((BLOCK_I,), tl.float32)
    count = tl.zeros((BLOCK_I,), tl.float32)
    for j0 in range(0, N, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = o_j < N
        score = _similarity(
            metric_ptr, s_b, s_h, s_n, s_d, b64, o_i, m_i, norm_i, o_j, m_j, H, D, IS_KEYS, BLOCK_I, BLOCK_J, BLOCK_D,
        )
        if FORM == GAUSSIAN:
            t = tl.div_rn(1.0 - score, tl.full(score.shape, sigma, tl.float32))
            f = tl.exp(-0.5 * (t * t))
        else:
            if FORM == ELU:
                above = score - margin
            else:
                above = score
            f = tl.where(score >= margin, above, alpha * (tl.exp(score - margin) - 1.0))
        valid = (score == score) & m_j[None, :]
        total += tl.sum(tl.where(valid, f, 0.0), axis=1)
        count += tl.sum(valid.to(tl.float32), axis=1)
    energy = tl.where(count > 0, tl.div_rn(total, count), float("-inf"))
    tl.store(energy_ptr + b64 * N + o_i, energy, mask=m_i)
