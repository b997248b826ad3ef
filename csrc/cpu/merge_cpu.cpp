// CPU kernels of the operators that apply a matching's groups: merge_wavg, merge (sum,
// mean, amax, amin), their backwards, and unmerge. Work is split over (batch row, output
// row) chunks with at::parallel_for; each output row is computed by one thread in a fixed
// order (group_rows.h), so results do not depend on the thread count.
#include <torch/library.h>

#include <ATen/OpMathType.h>

#include <tuple>

#include "cpu_common.h"

namespace tome_cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> merge_groups(const at::Tensor& x, const std::optional<at::Tensor>& size,
                                                const at::Tensor& members, const at::Tensor& row_start, Mode mode) {
  const auto in = check_grouped(x, size, members, row_start);
  const int64_t B = in.B, N = in.N, C = in.C, n_out = in.n_out;
  const auto &m = in.members, &starts = in.row_start;
  const auto acc = acc_dtype(x, size);
  const auto sizes = sizes_as(size, acc);
  auto out = at::empty({B, n_out, C}, x.options());
  auto size_out = at::empty({B, n_out}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_native::merge (CPU)", [&] {
    with_acc_type(acc, [&](auto acc_value) {
      using acc_t = decltype(acc_value);
      scalar_t* p_out = out.data_ptr<scalar_t>();
      acc_t* p_size_out = size_out.data_ptr<acc_t>();
      for_each_rows(B, n_out, C, [&](int64_t b, int64_t k0, int64_t k1) {
        merge_rows<scalar_t, acc_t>(mode, rows_of<scalar_t>(x, b), batch_sizes<acc_t>(sizes, b, N), groups_of(m, starts, b),
                                    N, n_out, k0, k1, C, p_out + b * n_out * C, p_size_out + b * n_out);
      });
    });
  });
  return {out, size_output(size_out, size)};
}

std::tuple<at::Tensor, at::Tensor> merge_wavg_cpu(const at::Tensor& x, const std::optional<at::Tensor>& size,
                                                  const at::Tensor& members, const at::Tensor& row_start) {
  return merge_groups(x, size, members, row_start, Mode::kWavg);
}

at::Tensor merge_cpu(const at::Tensor& x, const at::Tensor& members, const at::Tensor& row_start, c10::string_view mode) {
  return std::get<0>(merge_groups(x, std::nullopt, members, row_start, parse_mode(std::string(mode))));
}

void check_grad(const at::Tensor& grad, const at::Tensor& x, int64_t rows, const char* name) {
  check_tokens(grad, name);
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(1) == rows && grad.size(2) == x.size(2), "tome_native (CPU): ", name,
              " must be (", x.size(0), ", ", rows, ", ", x.size(2), "), got ", grad.sizes());
}

std::tuple<at::Tensor, at::Tensor> merge_wavg_backward_cpu(const at::Tensor& grad_out, const at::Tensor& grad_size_out,
                                                           const at::Tensor& x, const std::optional<at::Tensor>& size,
                                                           const at::Tensor& members, const at::Tensor& row_start,
                                                           bool size_grad) {
  const auto in = check_grouped(x, size, members, row_start);
  const int64_t B = in.B, N = in.N, C = in.C, n_out = in.n_out;
  const auto &m = in.members, &starts = in.row_start;
  check_grad(grad_out, x, n_out, "grad_out");
  TORCH_CHECK(grad_size_out.numel() == B * n_out, "tome_native (CPU): grad_size_out must be (", B, ", ", n_out, ", 1)");
  size_grad = size_grad && size.has_value();
  const auto acc = acc_dtype(x, size);
  const auto sizes = sizes_as(size, acc);
  // Autograd hands the gradient in the output's dtype, x's; convert anything else.
  const auto gy = grad_out.to(x.scalar_type());
  const auto gsize = grad_size_out.reshape({B, n_out}).to(acc).contiguous();
  auto grad_x = at::empty({B, N, C}, x.options());
  auto grad_size = size_grad ? at::empty({B, N}, x.options().dtype(acc)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_native::merge_wavg_backward (CPU)", [&] {
    with_acc_type(acc, [&](auto acc_value) {
      using acc_t = decltype(acc_value);
      const bool contig = gy.stride(2) == 1 && x.stride(2) == 1;
      for_each_rows(B, n_out, C, [&](int64_t b, int64_t o0, int64_t o1) {
        const auto gy_rows = rows_of<scalar_t>(gy, b), x_rows = rows_of<scalar_t>(x, b);
        const auto groups = groups_of(m, starts, b);
        const acc_t* s = batch_sizes<acc_t>(sizes, b, N);
        scalar_t* gx = grad_x.data_ptr<scalar_t>() + b * N * C;
        acc_t* gs = size_grad ? grad_size.data_ptr<acc_t>() + b * N : nullptr;
        const acc_t* g_size = gsize.data_ptr<acc_t>() + b * n_out;
        for (int64_t o = o0; o < o1; ++o) {
          if (contig) {
            merge_wavg_backward_row<true>(gy_rows, g_size[o], x_rows, s, groups, o, C, gx, gs);
          } else {
            merge_wavg_backward_row<false>(gy_rows, g_size[o], x_rows, s, groups, o, C, gx, gs);
          }
        }
      });
    });
  });
  if (!size_grad) return {grad_x, at::empty({0}, x.options().dtype(at::kFloat))};
  return {grad_x, grad_size.to(size->scalar_type()).unsqueeze(-1)};
}

