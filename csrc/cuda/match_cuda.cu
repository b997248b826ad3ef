// Matching kernels: for every A token, its best cosine score over the B tokens and the
// lowest B index reaching it (docs/semantics.md, "Matching", steps 1-4).
//
// 1. normalize_kernel, one warp per token: the metric row (keys averaged over their H heads
//    as they load) in float32, divided by max(norm, 1e-12), into a (B, N, padded_d) scratch
//    with the A tokens first and the B tokens after them, zero padded to a whole number of
//    feature chunks so that the score kernel needs no masks along features.
// 2. score_kernel, one block per (batch row, tile of 64 A tokens, split of the B tiles):
//    64 x 64 score tiles by IEEE float32 FMA (no TF32, no half MMA: decisions must match the
//    float32 reference), each thread owning a 4 x 4 sub-tile; features stream through shared
//    memory in double-buffered chunks of 16. After each B tile, each row's best and argmax
//    reduce over the 16 threads sharing the row with warp shuffles. The score matrix never
//    exists in memory: only (best, dst) per A token and split.
// The ranking and the layout follow in select_cuda.cu.
#include <climits>
#include <cstdint>

#include <math_constants.h>

#include "launchers.h"

namespace tome_cuda {
namespace {

// Same eps as reference.NORM_EPS: a zero metric row stays zero instead of becoming NaN.
constexpr float kNormEps = 1e-12f;
constexpr int kNormWarps = 8;
constexpr int kScoreThreads = 256;
// Shared rows padded by 4 floats: float4 reads stay 16-byte aligned, stores spread over banks.
constexpr int kPad = 4;
constexpr int kChunk = static_cast<int>(kChunkD);
constexpr int kTA = static_cast<int>(kTileA);
constexpr int kTB = static_cast<int>(kTileB);
static_assert(kTA == 64 && kTB == 64 && kChunk == 16 && kScoreThreads == 256,
              "the thread mapping below assumes 16 x 16 threads of 4 x 4 scores, one float4 load each");

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Scratch row of token t: A tokens (even t) first, then B tokens, so a tile of either kind
// is a block of consecutive rows.
__device__ __forceinline__ int64_t scratch_row(int64_t t, int64_t na) { return (t & 1) ? na + (t >> 1) : (t >> 1); }

template <typename T>
__global__ void __launch_bounds__(kNormWarps * 32)
    normalize_kernel(const T* __restrict__ metric, MetricView v, int64_t na, int64_t padded_d, float* __restrict__ out) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (token >= v.batch * v.tokens) return;  // whole warps leave together: no shuffle is cut short
  const int64_t b = token / v.tokens, t = token % v.tokens;
  const T* src = metric + b * v.stride_b + t * v.stride_n;
  float* dst = out + (b * v.tokens + scratch_row(t, na)) * padded_d;

  float sq = 0.f;
  for (int64_t d = lane; d < padded_d; d += 32) {
    float m = 0.f;
    if (d < v.features) {
      // Summed over heads in order, then divided: the mean of the reference (and of Triton).
      const T* p = src + d * v.stride_d;
      m = to_float(p[0]);
      for (int64_t h = 1; h < v.heads; ++h) m += to_float(p[h * v.stride_h]);
      m = m / static_cast<float>(v.heads);
    }
    dst[d] = m;
    sq = fmaf(m, m, sq);
  }
  // A butterfly leaves the same sum in every lane (float addition is commutative).
  for (int offset = 16; offset > 0; offset >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
  const float norm = fmaxf(sqrtf(sq), kNormEps);
  // Each lane reads back only what it wrote itself: no barrier needed.
  for (int64_t d = lane; d < padded_d; d += 32) dst[d] = dst[d] / norm;
}

template <bool kDistill>
__global__ void __launch_bounds__(kScoreThreads, 2)
    score_kernel(const float* __restrict__ nm, int64_t tokens, int64_t na, int64_t nb, int64_t padded_d,
                 int64_t tiles_a, int64_t tiles_b, int64_t splits, int64_t tiles_per_split,
                 float* __restrict__ partial_best, int32_t* __restrict__ partial_dst) {
  // [buffer][feature][token]: transposed so that a thread reads its 4 tokens as one float4.
  __shared__ __align__(16) float s_a[2][kChunk][kTA + kPad];
  __shared__ __align__(16) float s_b[2][kChunk][kTB + kPad];

  const int tid = threadIdx.x;
  const int ty = tid / 16;  // rows ty*4 .. ty*4+3 of the A tile
  const int tx = tid % 16;  // columns tx*4 .. tx*4+3 of the B tile; a row's 16 threads share a half-warp
  int64_t block = blockIdx.x;
  const int64_t split = block % splits;
  block /= splits;
  const int64_t i0 = (block % tiles_a) * kTA;
  const int64_t b = block / tiles_a;
  const int64_t jt_begin = split * tiles_per_split;
  const int64_t jt_end = min(tiles_b, jt_begin + tiles_per_split);
  const int64_t stages = jt_end > jt_begin ? (jt_end - jt_begin) * (padded_d / kChunk) : 0;
  const float* base = nm + b * tokens * padded_d;

  // Each thread moves one float4 of A and one of B per stage: row ld_row, features ld_col..+3.
  const int ld_row = tid / 4, ld_col = (tid % 4) * 4;
  const bool a_ok = i0 + ld_row < na;
  const float* a_src = base + (a_ok ? i0 + ld_row : 0) * padded_d + ld_col;
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);

