// Row reductions over the token-token cosine similarity of a batch row, the CUDA side of
// csrc/cpu/similarity_cpu.cpp: `assign` (each source token's best destination,
// tome_kernels/reference/partition.py) and `energy` (PiToMe's energy, tome_kernels/reference/energy.py).
//
// 1. unit_rows_kernel, one warp per token: the metric row (keys averaged over heads as they
//    load) in float32, divided by max(norm, 1e-12), into a (B, N, D) scratch.
// 2. assign_kernel / energy_kernel, one block of 16 x 16 threads per (batch row, tile of 16
//    tokens i): the block walks the row's tokens j in steps of 16, each thread computing one
//    cosine (i, j) by IEEE float32 FMA over features staged through shared memory 32 at a
//    time, and folding it into its own running best (assign) or sum (energy). Each thread
//    sees its columns in increasing j; the 16 threads of a row then reduce with shuffles in
//    a fixed order, so results are identical run after run. The N x N similarity never exists.
#include <climits>
#include <cstdint>

#include <math_constants.h>

#include "launchers.h"

namespace tome_cuda {
namespace {

constexpr float kNormEps = 1e-12f;  // reference.NORM_EPS: a zero row stays zero
constexpr int kNormWarps = 8;
constexpr int kRows = 16;   // tokens i per block
constexpr int kCols = 16;   // tokens j per step, one per thread of a row
constexpr int kChunk = 32;  // features per shared-memory stage
constexpr int kThreads = kRows * kCols;
static_assert(kRows == kCols && kCols == 16,
              "one loader fills both tiles, and a row's threads are one aligned half-warp");
constexpr int8_t kSource = 1;  // partition.SOURCE
constexpr int8_t kDest = 2;    // partition.DEST
// partition._NAN_SCORE: an allowed destination whose score is NaN ranks below any cosine
// but above every token that is no allowed destination (-inf).
constexpr float kNanScore = -3.0f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__global__ void __launch_bounds__(kNormWarps * 32) unit_rows_kernel(const T* __restrict__ metric, MetricView v,
                                                                     float* __restrict__ unit) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (token >= v.batch * v.tokens) return;  // whole warps leave together: no shuffle is cut short
  const int64_t b = token / v.tokens, t = token % v.tokens;
  const T* src = metric + b * v.stride_b + t * v.stride_n;
  float* dst = unit + token * v.features;
  float sq = 0.f;
  for (int64_t d = lane; d < v.features; d += 32) {
    // Summed over heads in order, then divided: the mean of the reference.
    const T* p = src + d * v.stride_d;
    float m = to_float(p[0]);
    for (int64_t h = 1; h < v.heads; ++h) m += to_float(p[h * v.stride_h]);
    m = m / static_cast<float>(v.heads);
    dst[d] = m;
    sq = fmaf(m, m, sq);
  }
  // A butterfly leaves the same sum in every lane.
  for (int offset = 16; offset > 0; offset >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
  const float norm = fmaxf(sqrtf(sq), kNormEps);
  // Each lane reads back only what it wrote itself: no barrier needed.
  for (int64_t d = lane; d < v.features; d += 32) dst[d] = dst[d] / norm;
}

// The block's share of one step: thread (row, col) gets the cosine of tokens i0 + row and
// j0 + col of a batch row's unit rows; tokens past N read as zeros (the caller masks them).
// Every thread of the block must call it together: it synchronises.
__device__ float tile_cosine(const float* __restrict__ unit_b, int64_t tokens, int64_t features, int64_t i0,
                             int64_t j0, float (&s_i)[kRows][kChunk + 1], float (&s_j)[kCols][kChunk + 1], int row,
                             int col) {
  float acc = 0.f;
  for (int64_t d0 = 0; d0 < features; d0 += kChunk) {
    for (int e = threadIdx.x; e < kRows * kChunk; e += kThreads) {
      const int r = e / kChunk, c = e % kChunk;
      const int64_t d = d0 + c;
      s_i[r][c] = (i0 + r < tokens && d < features) ? unit_b[(i0 + r) * features + d] : 0.f;
      s_j[r][c] = (j0 + r < tokens && d < features) ? unit_b[(j0 + r) * features + d] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kChunk; ++c) acc = fmaf(s_i[row][c], s_j[col][c], acc);
    __syncthreads();  // the next stage overwrites what this one read
  }
  return acc;
}

__device__ __forceinline__ int8_t role_of(const TokenRoles& r, int64_t b, int64_t n) {
  return r.roles[b * r.roles_stride_b + n * r.roles_stride_n];
}

__device__ __forceinline__ int32_t window_of(const TokenRoles& r, int64_t b, int64_t n) {
  return r.window[b * r.window_stride_b + n * r.window_stride_n];
}

__global__ void __launch_bounds__(kThreads) assign_kernel(const float* __restrict__ unit, int64_t tokens,
                                                          int64_t features, int64_t tiles, TokenRoles roles,
                                                          float* __restrict__ best, int64_t* __restrict__ dst) {
  __shared__ float s_i[kRows][kChunk + 1];  // +1: the threads of a row read distinct banks
  __shared__ float s_j[kCols][kChunk + 1];
  const int row = threadIdx.x / kCols, col = threadIdx.x % kCols;
  const int64_t b = blockIdx.x / tiles, i0 = (blockIdx.x % tiles) * kRows, i = i0 + row;
  const float* unit_b = unit + b * tokens * features;
  const bool source = i < tokens && role_of(roles, b, i) == kSource;
  const int32_t window_i = source && roles.window != nullptr ? window_of(roles, b, i) : 0;

  float top = -CUDART_INF_F;
  int arg = INT_MAX;  // no allowed destination yet
  // A tile without sources has nothing to score (the test is block-wide: barriers stay uniform).
  if (__syncthreads_or(source)) {
    for (int64_t j0 = 0; j0 < tokens; j0 += kCols) {
      const int64_t j = j0 + col;
      const bool dest = j < tokens && role_of(roles, b, j) == kDest;
      if (!__syncthreads_or(dest)) continue;  // no destination in this step
      const float score = tile_cosine(unit_b, tokens, features, i0, j0, s_i, s_j, row, col);
      const bool allowed = source && dest && (roles.window == nullptr || window_of(roles, b, j) == window_i);
      // Each thread sees increasing j and only a strictly greater score replaces: the lowest
      // index keeps a tie.
      const float v = isnan(score) ? kNanScore : score;
      if (allowed && v > top) {
        top = v;
        arg = static_cast<int>(j);
      }
    }
  }
  // Best of the row's 16 threads (one aligned half-warp); equal scores go to the lower index.
#pragma unroll
  for (int offset = kCols / 2; offset > 0; offset >>= 1) {
    const float o_top = __shfl_xor_sync(0xffffffffu, top, offset);
    const int o_arg = __shfl_xor_sync(0xffffffffu, arg, offset);
    if (o_top > top || (o_top == top && o_arg < arg)) {
      top = o_top;
      arg = o_arg;
    }
  }
  if (col == 0 && i < tokens) {
    // Every allowed score is at least kNanScore: -inf means no allowed destination.
    const bool found = source && top > -CUDART_INF_F;
    best[b * tokens + i] = found && top > kNanScore ? top : -CUDART_INF_F;
    dst[b * tokens + i] = found ? static_cast<int64_t>(arg) : int64_t{-1};
  }
}

// f of the form kForm (EnergyForm), in float32 as the reference evaluates it on its float32
// similarities; the Gaussian's division is IEEE (no fast math in this build).
template <int kForm>
__device__ __forceinline__ float energy_term(float x, float margin, float alpha, float sigma) {
  if (kForm == kGaussianForm) {
    const float t = (1.f - x) / sigma;
    return expf(-0.5f * (t * t));
  }
  return x >= margin ? (kForm == kEluForm ? x - margin : x) : alpha * expm1f(x - margin);
}

template <int kForm>
__global__ void __launch_bounds__(kThreads) energy_kernel(const float* __restrict__ unit, int64_t tokens,
                                                          int64_t features, int64_t tiles, float margin, float alpha,
                                                          float sigma, float* __restrict__ energy) {
  __shared__ float s_i[kRows][kChunk + 1];
  __shared__ float s_j[kCols][kChunk + 1];
  const int row = threadIdx.x / kCols, col = threadIdx.x % kCols;
  const int64_t b = blockIdx.x / tiles, i0 = (blockIdx.x % tiles) * kRows, i = i0 + row;
  const float* unit_b = unit + b * tokens * features;

  float total = 0.f;
  int count = 0;
  for (int64_t j0 = 0; j0 < tokens; j0 += kCols) {
    const float x = tile_cosine(unit_b, tokens, features, i0, j0, s_i, s_j, row, col);
    // NaN similarities are left out of the mean and its count.
    if (i < tokens && j0 + col < tokens && !isnan(x)) {
      total += energy_term<kForm>(x, margin, alpha, sigma);
      ++count;
    }
  }
  // A butterfly over the row's 16 threads: the same sums, in the same order, on every run.
#pragma unroll
  for (int offset = kCols / 2; offset > 0; offset >>= 1) {
    total += __shfl_xor_sync(0xffffffffu, total, offset);
    count += __shfl_xor_sync(0xffffffffu, count, offset);
  }
  if (col == 0 && i < tokens) {
    energy[b * tokens + i] = count > 0 ? total / static_cast<float>(count) : -CUDART_INF_F;
  }
}

// The unit rows into scratch, and the grid of the reduction kernels: (blocks, tiles per row).
template <typename T>
cudaError_t launch_unit_rows(const T* metric, const MetricView& view, float* scratch, int64_t& blocks, int64_t& tiles,
                             cudaStream_t stream) {
  tiles = ceil_div(view.tokens, kRows);
  blocks = view.batch * tiles;
  const int64_t norm_blocks = ceil_div(view.batch * view.tokens, kNormWarps);
  if (norm_blocks > INT_MAX || blocks > INT_MAX || view.tokens >= INT_MAX) return cudaErrorInvalidConfiguration;
  unit_rows_kernel<T><<<static_cast<unsigned>(norm_blocks), kNormWarps * 32, 0, stream>>>(metric, view, scratch);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_assign(const T* metric, const MetricView& view, const TokenRoles& roles, float* scratch, float* best,
                          int64_t* dst, cudaStream_t stream) {
  if (view.batch == 0 || view.tokens == 0) return cudaSuccess;
  int64_t blocks = 0, tiles = 0;
  cudaError_t err = launch_unit_rows(metric, view, scratch, blocks, tiles, stream);
  if (err != cudaSuccess) return err;
  assign_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(scratch, view.tokens, view.features, tiles,
                                                                         roles, best, dst);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_energy(const T* metric, const MetricView& view, float margin, float alpha, float sigma, int form,
                          float* scratch, float* energy, cudaStream_t stream) {
  if (view.batch == 0 || view.tokens == 0) return cudaSuccess;
  int64_t blocks = 0, tiles = 0;
  cudaError_t err = launch_unit_rows(metric, view, scratch, blocks, tiles, stream);
  if (err != cudaSuccess) return err;
  const auto grid = static_cast<unsigned>(blocks);
  if (form == kGaussianForm) {
    energy_kernel<kGaussianForm><<<grid, kThreads, 0, stream>>>(scratch, view.tokens, view.features, tiles, margin,
                                                                 alpha, sigma, energy);
  } else if (form == kEluForm) {
    energy_kernel<kEluForm><<<grid, kThreads, 0, stream>>>(scratch, view.tokens, view.features, tiles, margin, alpha,
                                                            sigma, energy);
  } else if (form == kPaperForm) {
    energy_kernel<kPaperForm><<<grid, kThreads, 0, stream>>>(scratch, view.tokens, view.features, tiles, margin,
                                                              alpha, sigma, energy);
  } else {
    return cudaErrorInvalidValue;  // the operator refuses other codes before launching
  }
  return cudaGetLastError();
}

#define TOME_INSTANTIATE(T)                                                                                         \
  template cudaError_t launch_assign<T>(const T*, const MetricView&, const TokenRoles&, float*, float*, int64_t*,  \
                                        cudaStream_t);                                                              \
  template cudaError_t launch_energy<T>(const T*, const MetricView&, float, float, float, int, float*, float*,     \
                                        cudaStream_t);
TOME_INSTANTIATE(float)
TOME_INSTANTIATE(__half)
TOME_INSTANTIATE(__nv_bfloat16)
#undef TOME_INSTANTIATE

}  // namespace tome_cuda
