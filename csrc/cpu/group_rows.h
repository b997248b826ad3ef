// Row kernels of the CPU merge: each reduces (or differentiates) the group of one output
// row, members[row_start[o] : row_start[o + 1]] (see csrc/ops.cpp), over all C channels.
//
// A row is written by exactly one call in a fixed member order, so results are identical
// run after run whatever the thread count. Accumulation is in acc_t (float32, or float64
// for float64 inputs or sizes, as the reference promotes). The channel loops are written
// over a contiguous accumulator and, when x's channel stride is 1 (kContig), over
// contiguous rows, so that the compiler vectorises them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace tome_cpu {

enum class Mode { kWavg, kSum, kMean, kAmax, kAmin };

// One batch row of a (B, N, C) tensor with arbitrary strides, in elements.
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t token_stride;
  int64_t channel_stride;

  const scalar_t* row(int64_t token) const { return data + token * token_stride; }
};

// The groups of one batch row.
struct Groups {
  const int32_t* members;
  const int32_t* row_start;

  const int32_t* begin(int64_t o) const { return members + row_start[o]; }
  int64_t count(int64_t o) const { return row_start[o + 1] - row_start[o]; }
  // A token alone in its group (a kept token, or a destination nothing merged into): its
  // row is an exact copy, as in the reference.
  bool is_copy(int64_t o) const { return count(o) == 1; }
};

// out[0:C] = src[0:C]. float32 rows go out with non-temporal stores where the hardware has
// them: the output is written once and not read back soon, so fetching its cache lines
// first (what a plain store does) would add a third stream of memory traffic to the
// merge's two (read x, write out). Callers end with stream_fence() before the rows are read.
template <typename scalar_t>
inline void write_row(scalar_t* out, const scalar_t* src, int64_t C) {
#if defined(__SSE2__)
  if (std::is_same<scalar_t, float>::value && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
    float* o = reinterpret_cast<float*>(out);
    const float* v = reinterpret_cast<const float*>(src);
    int64_t c = 0;
    for (; c + 4 <= C; c += 4) _mm_stream_ps(o + c, _mm_loadu_ps(v + c));
    for (; c < C; ++c) o[c] = v[c];
    return;
  }
#endif
  std::copy(src, src + C, out);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <bool kContig, typename scalar_t>
inline scalar_t load(const scalar_t* row, int64_t c, int64_t channel_stride) {
  return kContig ? row[c] : row[c * channel_stride];
}

// size of token t (ones when no size was given).
template <typename acc_t>
inline acc_t token_size(const acc_t* size, int32_t t) {
  return size ? size[t] : acc_t(1);
}

// out_row = reduction of x over row o's group; with kWavg also *size_out = sum of sizes.
// buf: C accumulators.
template <Mode kMode, bool kContig, typename scalar_t, typename acc_t>
void merge_row(const Rows<scalar_t>& x, const acc_t* size, const Groups& groups, int64_t o, int64_t C,
               scalar_t* out_row, acc_t* size_out, acc_t* buf) {
  const int32_t* member = groups.begin(o);
  const int64_t count = groups.count(o);
  const int64_t sc = x.channel_stride;
  if (groups.is_copy(o)) {
    const scalar_t* x0 = x.row(member[0]);
    if (kContig) {
      write_row(out_row, x0, C);
    } else {
      for (int64_t c = 0; c < C; ++c) out_row[c] = load<kContig>(x0, c, sc);
    }
    if (kMode == Mode::kWavg) *size_out = token_size(size, member[0]);
    return;
  }
  acc_t total = 0;
  const acc_t w0 = kMode == Mode::kWavg ? token_size(size, member[0]) : acc_t(1);
  const scalar_t* x0 = x.row(member[0]);
  for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<acc_t>(load<kContig>(x0, c, sc)) * w0;
  total += w0;
  for (int64_t k = 1; k < count; ++k) {
    const scalar_t* xk = x.row(member[k]);
    if (kMode == Mode::kWavg) {
      const acc_t w = token_size(size, member[k]);
      total += w;
      for (int64_t c = 0; c < C; ++c) buf[c] += static_cast<acc_t>(load<kContig>(xk, c, sc)) * w;
    } else if (kMode == Mode::kSum || kMode == Mode::kMean) {
      for (int64_t c = 0; c < C; ++c) buf[c] += static_cast<acc_t>(load<kContig>(xk, c, sc));
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(load<kContig>(xk, c, sc));
        // NaN propagates (as scatter_reduce does): a NaN candidate wins, a NaN result stays.
        const bool take = kMode == Mode::kAmax ? v > buf[c] : v < buf[c];
        buf[c] = (take || std::isnan(v)) ? v : buf[c];
      }
    }
  }
  if (kMode == Mode::kWavg || kMode == Mode::kMean) {
    // One division per row, then products: a vector division per element cost about a
    // quarter of the merge (the result is within about an ulp of dividing each element).
    const acc_t scale = acc_t(1) / (kMode == Mode::kWavg ? total : static_cast<acc_t>(count));
    for (int64_t c = 0; c < C; ++c) buf[c] *= scale;
  }
  if (kMode == Mode::kWavg) *size_out = total;
  if (std::is_same<scalar_t, acc_t>::value) {
    write_row(out_row, reinterpret_cast<const scalar_t*>(buf), C);
  } else {
    // Sums round once to x's dtype; max and min are exact in any dtype.
    for (int64_t c = 0; c < C; ++c) out_row[c] = static_cast<scalar_t>(buf[c]);
  }
}