  // A stage is (B tile, feature chunk), chunks inner; counters instead of 64-bit divisions.
  auto load_stage = [&](int64_t jt, int64_t k0, float4& ra, float4& rb) {
    const int64_t j = jt * kTB + ld_row;
    ra = a_ok ? *reinterpret_cast<const float4*>(a_src + k0) : zero;
    rb = j < nb ? *reinterpret_cast<const float4*>(base + (na + j) * padded_d + k0 + ld_col) : zero;
  };
  auto store_stage = [&](int buf, const float4& ra, const float4& rb) {
    s_a[buf][ld_col + 0][ld_row] = ra.x;
    s_a[buf][ld_col + 1][ld_row] = ra.y;
    s_a[buf][ld_col + 2][ld_row] = ra.z;
    s_a[buf][ld_col + 3][ld_row] = ra.w;
    s_b[buf][ld_col + 0][ld_row] = rb.x;
    s_b[buf][ld_col + 1][ld_row] = rb.y;
    s_b[buf][ld_col + 2][ld_row] = rb.z;
    s_b[buf][ld_col + 3][ld_row] = rb.w;
  };

  float acc[4][4];
  float run_best[4];
  int run_dst[4];
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    run_best[m] = -CUDART_INF_F;
    // A row with no finite score keeps this: column 0, or 1 when column 0 (the distill
    // token) is no candidate at all, as in the reference.
    run_dst[m] = kDistill ? 1 : 0;
#pragma unroll
    for (int n = 0; n < 4; ++n) acc[m][n] = 0.f;
  }

  int64_t cur_jt = jt_begin, cur_k = 0;   // the stage being computed
  int64_t next_jt = jt_begin, next_k = 0;  // the next stage to load
  auto advance = [&](int64_t& jt, int64_t& k0) {
    k0 += kChunk;
    if (k0 == padded_d) {
      k0 = 0;
      ++jt;
    }
  };
  float4 ra = zero, rb = zero;
  if (stages > 0) {
    load_stage(next_jt, next_k, ra, rb);
    store_stage(0, ra, rb);
    advance(next_jt, next_k);
  }
  __syncthreads();
  for (int64_t s = 0; s < stages; ++s) {
    const int buf = static_cast<int>(s & 1);
    const bool more = s + 1 < stages;
    // The next stage's global loads are in flight while this one computes.
    if (more) {
      load_stage(next_jt, next_k, ra, rb);
      advance(next_jt, next_k);
    }
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      const float4 av = *reinterpret_cast<const float4*>(&s_a[buf][k][ty * 4]);
      const float4 bv = *reinterpret_cast<const float4*>(&s_b[buf][k][tx * 4]);
      const float a4[4] = {av.x, av.y, av.z, av.w};
      const float b4[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int n = 0; n < 4; ++n) acc[m][n] = fmaf(a4[m], b4[n], acc[m][n]);
    }
    // The other buffer was last read in stage s - 1, which every thread finished before the
    // barrier that ended it.
    if (more) store_stage(buf ^ 1, ra, rb);