template <Mode kMode, typename scalar_t>
void merge_backward_rows(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& y, const at::Tensor& m,
                         const at::Tensor& starts, at::Tensor& grad_x) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), n_out = starts.size(1) - 1;
  const bool contig = gy.stride(2) == 1 && x.stride(2) == 1;
  for_each_rows(B, n_out, C, [&](int64_t b, int64_t o0, int64_t o1) {
    std::vector<at::opmath_type<scalar_t>> ties(C);
    const auto gy_rows = rows_of<scalar_t>(gy, b), x_rows = rows_of<scalar_t>(x, b);
    const auto groups = groups_of(m, starts, b);
    scalar_t* gx = grad_x.data_ptr<scalar_t>() + b * N * C;
    for (int64_t o = o0; o < o1; ++o) {
      const scalar_t* y_row = y.data_ptr<scalar_t>() + (b * n_out + o) * C;
      if (contig) {
        merge_backward_row<kMode, true>(gy_rows, x_rows, y_row, groups, o, C, gx, ties.data());
      } else {
        merge_backward_row<kMode, false>(gy_rows, x_rows, y_row, groups, o, C, gx, ties.data());
      }
    }
  });
}

at::Tensor merge_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out,
                              const at::Tensor& members, const at::Tensor& row_start, c10::string_view mode_name) {
  const auto in = check_grouped(x, std::nullopt, members, row_start);
  const int64_t n_out = in.n_out;
  const auto &m = in.members, &starts = in.row_start;
  check_grad(grad_out, x, n_out, "grad_out");
  check_grad(out, x, n_out, "out");
  const Mode mode = parse_mode(std::string(mode_name));
  const auto gy = grad_out.to(x.scalar_type());
  const auto y = out.to(x.scalar_type()).contiguous();
  auto grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_native::merge_backward (CPU)", [&] {
    switch (mode) {
      case Mode::kSum: return merge_backward_rows<Mode::kSum, scalar_t>(gy, x, y, m, starts, grad_x);
      case Mode::kMean: return merge_backward_rows<Mode::kMean, scalar_t>(gy, x, y, m, starts, grad_x);
      case Mode::kAmax: return merge_backward_rows<Mode::kAmax, scalar_t>(gy, x, y, m, starts, grad_x);
      case Mode::kAmin: return merge_backward_rows<Mode::kAmin, scalar_t>(gy, x, y, m, starts, grad_x);
      case Mode::kWavg: break;
    }
  });
  return grad_x;
}

at::Tensor unmerge_cpu(const at::Tensor& y, const at::Tensor& token_map, const at::Tensor& members,
                       const at::Tensor& row_start) {
  check_tokens(y, "y");
  const int64_t B = y.size(0), n_out = y.size(1), C = y.size(2);
  TORCH_CHECK(token_map.dim() == 2 && token_map.size(0) == B && token_map.scalar_type() == at::kLong,
              "tome_native (CPU): token_map must be int64 (", B, ", N), got ", token_map.scalar_type(), " ", token_map.sizes());
  const int64_t N = token_map.size(1);
  const auto map = token_map.contiguous();
  TORCH_CHECK(B == 0 || N == 0 || (map.min().item<int64_t>() >= 0 && map.max().item<int64_t>() < n_out),
              "tome_native (CPU): token_map entries must be rows of y, in [0, ", n_out, ")");
  auto out = at::empty({B, N, C}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "tome_native::unmerge (CPU)", [&] {
    const int64_t* p_map = map.data_ptr<int64_t>();
    scalar_t* p_out = out.data_ptr<scalar_t>();
    for_each_rows(B, N, C, [&](int64_t b, int64_t k0, int64_t k1) {
      const auto y_rows = rows_of<scalar_t>(y, b);
      for (int64_t k = k0; k < k1; ++k) {
        const scalar_t* src = y_rows.row(p_map[b * N + k]);
        scalar_t* dst = p_out + (b * N + k) * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = src[c * y_rows.channel_stride];
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace tome_cpu

TORCH_LIBRARY_IMPL(tome_native, CPU, m) {
  m.impl("merge_wavg", &tome_cpu::merge_wavg_cpu);
  m.impl("merge_wavg_backward", &tome_cpu::merge_wavg_backward_cpu);
  m.impl("merge", &tome_cpu::merge_cpu);
  m.impl("merge_backward", &tome_cpu::merge_backward_cpu);
  m.impl("unmerge", &tome_cpu::unmerge_cpu);
}