// Gradients of the weighted merge for row o's group. With y = sum_k x_k s_k / S over the
// group and S = sum_k s_k: dx_k = (gy / S) s_k and
// ds_k = (<gy, x_k> - <gy, y>) / S + gsize, where gsize is the gradient of size_out[o].
// <gy, y> = sum_k s_k <gy, x_k> / S, so each member's x is read once: its <gy, x_k> is
// parked in gs until the sum is complete. A copied row passes gy and gsize through. gx is
// (N, C) contiguous for this batch row; gs (N) is written only when non-null.
template <bool kContig, typename scalar_t, typename acc_t>
void merge_wavg_backward_row(const Rows<scalar_t>& gy_rows, acc_t gsize, const Rows<scalar_t>& x, const acc_t* size,
                             const Groups& groups, int64_t o, int64_t C, scalar_t* gx, acc_t* gs) {
  const int32_t* member = groups.begin(o);
  const int64_t count = groups.count(o);
  const scalar_t* gy = gy_rows.row(o);
  const int64_t sg = gy_rows.channel_stride;
  if (groups.is_copy(o)) {
    scalar_t* gx_row = gx + member[0] * C;
    for (int64_t c = 0; c < C; ++c) gx_row[c] = load<kContig>(gy, c, sg);
    if (gs) gs[member[0]] = gsize;
    return;
  }
  acc_t total = 0;
  for (int64_t k = 0; k < count; ++k) total += token_size(size, member[k]);
  acc_t weighted_dots = 0;  // sum_k s_k <gy, x_k> = S <gy, y>
  for (int64_t k = 0; k < count; ++k) {
    const acc_t w = token_size(size, member[k]);
    scalar_t* gx_row = gx + member[k] * C;
    for (int64_t c = 0; c < C; ++c) gx_row[c] = static_cast<scalar_t>(static_cast<acc_t>(load<kContig>(gy, c, sg)) / total * w);
    if (gs) {
      const scalar_t* xk = x.row(member[k]);
      acc_t gy_dot_x = 0;
      for (int64_t c = 0; c < C; ++c) {
        gy_dot_x += static_cast<acc_t>(load<kContig>(gy, c, sg)) * static_cast<acc_t>(load<kContig>(xk, c, x.channel_stride));
      }
      gs[member[k]] = gy_dot_x;
      weighted_dots += w * gy_dot_x;
    }
  }
  if (!gs) return;
  const acc_t gy_dot_y = weighted_dots / total;
  for (int64_t k = 0; k < count; ++k) gs[member[k]] = (gs[member[k]] - gy_dot_y) / total + gsize;
}

