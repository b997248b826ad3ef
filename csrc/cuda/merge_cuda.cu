// Kernels that apply a matching: merge (every mode), its backward, and unmerge (the same
// formulas as tome_kernels/backends/triton/merge.py).
//
// One warp per output row (8 per 256-thread block, flat grid over batch x rows) gathers its
// group members[row_start[o] : row_start[o + 1]], each lane V contiguous channels at a time:
// V = 16 bytes / element size (one 128-bit access) when channels are contiguous and rows
// 16-byte aligned, else V = 1 on any strides. Each output element is one lane's float32 sum
// in member order: no atomics, identical results run after run; the backward is a gather
// over the same groups (every input token is in exactly one). A row whose only member is an
// A token is a kept token, copied exactly; a B token's row is always a reduction, as in the
// reference. An out-of-range member or token_map entry (the matching never makes one) gives
// a NaN row instead of a read outside the tensor.
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <math_constants.h>

#include "launchers.h"

namespace tome_cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_float(float v, float& out) { out = v; }
__device__ __forceinline__ void from_float(float v, __half& out) { out = __float2half_rn(v); }
__device__ __forceinline__ void from_float(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }

// V elements at p (V > 1: contiguous and 16-byte aligned, one 128-bit access), as float32.
template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&v)[V]) {
  if constexpr (V == 1) {
    v[0] = to_float(*p);
  } else {
    static_assert(sizeof(T) * V == 16, "vector accesses are 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T e[V];
    memcpy(e, &raw, sizeof(raw));
    for (int k = 0; k < V; ++k) v[k] = to_float(e[k]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&v)[V]) {
  if constexpr (V == 1) {
    from_float(v[0], *p);
  } else {
    T e[V];
    for (int k = 0; k < V; ++k) from_float(v[k], e[k]);
    uint4 raw;
    memcpy(&raw, e, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  // A butterfly: every lane ends with the same sum, in a fixed order.
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Output row `row` (flat over batch x rows_out) and its group. Every lane reads the same
// addresses, so these loads are broadcasts.
struct Group {
  int64_t b, o, start;
  int count;
  int first;  // token of the first member, -1 if none or out of range
  bool copy;  // a token alone in its group: copied exactly
  bool bad;   // a member out of range: the row is NaN (forward) or skipped (backward)
};

__device__ __forceinline__ int member(const Groups& g, int64_t b, int64_t at) {
  const int t = g.members[b * g.tokens + at];
  return (t >= 0 && t < g.tokens) ? t : -1;
}

__device__ __forceinline__ Group load_group(const Groups& g, int64_t row) {
  Group gr;
  gr.b = row / g.rows_out;
  gr.o = row % g.rows_out;
  const int32_t* rs = g.row_start + gr.b * (g.rows_out + 1) + gr.o;
  const int64_t start = min(max(static_cast<int64_t>(rs[0]), int64_t{0}), g.tokens);
  const int64_t end = min(max(static_cast<int64_t>(rs[1]), start), g.tokens);
  gr.start = start;
  gr.count = static_cast<int>(end - start);
  gr.first = gr.count > 0 ? member(g, gr.b, start) : -1;
  gr.bad = gr.first < 0;
  for (int k = 1; k < gr.count; ++k) gr.bad |= member(g, gr.b, start + k) < 0;
  gr.copy = gr.count == 1 && gr.first >= 0;
  return gr;
}

__device__ __forceinline__ float size_of(const SizeView& s, int64_t b, int t) {
  return s.data ? s.data[b * s.stride_b + t * s.stride_n] : 1.f;
}

template <typename T, int V, MergeMode kMode>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const T* __restrict__ x, Strides3 sx, int64_t channels, SizeView size, Groups g,
                 T* __restrict__ out, float* __restrict__ size_out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= g.batch * g.rows_out) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const Group gr = load_group(g, row);
  T* out_row = out + row * channels;
  if (gr.bad) {
    float nan[V];
    for (int e = 0; e < V; ++e) nan[e] = CUDART_NAN_F;
    if (kMode == MergeMode::kWavg && lane == 0) size_out[row] = CUDART_NAN_F;
    for (int64_t c = lane * V; c < channels; c += 32 * V) store<T, V>(out_row + c, nan);
    return;
  }
  float total = 0.f;
  if (kMode == MergeMode::kWavg) {
    for (int k = 0; k < gr.count; ++k) total += size_of(size, gr.b, member(g, gr.b, gr.start + k));
    if (lane == 0) size_out[row] = total;
  }
  const float s0 = kMode == MergeMode::kWavg ? size_of(size, gr.b, gr.first) : 1.f;
  const T* xb = x + gr.b * sx.b;
  const T* x0_row = xb + gr.first * sx.n;

  for (int64_t c = lane * V; c < channels; c += 32 * V) {
    float x0[V], acc[V];
    load<T, V>(x0_row + c * sx.c, x0);
    for (int e = 0; e < V; ++e) acc[e] = kMode == MergeMode::kWavg ? x0[e] * s0 : x0[e];
    for (int k = 1; k < gr.count; ++k) {
      const int t = member(g, gr.b, gr.start + k);
      float xk[V];
      load<T, V>(xb + t * sx.n + c * sx.c, xk);
      const float s = kMode == MergeMode::kWavg ? size_of(size, gr.b, t) : 1.f;
      // amax / amin: NaN propagates from either side, as in torch.
      for (int e = 0; e < V; ++e) {
        if (kMode == MergeMode::kWavg) acc[e] += xk[e] * s;
        else if (kMode == MergeMode::kAmax) acc[e] = (xk[e] > acc[e] || isnan(xk[e])) ? xk[e] : acc[e];
        else if (kMode == MergeMode::kAmin) acc[e] = (xk[e] < acc[e] || isnan(xk[e])) ? xk[e] : acc[e];
        else acc[e] += xk[e];
      }
    }
    for (int e = 0; e < V; ++e) {
      if (kMode == MergeMode::kWavg) acc[e] = acc[e] / total;
      if (kMode == MergeMode::kMean) acc[e] = acc[e] / static_cast<float>(gr.count);
      // Kept tokens are copies: x0 converts back to T exactly.
      if (gr.copy) acc[e] = x0[e];
    }
    store<T, V>(out_row + c, acc);
  }
}

// With y = sum_k x_k s_k / S and S = sum_k s_k over the group of row o:
// dx_k = (gy_o / S) s_k and ds_k = (<gy_o, x_k> - <gy_o, y_o>) / S + gsize_o.
// A kept token's row is a copy: dx = gy, ds = gsize.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    merge_wavg_backward_kernel(const T* __restrict__ gy, Strides3 sg, SizeView gsize_out, const T* __restrict__ x,
                               Strides3 sx, int64_t channels, SizeView size, Groups g, T* __restrict__ gx,
                               float* __restrict__ gs, bool size_grad) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= g.batch * g.rows_out) return;
  const int lane = threadIdx.x % 32;
  const Group gr = load_group(g, row);
  if (gr.bad) return;  // no valid place to write to
  float total = 0.f;
  for (int k = 0; k < gr.count; ++k) total += size_of(size, gr.b, member(g, gr.b, gr.start + k));
  const T* gy_row = gy + gr.b * sg.b + gr.o * sg.n;
  const T* xb = x + gr.b * sx.b;

  float gy_dot_y = 0.f, gsize = 0.f;
  if (size_grad) {
    gsize = gsize_out.data[gr.b * gsize_out.stride_b + gr.o * gsize_out.stride_n];
    if (!gr.copy) {
      // <gy_o, y_o>, with y recomputed in float32 from the group (it was never stored).
      float part = 0.f;
      for (int64_t c = lane * V; c < channels; c += 32 * V) {
        float num[V] = {}, gyv[V];
        for (int k = 0; k < gr.count; ++k) {
          const int t = member(g, gr.b, gr.start + k);
          const float s = size_of(size, gr.b, t);
          float xk[V];
          load<T, V>(xb + t * sx.n + c * sx.c, xk);
          for (int e = 0; e < V; ++e) num[e] += xk[e] * s;
        }
        load<T, V>(gy_row + c * sg.c, gyv);
        for (int e = 0; e < V; ++e) part += gyv[e] * (num[e] / total);
      }
      gy_dot_y = warp_sum(part);
    }
  }

  for (int k = 0; k < gr.count; ++k) {
    const int t = member(g, gr.b, gr.start + k);
    const float s = size_of(size, gr.b, t);
    T* gx_row = gx + (gr.b * g.tokens + t) * channels;
    float part = 0.f;
    for (int64_t c = lane * V; c < channels; c += 32 * V) {
      float gyv[V], d[V];
      load<T, V>(gy_row + c * sg.c, gyv);
      for (int e = 0; e < V; ++e) d[e] = gr.copy ? gyv[e] : (gyv[e] / total) * s;
      store<T, V>(gx_row + c, d);
      if (size_grad) {
        float xk[V];
        load<T, V>(xb + t * sx.n + c * sx.c, xk);
        for (int e = 0; e < V; ++e) part += gyv[e] * xk[e];
      }
    }
    if (size_grad) {
      const float gy_dot_x = warp_sum(part);
      if (lane == 0) gs[gr.b * g.tokens + t] = gr.copy ? gsize : (gy_dot_x - gy_dot_y) / total + gsize;
    }
  }
}

