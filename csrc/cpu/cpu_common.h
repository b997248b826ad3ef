// What the CPU operators share: argument checks, the reference's dtype rules, and the
// split of (batch row, output row) work over threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "group_rows.h"

namespace tome_cpu {

// Accumulation dtype of a merge: float32, or float64 when x or size is float64 (the
// reference promotes x's accumulation dtype with the size dtype).
inline at::ScalarType acc_dtype(const at::Tensor& x, const std::optional<at::Tensor>& size) {
  const bool dbl = x.scalar_type() == at::kDouble || (size.has_value() && size->scalar_type() == at::kDouble);
  return dbl ? at::kDouble : at::kFloat;
}

// Sizes come back in float32 unless they were given in float64.
inline at::ScalarType size_out_dtype(const std::optional<at::Tensor>& size) {
  return size.has_value() && size->scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "tome_native (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "tome_native (CPU): ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_tokens(const at::Tensor& x, const char* name) {
  check_cpu_float(x, name);
  TORCH_CHECK(x.dim() == 3, "tome_native (CPU): ", name, " must be (B, N, C), got ", x.sizes());
}

inline void check_size(const std::optional<at::Tensor>& size, int64_t B, int64_t N) {
  if (!size.has_value()) return;
  check_cpu_float(*size, "size");
  TORCH_CHECK(size->dim() == 3 && size->size(0) == B && size->size(1) == N && size->size(2) == 1,
              "tome_native (CPU): size must be (", B, ", ", N, ", 1), got ", size->sizes());
}

// (B, N) sizes in the accumulation dtype, contiguous; undefined when no size was given.
inline at::Tensor sizes_as(const std::optional<at::Tensor>& size, at::ScalarType dtype) {
  if (!size.has_value()) return at::Tensor();
  return size->select(2, 0).to(dtype).contiguous();
}

// The groups must describe a partition of the N input tokens into n_out rows; bad ones
// would make the kernels read or write out of bounds, so they are checked in full (O(B N)).
inline void check_groups(const at::Tensor& members, const at::Tensor& row_start, int64_t B, int64_t N) {
  TORCH_CHECK(members.device().is_cpu() && row_start.device().is_cpu(), "tome_native (CPU): members and row_start must be CPU tensors");
  TORCH_CHECK(members.scalar_type() == at::kInt && row_start.scalar_type() == at::kInt,
              "tome_native (CPU): members and row_start must be int32");
  TORCH_CHECK(members.dim() == 2 && members.size(0) == B && members.size(1) == N,
              "tome_native (CPU): members must be (", B, ", ", N, "), got ", members.sizes());
  TORCH_CHECK(row_start.dim() == 2 && row_start.size(0) == B && row_start.size(1) >= 1 && row_start.size(1) <= N + 1,
              "tome_native (CPU): row_start must be (", B, ", N - r + 1), got ", row_start.sizes());
  const int64_t n_out = row_start.size(1) - 1;
  const auto m = members.contiguous();
  const auto s = row_start.contiguous();
  const int32_t* pm = m.data_ptr<int32_t>();
  const int32_t* ps = s.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* start = ps + b * (n_out + 1);
    TORCH_CHECK(start[0] == 0 && start[n_out] == N, "tome_native (CPU): row_start must run from 0 to N");
    for (int64_t o = 0; o < n_out; ++o) {
      TORCH_CHECK(start[o + 1] > start[o], "tome_native (CPU): every output row needs a member");
    }
    for (int64_t k = 0; k < N; ++k) {
      const int32_t t = pm[b * N + k];
      TORCH_CHECK(t >= 0 && t < N, "tome_native (CPU): members must be token indices in [0, N)");
    }
  }
}

// The checked shapes and (contiguous) groups every operator that applies a matching starts from.
struct GroupedInputs {
  int64_t B, N, C, n_out;
  at::Tensor members, row_start;
};

inline GroupedInputs check_grouped(const at::Tensor& x, const std::optional<at::Tensor>& size, const at::Tensor& members,
                                   const at::Tensor& row_start) {
  check_tokens(x, "x");
  const int64_t B = x.size(0), N = x.size(1);
  check_size(size, B, N);
  GroupedInputs in{B, N, x.size(2), 0, members.contiguous(), row_start.contiguous()};
  check_groups(in.members, in.row_start, B, N);
  in.n_out = in.row_start.size(1) - 1;
  return in;
}

// (B, n_out, 1) sizes in the dtype the reference returns, from the accumulated (B, n_out).
inline at::Tensor size_output(const at::Tensor& accumulated, const std::optional<at::Tensor>& size) {
  return accumulated.to(size_out_dtype(size)).unsqueeze(-1);
}

inline Mode parse_mode(const std::string& mode) {
  if (mode == "sum") return Mode::kSum;
  if (mode == "mean") return Mode::kMean;
  if (mode == "amax") return Mode::kAmax;
  if (mode == "amin") return Mode::kAmin;
  TORCH_CHECK(false, "tome_native (CPU): mode must be one of sum, mean, amax, amin, got '", mode, "'");
}

// Calls f(b, o0, o1) over every batch row b and rows [o0, o1) of it, in parallel, with
// chunks of at least about 32768 elements (rows x channels) of work.
template <typename F>
void for_each_rows(int64_t B, int64_t rows, int64_t channels, F f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(channels, 1));
  at::parallel_for(0, B * rows, grain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t b = begin / rows, o0 = begin % rows;
      const int64_t o1 = std::min(rows, o0 + (end - begin));
      f(b, o0, o1);
      begin += o1 - o0;
    }
  });
}

// Calls f(acc_t{}) with acc_t the accumulation type for acc.
template <typename F>
void with_acc_type(at::ScalarType acc, F f) {
  if (acc == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

// Batch row b of the (B, N) sizes, or null when no size was given.
template <typename acc_t>
const acc_t* batch_sizes(const at::Tensor& sizes, int64_t b, int64_t N) {
  return sizes.defined() ? sizes.data_ptr<acc_t>() + b * N : nullptr;
}

// A batch row of a (B, N, C) tensor.
template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& t, int64_t b) {
  return {t.data_ptr<scalar_t>() + b * t.stride(0), t.stride(1), t.stride(2)};
}

inline Groups groups_of(const at::Tensor& members, const at::Tensor& row_start, int64_t b) {
  return {members.data_ptr<int32_t>() + b * members.size(1), row_start.data_ptr<int32_t>() + b * row_start.size(1)};
}

}  // namespace tome_cpu