// Gradient of the unweighted modes for row o's group into contiguous gx (N, C): sum passes
// gy to every member, mean gy / count; amax and amin share gy evenly between the members
// equal to the result y (as PyTorch's scatter_reduce does). ties: C accumulators.
template <Mode kMode, bool kContig, typename scalar_t, typename acc_t>
void merge_backward_row(const Rows<scalar_t>& gy_rows, const Rows<scalar_t>& x, const scalar_t* y_row,
                        const Groups& groups, int64_t o, int64_t C, scalar_t* gx, acc_t* ties) {
  const int32_t* member = groups.begin(o);
  const int64_t count = groups.count(o);
  const scalar_t* gy = gy_rows.row(o);
  const int64_t sg = gy_rows.channel_stride, sx = x.channel_stride;
  if (groups.is_copy(o) || kMode == Mode::kSum || kMode == Mode::kMean) {
    for (int64_t k = 0; k < count; ++k) {
      scalar_t* gx_row = gx + member[k] * C;
      if (kMode == Mode::kMean && count > 1) {
        const acc_t n = static_cast<acc_t>(count);
        for (int64_t c = 0; c < C; ++c) gx_row[c] = static_cast<scalar_t>(static_cast<acc_t>(load<kContig>(gy, c, sg)) / n);
      } else {
        for (int64_t c = 0; c < C; ++c) gx_row[c] = load<kContig>(gy, c, sg);
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) ties[c] = 0;
  for (int64_t k = 0; k < count; ++k) {
    const scalar_t* xk = x.row(member[k]);
    for (int64_t c = 0; c < C; ++c) ties[c] += static_cast<acc_t>(load<kContig>(xk, c, sx) == y_row[c]);
  }
  for (int64_t k = 0; k < count; ++k) {
    const scalar_t* xk = x.row(member[k]);
    scalar_t* gx_row = gx + member[k] * C;
    for (int64_t c = 0; c < C; ++c) {
      const bool hit = load<kContig>(xk, c, sx) == y_row[c];
      gx_row[c] = hit ? static_cast<scalar_t>(static_cast<acc_t>(load<kContig>(gy, c, sg)) / ties[c]) : scalar_t(0);
    }
  }
}

// The output rows of one batch row ordered by the token that leads each group (a kept A
// token, or the B token): merging them in this order reads x front to back, where output
// order would read the even tokens, then the odd ones (measured: two strided passes copy
// about a quarter slower than one sequential pass).
inline std::vector<int32_t> rows_in_token_order(const Groups& groups, int64_t N, int64_t n_out) {
  std::vector<int32_t> leading(N, -1);
  for (int64_t o = 0; o < n_out; ++o) leading[*groups.begin(o)] = static_cast<int32_t>(o);
  std::vector<int32_t> order;
  order.reserve(n_out);
  for (int64_t t = 0; t < N; ++t) {
    if (leading[t] >= 0) order.push_back(leading[t]);
  }
  return order;
}

// merge_row over the rows [k0, k1) of rows_in_token_order of one batch row of N tokens
// and n_out output rows; out is that batch row of the contiguous (n_out, C) output and
// size_out of its (n_out) sizes (kWavg only).
template <Mode kMode, typename scalar_t, typename acc_t>
void merge_rows_mode(const Rows<scalar_t>& x, const acc_t* size, const Groups& groups, int64_t N, int64_t n_out,
                     int64_t k0, int64_t k1, int64_t C, scalar_t* out, acc_t* size_out) {
  std::vector<acc_t> buf(C);
  const std::vector<int32_t> order = rows_in_token_order(groups, N, n_out);
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t o = order[k];
    acc_t* size_o = size_out ? size_out + o : nullptr;
    if (x.channel_stride == 1) {
      merge_row<kMode, true>(x, size, groups, o, C, out + o * C, size_o, buf.data());
    } else {
      merge_row<kMode, false>(x, size, groups, o, C, out + o * C, size_o, buf.data());
    }
  }
  stream_fence();
}

template <typename scalar_t, typename acc_t>
void merge_rows(Mode mode, const Rows<scalar_t>& x, const acc_t* size, const Groups& groups, int64_t N, int64_t n_out,
                int64_t k0, int64_t k1, int64_t C, scalar_t* out, acc_t* size_out) {
  switch (mode) {
    case Mode::kWavg: return merge_rows_mode<Mode::kWavg>(x, size, groups, N, n_out, k0, k1, C, out, size_out);
    case Mode::kSum: return merge_rows_mode<Mode::kSum>(x, size, groups, N, n_out, k0, k1, C, out, size_out);
    case Mode::kMean: return merge_rows_mode<Mode::kMean>(x, size, groups, N, n_out, k0, k1, C, out, size_out);
    case Mode::kAmax: return merge_rows_mode<Mode::kAmax>(x, size, groups, N, n_out, k0, k1, C, out, size_out);
    case Mode::kAmin: return merge_rows_mode<Mode::kAmin>(x, size, groups, N, n_out, k0, k1, C, out, size_out);
  }
}

}  // namespace tome_cpu