// sum: every member gets gy; mean: gy / group size; amax / amin: gy shared evenly by the
// members equal to the result (as torch's scatter_reduce does); kept tokens: gy.
template <typename T, int V, MergeMode kMode>
__global__ void __launch_bounds__(kThreads)
    merge_backward_kernel(const T* __restrict__ gy, Strides3 sg, const T* __restrict__ x, Strides3 sx,
                          const T* __restrict__ y, int64_t channels, Groups g, T* __restrict__ gx) {
  constexpr bool kExtremum = kMode == MergeMode::kAmax || kMode == MergeMode::kAmin;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= g.batch * g.rows_out) return;
  const int lane = threadIdx.x % 32;
  const Group gr = load_group(g, row);
  if (gr.bad) return;
  const T* gy_row = gy + gr.b * sg.b + gr.o * sg.n;
  const T* xb = x + gr.b * sx.b;

  for (int64_t c = lane * V; c < channels; c += 32 * V) {
    float gyv[V], yv[V], ties[V] = {};
    load<T, V>(gy_row + c * sg.c, gyv);
    if (kMode == MergeMode::kMean) {
      for (int e = 0; e < V; ++e) gyv[e] = gyv[e] / static_cast<float>(max(gr.count, 1));
    }
    if (kExtremum) {
      load<T, V>(y + row * channels + c, yv);
      for (int k = 0; k < gr.count; ++k) {
        float xk[V];
        load<T, V>(xb + member(g, gr.b, gr.start + k) * sx.n + c * sx.c, xk);
        for (int e = 0; e < V; ++e) ties[e] += xk[e] == yv[e] ? 1.f : 0.f;
      }
    }
    for (int k = 0; k < gr.count; ++k) {
      const int t = member(g, gr.b, gr.start + k);
      float d[V];
      for (int e = 0; e < V; ++e) d[e] = gyv[e];
      if (kExtremum && !gr.copy) {
        float xk[V];
        load<T, V>(xb + t * sx.n + c * sx.c, xk);
        for (int e = 0; e < V; ++e) d[e] = xk[e] == yv[e] ? gyv[e] / fmaxf(ties[e], 1.f) : 0.f;
      }
      store<T, V>(gx + (gr.b * g.tokens + t) * channels + c, d);
    }
  }
}