    cur_k += kChunk;
    if (cur_k == padded_d) {
      // A B tile is complete: fold its scores into each row's running best.
      const int64_t j0 = cur_jt * kTB + tx * 4;
      cur_k = 0;
      ++cur_jt;
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        float best = -CUDART_INF_F;
        int arg = INT_MAX;
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          const int64_t j = j0 + n;
          const float v = acc[m][n];
          // Padding, the distill column and NaN never win; strictly greater keeps the lowest j.
          const bool candidate = j < nb && !(kDistill && j == 0) && !isnan(v);
          if (candidate && v > best) {
            best = v;
            arg = static_cast<int>(j);
          }
          acc[m][n] = 0.f;
        }
        // Max over the 16 threads of the row; equal scores go to the lower column.
#pragma unroll
        for (int offset = 8; offset > 0; offset >>= 1) {
          const float o_best = __shfl_xor_sync(0xffffffffu, best, offset);
          const int o_arg = __shfl_xor_sync(0xffffffffu, arg, offset);
          if (o_best > best || (o_best == best && o_arg < arg)) {
            best = o_best;
            arg = o_arg;
          }
        }
        // Tiles come in increasing j: a later tile must be strictly better to win.
        if (best > run_best[m]) {
          run_best[m] = best;
          run_dst[m] = arg;
        }
      }
    }
    __syncthreads();
  }

  if (tx == 0) {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int64_t i = i0 + ty * 4 + m;
      if (i < na) {
        const int64_t o = (b * splits + split) * na + i;
        partial_best[o] = run_best[m];
        partial_dst[o] = run_dst[m];
      }
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_match(const T* metric, const MetricView& view, int64_t r, bool class_token, bool distill_token,
                         float* float_scratch, int32_t* int_scratch, const MatchOutputs& out, cudaStream_t stream) {
  const int64_t batch = view.batch, tokens = view.tokens;
  if (batch == 0 || tokens == 0) return cudaSuccess;
  const MatchGeometry g = match_geometry(batch, tokens, view.features);
  float* normalized = float_scratch;
  float* partial_best = float_scratch + batch * tokens * g.padded_d;
  int32_t* partial_dst = int_scratch;
  int32_t* rank = partial_dst + batch * g.splits * g.na;
  int32_t* dst = rank + batch * g.na;
  int32_t* pos = dst + batch * g.na;
  int32_t* count = pos + batch * g.na;

  const int64_t norm_blocks = ceil_div(batch * tokens, kNormWarps);
  const int64_t score_blocks = batch * g.tiles_a * g.splits;
  if (norm_blocks > INT_MAX || score_blocks > INT_MAX) return cudaErrorInvalidConfiguration;

  normalize_kernel<T><<<static_cast<unsigned>(norm_blocks), kNormWarps * 32, 0, stream>>>(
      metric, view, g.na, g.padded_d, normalized);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (distill_token) {
    score_kernel<true><<<static_cast<unsigned>(score_blocks), kScoreThreads, 0, stream>>>(
        normalized, tokens, g.na, g.nb, g.padded_d, g.tiles_a, g.tiles_b, g.splits, g.tiles_per_split,
        partial_best, partial_dst);
  } else {
    score_kernel<false><<<static_cast<unsigned>(score_blocks), kScoreThreads, 0, stream>>>(
        normalized, tokens, g.na, g.nb, g.padded_d, g.tiles_a, g.tiles_b, g.splits, g.tiles_per_split,
        partial_best, partial_dst);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = launch_rank(partial_best, partial_dst, batch, g.na, g.splits, class_token, rank, dst, stream);
  if (err != cudaSuccess) return err;
  return launch_layout(rank, dst, pos, count, batch, tokens, r, class_token, distill_token, out, stream);
}

template cudaError_t launch_match<float>(const float*, const MetricView&, int64_t, bool, bool, float*, int32_t*,
                                         const MatchOutputs&, cudaStream_t);
template cudaError_t launch_match<__half>(const __half*, const MetricView&, int64_t, bool, bool, float*, int32_t*,
                                          const MatchOutputs&, cudaStream_t);
template cudaError_t launch_match<__nv_bfloat16>(const __nv_bfloat16*, const MetricView&, int64_t, bool, bool, float*,
                                                 int32_t*, const MatchOutputs&, cudaStream_t);

}  // namespace tome_cuda