// out[b, k] = y[b, token_map[b, k]]: a copy of bits, no conversion.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    unmerge_kernel(const T* __restrict__ y, Strides3 sy, int64_t rows_in, int64_t channels,
                   const int64_t* __restrict__ token_map, int64_t batch, int64_t tokens, T* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= batch * tokens) return;
  const int lane = threadIdx.x % 32;
  const int64_t b = row / tokens;
  const int64_t src = token_map[row];
  T* out_row = out + row * channels;
  if (src < 0 || src >= rows_in) {
    T nan;
    from_float(CUDART_NAN_F, nan);
    for (int64_t c = lane; c < channels; c += 32) out_row[c] = nan;
    return;
  }
  const T* y_row = y + b * sy.b + src * sy.n;
  for (int64_t c = lane * V; c < channels; c += 32 * V) {
    if constexpr (V == 1) {
      out_row[c] = y_row[c * sy.c];
    } else {
      *reinterpret_cast<uint4*>(out_row + c) = *reinterpret_cast<const uint4*>(y_row + c);
    }
  }
}

// Whether the 16-byte path applies to a (batch, rows, C) tensor: channels contiguous, C a
// multiple of the vector, every row start 16-byte aligned.
template <typename T>
bool vectorizable(const T* p, Strides3 s, int64_t batch, int64_t rows, int64_t channels) {
  constexpr int64_t v = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && s.c == 1 && channels % v == 0 &&
         (rows <= 1 || s.n % v == 0) && (batch <= 1 || s.b % v == 0);
}

template <typename T>  // a contiguous (batch, rows, C) output or gradient
bool vectorizable_output(const T* p, int64_t batch, int64_t rows, int64_t channels) {
  return vectorizable(p, Strides3{rows * channels, channels, 1}, batch, rows, channels);
}

// Grid of one warp per row: 0 blocks for no rows (nothing to launch), or an error when too many.
inline cudaError_t warp_grid(int64_t rows, unsigned& grid) {
  const int64_t blocks = ceil_div(rows, kWarps);
  grid = static_cast<unsigned>(blocks);
  return blocks > INT_MAX ? cudaErrorInvalidConfiguration : cudaSuccess;
}

// Calls f with the mode as a compile-time constant (decltype(m)::value).
template <typename F>
void with_mode(MergeMode mode, F&& f) {
  using M = MergeMode;
  switch (mode) {
    case M::kWavg: f(std::integral_constant<M, M::kWavg>{}); break;
    case M::kSum: f(std::integral_constant<M, M::kSum>{}); break;
    case M::kMean: f(std::integral_constant<M, M::kMean>{}); break;
    case M::kAmax: f(std::integral_constant<M, M::kAmax>{}); break;
    case M::kAmin: f(std::integral_constant<M, M::kAmin>{}); break;
  }
}

}  // namespace

template <typename T>
cudaError_t launch_merge(const T* x, Strides3 sx, int64_t channels, SizeView size, const Groups& g, MergeMode mode,
                         T* out, float* size_out, cudaStream_t stream) {
  unsigned grid;
  const cudaError_t shape = warp_grid(g.batch * g.rows_out, grid);
  if (shape != cudaSuccess || grid == 0) return shape;
  const bool vec = vectorizable(x, sx, g.batch, g.tokens, channels) &&
                   vectorizable_output(out, g.batch, g.rows_out, channels);
  with_mode(mode, [&](auto m) {
    constexpr MergeMode kMode = decltype(m)::value;
    if (vec)
      merge_kernel<T, 16 / sizeof(T), kMode><<<grid, kThreads, 0, stream>>>(x, sx, channels, size, g, out, size_out);
    else
      merge_kernel<T, 1, kMode><<<grid, kThreads, 0, stream>>>(x, sx, channels, size, g, out, size_out);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_merge_wavg_backward(const T* grad_out, Strides3 sg, SizeView grad_size_out, const T* x, Strides3 sx,
                                       int64_t channels, SizeView size, const Groups& g, T* grad_x, float* grad_size,
                                       cudaStream_t stream) {
  unsigned grid;
  const cudaError_t shape = warp_grid(g.batch * g.rows_out, grid);
  if (shape != cudaSuccess || grid == 0) return shape;
  const bool vec = vectorizable(grad_out, sg, g.batch, g.rows_out, channels) &&
                   vectorizable(x, sx, g.batch, g.tokens, channels) &&
                   vectorizable_output(grad_x, g.batch, g.tokens, channels);
  // A uniform branch in the kernel rather than another template parameter: it is cheap.
  const bool size_grad = grad_size != nullptr && size.data != nullptr && grad_size_out.data != nullptr;
  if (vec)
    merge_wavg_backward_kernel<T, 16 / sizeof(T)><<<grid, kThreads, 0, stream>>>(
        grad_out, sg, grad_size_out, x, sx, channels, size, g, grad_x, grad_size, size_grad);
  else
    merge_wavg_backward_kernel<T, 1><<<grid, kThreads, 0, stream>>>(grad_out, sg, grad_size_out, x, sx, channels, size,
                                                                   g, grad_x, grad_size, size_grad);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_merge_backward(const T* grad_out, Strides3 sg, const T* x, Strides3 sx, const T* y, int64_t channels,
                                  const Groups& g, MergeMode mode, T* grad_x, cudaStream_t stream) {
  unsigned grid;
  const cudaError_t shape = warp_grid(g.batch * g.rows_out, grid);
  if (shape != cudaSuccess || grid == 0) return shape;
  if (mode == MergeMode::kWavg) return cudaErrorInvalidValue;  // that is launch_merge_wavg_backward
  const bool extremum = mode == MergeMode::kAmax || mode == MergeMode::kAmin;
  const bool vec = vectorizable(grad_out, sg, g.batch, g.rows_out, channels) &&
                   vectorizable(x, sx, g.batch, g.tokens, channels) &&
                   (!extremum || vectorizable_output(y, g.batch, g.rows_out, channels)) &&
                   vectorizable_output(grad_x, g.batch, g.tokens, channels);
  with_mode(mode, [&](auto m) {
    constexpr MergeMode kMode = decltype(m)::value;
    if constexpr (kMode != MergeMode::kWavg) {
      if (vec)
        merge_backward_kernel<T, 16 / sizeof(T), kMode><<<grid, kThreads, 0, stream>>>(grad_out, sg, x, sx, y,
                                                                                        channels, g, grad_x);
      else
        merge_backward_kernel<T, 1, kMode><<<grid, kThreads, 0, stream>>>(grad_out, sg, x, sx, y, channels, g, grad_x);
    }
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_unmerge(const T* y, Strides3 sy, int64_t rows_in, int64_t channels, const int64_t* token_map,
                           int64_t batch, int64_t tokens, T* out, cudaStream_t stream) {
  unsigned grid;
  const cudaError_t shape = warp_grid(batch * tokens, grid);
  if (shape != cudaSuccess || grid == 0) return shape;
  if (vectorizable(y, sy, batch, rows_in, channels) && vectorizable_output(out, batch, tokens, channels))
    unmerge_kernel<T, 16 / sizeof(T)><<<grid, kThreads, 0, stream>>>(y, sy, rows_in, channels, token_map, batch, tokens, out);
  else
    unmerge_kernel<T, 1><<<grid, kThreads, 0, stream>>>(y, sy, rows_in, channels, token_map, batch, tokens, out);
  return cudaGetLastError();
}

#define TOME_INSTANTIATE(T)                                                                                          \
  template cudaError_t launch_merge<T>(const T*, Strides3, int64_t, SizeView, const Groups&, MergeMode, T*, float*,  \
                                       cudaStream_t);                                                                \
  template cudaError_t launch_merge_wavg_backward<T>(const T*, Strides3, SizeView, const T*, Strides3, int64_t,      \
                                                     SizeView, const Groups&, T*, float*, cudaStream_t);             \
  template cudaError_t launch_merge_backward<T>(const T*, Strides3, const T*, Strides3, const T*, int64_t,          \
                                                const Groups&, MergeMode, T*, cudaStream_t);                         \
  template cudaError_t launch_unmerge<T>(const T*, Strides3, int64_t, int64_t, const int64_t*, int64_t, int64_t, T*, \
                                         cudaStream_t);
TOME_INSTANTIATE(float)
TOME_INSTANTIATE(__half)
TOME_INSTANTIATE(__nv_bfloat16)
#undef TOME_INSTANTIATE

}  // namespace tome_cuda
