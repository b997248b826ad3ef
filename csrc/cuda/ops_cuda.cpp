// The CUDA implementations of the tome_native operators (schemas and conventions: ../ops.cpp):
// input checks, output and scratch allocation, device guard and stream, dtype dispatch to
// the launchers of launchers.h, launch error checks. Compiled by the host compiler: the
// kernels (*.cu) include no PyTorch header, this file no kernel.
//
// Nothing here synchronises with the device or reads device memory, so every operator can
// be captured in a CUDA graph. Sizes go to the kernels as float32 (converted here when they
// come in float16 / bfloat16) and come back as float32; grad_size is converted back to the
// size's dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "launchers.h"

namespace {

using at::Tensor;
using tome_cuda::MergeMode;

// Token positions are int32 in members / row_start.
constexpr int64_t kMaxTokens = int64_t{1} << 30;

void check_float_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "tome_native (CUDA): ", name, " must be a CUDA tensor, got one on ", t.device());
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, "tome_native (CUDA): ", name,
              " must be float32, float16 or bfloat16, got ", type);
}

void check_device(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.device() == like.device(), "tome_native (CUDA): ", name, " must be on ", like.device(), ", got ",
              t.device());
}

// Calls f with a null pointer of the element type matching `type`.
template <typename F>
void dispatch_float(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "tome_native (CUDA): unsupported dtype ", type);
  }
}
#define TOME_ELEMENT(tag) std::remove_pointer_t<decltype(tag)>

template <typename T>
const T* elements(const Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_elements(Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

tome_cuda::Strides3 strides3(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

cudaStream_t current_stream(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

int64_t max_r(int64_t n, bool class_token, bool distill_token) {
  const int64_t unprotected = n - int64_t{class_token} - int64_t{distill_token};
  // With a distill token and N < 4 there is no B token to merge into.
  if (unprotected < 2 || (distill_token && n < 4)) return 0;
  return unprotected / 2;
}

// metric (B, N, D) or keys (B, H, N, Dh): checked, and as the kernels see it.
tome_cuda::MetricView metric_view(const Tensor& metric) {
  check_float_cuda(metric, "metric");
  TORCH_CHECK(metric.dim() == 3 || metric.dim() == 4, "tome_native (CUDA): metric must be (B, N, D) or keys (B, H, N, Dh), got ",
              metric.dim(), " dimensions");
  const bool keys = metric.dim() == 4;
  tome_cuda::MetricView v;
  v.batch = metric.size(0);
  v.heads = keys ? metric.size(1) : 1;
  v.tokens = metric.size(-2);
  v.features = metric.size(-1);
  v.stride_b = metric.stride(0);
  v.stride_h = keys ? metric.stride(1) : 0;
  v.stride_n = metric.stride(-2);
  v.stride_d = metric.stride(-1);
  TORCH_CHECK(v.heads > 0, "tome_native (CUDA): keys must have at least one head");
  TORCH_CHECK(v.tokens < kMaxTokens, "tome_native (CUDA): N must be below 2^30, got ", v.tokens);
  return v;
}

void check_r(int64_t r, int64_t n, bool class_token, bool distill_token) {
  const int64_t hi = max_r(n, class_token, distill_token);
  TORCH_CHECK(r > 0 && r <= hi, "tome_native (CUDA): r must be clamped by the caller to 1..", hi, " for N = ", n,
              " (class_token=", class_token, ", distill_token=", distill_token, "), got ", r);
}

void check_x(const Tensor& x) {
  check_float_cuda(x, "x");
  TORCH_CHECK(x.dim() == 3, "tome_native (CUDA): x must be (B, N, C), got ", x.dim(), " dimensions");
  TORCH_CHECK(x.size(1) < kMaxTokens, "tome_native (CUDA): N must be below 2^30, got ", x.size(1));
}

// size (B, N, 1) as float32 (the same tensor when it already is), or nullopt.
std::optional<Tensor> float_size(const std::optional<Tensor>& size, const Tensor& x) {
  if (!size.has_value()) return std::nullopt;
  const Tensor& s = *size;
  check_float_cuda(s, "size");
  check_device(s, x, "size");
  TORCH_CHECK(s.dim() == 3 && s.size(0) == x.size(0) && s.size(1) == x.size(1) && s.size(2) == 1,
              "tome_native (CUDA): size must be (B, N, 1) = (", x.size(0), ", ", x.size(1), ", 1), got ", s.sizes());
  return s.to(at::kFloat);
}

tome_cuda::SizeView size_view(const std::optional<Tensor>& size_f32) {
  if (!size_f32.has_value()) return {nullptr, 0, 0};
  return {size_f32->const_data_ptr<float>(), size_f32->stride(0), size_f32->stride(1)};
}

// The groups, checked against x (B, N, C) and made contiguous; holds them while used.
struct GroupsArg {
  Tensor members, row_start;
  tome_cuda::Groups view;
};

GroupsArg groups_arg(const Tensor& members, const Tensor& row_start, const Tensor& x) {
  check_device(members, x, "members");
  check_device(row_start, x, "row_start");
  const int64_t b = x.size(0), n = x.size(1);
  TORCH_CHECK(members.scalar_type() == at::kInt && row_start.scalar_type() == at::kInt,
              "tome_native (CUDA): members and row_start must be int32");
  TORCH_CHECK(members.dim() == 2 && members.size(0) == b && members.size(1) == n,
              "tome_native (CUDA): members must be (B, N) = (", b, ", ", n, "), got ", members.sizes());
  TORCH_CHECK(row_start.dim() == 2 && row_start.size(0) == b && row_start.size(1) >= 1 && row_start.size(1) <= n + 1,
              "tome_native (CUDA): row_start must be (B, N - r + 1) with B = ", b, ", N = ", n, ", got ",
              row_start.sizes());
  GroupsArg g{members.contiguous(), row_start.contiguous(), {}};
  g.view = {g.members.const_data_ptr<int32_t>(), g.row_start.const_data_ptr<int32_t>(), b, n, row_start.size(1) - 1};
  return g;
}

// grad (B, rows, C) in x's dtype (converted if it came in another one).
Tensor grad_like(const Tensor& grad, const Tensor& x, int64_t rows, const char* name) {
  check_float_cuda(grad, name);
  check_device(grad, x, name);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == x.size(0) && grad.size(1) == rows && grad.size(2) == x.size(2),
              "tome_native (CUDA): ", name, " must be (", x.size(0), ", ", rows, ", ", x.size(2), "), got ", grad.sizes());
  return grad.to(x.scalar_type());
}

MergeMode parse_mode(c10::string_view mode) {
  if (mode == "sum") return MergeMode::kSum;
  if (mode == "mean") return MergeMode::kMean;
  if (mode == "amax") return MergeMode::kAmax;
  if (mode == "amin") return MergeMode::kAmin;
  TORCH_CHECK(false, "tome_native (CUDA): mode must be one of sum, mean, amax, amin, got ", std::string(mode));
}

// The matching into `out`; the metric is already checked and B > 0.
void run_match(const Tensor& metric, const tome_cuda::MetricView& view, int64_t r, bool class_token, bool distill_token,
               const tome_cuda::MatchOutputs& out) {
  const tome_cuda::MatchGeometry g = tome_cuda::match_geometry(view.batch, view.tokens, view.features);
  Tensor float_scratch = at::empty({g.float_scratch}, metric.options().dtype(at::kFloat));
  Tensor int_scratch = at::empty({g.int_scratch}, metric.options().dtype(at::kInt));
  cudaError_t err = cudaSuccess;
  dispatch_float(metric.scalar_type(), [&](auto tag) {
    using T = TOME_ELEMENT(tag);
    err = tome_cuda::launch_match<T>(elements<T>(metric), view, r, class_token, distill_token,
                                     float_scratch.data_ptr<float>(), int_scratch.data_ptr<int32_t>(), out,
                                     current_stream(metric));
  });
  C10_CUDA_CHECK(err);
}

// out (and size_out for wavg) = merge of x over the groups.
void run_merge(const Tensor& x, const std::optional<Tensor>& size_f32, const tome_cuda::Groups& groups, MergeMode mode,
               Tensor& out, float* size_out) {
  cudaError_t err = cudaSuccess;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = TOME_ELEMENT(tag);
    err = tome_cuda::launch_merge<T>(elements<T>(x), strides3(x), x.size(2), size_view(size_f32), groups, mode,
                                     mutable_elements<T>(out), size_out, current_stream(x));
  });
  C10_CUDA_CHECK(err);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> match_cuda(const Tensor& metric, int64_t r, bool class_token,
                                                                      bool distill_token) {
  const tome_cuda::MetricView view = metric_view(metric);
  const int64_t b = view.batch, n = view.tokens, na = (n + 1) / 2;
  check_r(r, n, class_token, distill_token);
  const auto index = metric.options().dtype(at::kLong);
  Tensor src_idx = at::empty({b, r}, index), dst_idx = at::empty({b, r}, index);
  Tensor unm_idx = at::empty({b, na - r}, index), token_map = at::empty({b, n}, index);
  Tensor members = at::empty({b, n}, metric.options().dtype(at::kInt));
  Tensor row_start = at::empty({b, n - r + 1}, metric.options().dtype(at::kInt));
  if (b > 0) {
    const c10::cuda::CUDAGuard guard(metric.device());
    run_match(metric, view, r, class_token, distill_token,
              {src_idx.data_ptr<int64_t>(), dst_idx.data_ptr<int64_t>(), unm_idx.data_ptr<int64_t>(),
               token_map.data_ptr<int64_t>(), members.data_ptr<int32_t>(), row_start.data_ptr<int32_t>()});
  }
  return {src_idx, dst_idx, unm_idx, token_map, members, row_start};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bipartite_merge_cuda(const Tensor& x, const Tensor& metric,
                                                                const std::optional<Tensor>& size, int64_t r,
                                                                bool class_token, bool distill_token) {
  check_x(x);
  const tome_cuda::MetricView view = metric_view(metric);
  check_device(metric, x, "metric");
  TORCH_CHECK(view.batch == x.size(0) && view.tokens == x.size(1), "tome_native (CUDA): metric must have x's B = ",
              x.size(0), " and N = ", x.size(1), ", got B = ", view.batch, ", N = ", view.tokens);
  const int64_t b = x.size(0), n = x.size(1);
  check_r(r, n, class_token, distill_token);
  const int64_t n_out = n - r;
  const std::optional<Tensor> size_f32 = float_size(size, x);
  Tensor x_out = at::empty({b, n_out, x.size(2)}, x.options());
  Tensor size_out = at::empty({b, n_out, 1}, x.options().dtype(at::kFloat));
  Tensor members = at::empty({b, n}, x.options().dtype(at::kInt));
  Tensor row_start = at::empty({b, n_out + 1}, x.options().dtype(at::kInt));
  if (b > 0) {
    const c10::cuda::CUDAGuard guard(x.device());
    // bipartite_merge returns no index tensors: the layout skips them.
    run_match(metric, view, r, class_token, distill_token,
              {nullptr, nullptr, nullptr, nullptr, members.data_ptr<int32_t>(), row_start.data_ptr<int32_t>()});
    const tome_cuda::Groups groups{members.const_data_ptr<int32_t>(), row_start.const_data_ptr<int32_t>(), b, n, n_out};
    run_merge(x, size_f32, groups, MergeMode::kWavg, x_out, size_out.data_ptr<float>());
  }
  return {x_out, size_out, members, row_start};
}

std::tuple<Tensor, Tensor> merge_wavg_cuda(const Tensor& x, const std::optional<Tensor>& size, const Tensor& members,
                                           const Tensor& row_start) {
  check_x(x);
  const GroupsArg g = groups_arg(members, row_start, x);
  const std::optional<Tensor> size_f32 = float_size(size, x);
  const int64_t b = x.size(0), n_out = g.view.rows_out;
  Tensor x_out = at::empty({b, n_out, x.size(2)}, x.options());
  Tensor size_out = at::empty({b, n_out, 1}, x.options().dtype(at::kFloat));
  if (b > 0) {
    const c10::cuda::CUDAGuard guard(x.device());
    run_merge(x, size_f32, g.view, MergeMode::kWavg, x_out, size_out.data_ptr<float>());
  }
  return {x_out, size_out};
}

std::tuple<Tensor, Tensor> merge_wavg_backward_cuda(const Tensor& grad_out, const Tensor& grad_size_out, const Tensor& x,
                                                    const std::optional<Tensor>& size, const Tensor& members,
                                                    const Tensor& row_start, bool size_grad) {
  check_x(x);
  const GroupsArg g = groups_arg(members, row_start, x);
  const int64_t b = x.size(0), n = x.size(1), n_out = g.view.rows_out;
  const Tensor gy = grad_like(grad_out, x, n_out, "grad_out");
  const std::optional<Tensor> size_f32 = float_size(size, x);
  const bool want_size = size_grad && size_f32.has_value();
  std::optional<Tensor> gsize_f32;
  if (want_size) {
    check_float_cuda(grad_size_out, "grad_size_out");
    check_device(grad_size_out, x, "grad_size_out");
    TORCH_CHECK(grad_size_out.dim() == 3 && grad_size_out.size(0) == b && grad_size_out.size(1) == n_out &&
                    grad_size_out.size(2) == 1,
                "tome_native (CUDA): grad_size_out must be (", b, ", ", n_out, ", 1), got ", grad_size_out.sizes());
    gsize_f32 = grad_size_out.to(at::kFloat);
  }
  Tensor grad_x = at::empty({b, n, x.size(2)}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor grad_size = want_size ? at::empty({b, n, 1}, f32) : at::empty({0}, f32);
  if (b > 0) {
    const c10::cuda::CUDAGuard guard(x.device());
    cudaError_t err = cudaSuccess;
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = TOME_ELEMENT(tag);
      err = tome_cuda::launch_merge_wavg_backward<T>(
          elements<T>(gy), strides3(gy), size_view(gsize_f32), elements<T>(x), strides3(x), x.size(2), size_view(size_f32),
          g.view, mutable_elements<T>(grad_x), want_size ? grad_size.data_ptr<float>() : nullptr, current_stream(x));
    });
    C10_CUDA_CHECK(err);
  }
  // grad_size in the size's dtype, as autograd expects.
  if (want_size && size->scalar_type() != at::kFloat) grad_size = grad_size.to(size->scalar_type());
  return {grad_x, grad_size};
}

Tensor merge_cuda(const Tensor& x, const Tensor& members, const Tensor& row_start, c10::string_view mode) {
  check_x(x);
  const MergeMode m = parse_mode(mode);
  const GroupsArg g = groups_arg(members, row_start, x);
  Tensor out = at::empty({x.size(0), g.view.rows_out, x.size(2)}, x.options());
  if (x.size(0) > 0) {
    const c10::cuda::CUDAGuard guard(x.device());
    run_merge(x, std::nullopt, g.view, m, out, nullptr);
  }
  return out;
}

Tensor merge_backward_cuda(const Tensor& grad_out, const Tensor& x, const Tensor& out, const Tensor& members,
                           const Tensor& row_start, c10::string_view mode) {
  check_x(x);
  const MergeMode m = parse_mode(mode);
  const GroupsArg g = groups_arg(members, row_start, x);
  const Tensor gy = grad_like(grad_out, x, g.view.rows_out, "grad_out");
  // The forward output, read by amax / amin only, contiguous as the kernel expects.
  const Tensor y = grad_like(out, x, g.view.rows_out, "out").contiguous();
  Tensor grad_x = at::empty(x.sizes(), x.options());
  if (x.size(0) > 0) {
    const c10::cuda::CUDAGuard guard(x.device());
    cudaError_t err = cudaSuccess;
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = TOME_ELEMENT(tag);
      err = tome_cuda::launch_merge_backward<T>(elements<T>(gy), strides3(gy), elements<T>(x), strides3(x), elements<T>(y),
                                                x.size(2), g.view, m, mutable_elements<T>(grad_x), current_stream(x));
    });
    C10_CUDA_CHECK(err);
  }
  return grad_x;
}

Tensor unmerge_cuda(const Tensor& y, const Tensor& token_map, const Tensor& members, const Tensor& row_start) {
  check_float_cuda(y, "y");
  TORCH_CHECK(y.dim() == 3, "tome_native (CUDA): y must be (B, N - r, C), got ", y.dim(), " dimensions");
  check_device(token_map, y, "token_map");
  check_device(members, y, "members");
  check_device(row_start, y, "row_start");
  const int64_t b = y.size(0);
  TORCH_CHECK(token_map.scalar_type() == at::kLong && token_map.dim() == 2 && token_map.size(0) == b,
              "tome_native (CUDA): token_map must be int64 (B, N) with B = ", b, ", got ", token_map.scalar_type(), " ",
              token_map.sizes());
  const int64_t n = token_map.size(1);
  // The groups serve the backward only; they must still describe this map.
  TORCH_CHECK(members.dim() == 2 && members.size(0) == b && members.size(1) == n,
              "tome_native (CUDA): members must be (B, N) = (", b, ", ", n, "), got ", members.sizes());
  const Tensor map = token_map.contiguous();
  Tensor out = at::empty({b, n, y.size(2)}, y.options());
  if (b > 0) {
    const c10::cuda::CUDAGuard guard(y.device());
    cudaError_t err = cudaSuccess;
    dispatch_float(y.scalar_type(), [&](auto tag) {
      using T = TOME_ELEMENT(tag);
      err = tome_cuda::launch_unmerge<T>(elements<T>(y), strides3(y), y.size(1), y.size(2), map.const_data_ptr<int64_t>(), b,
                                         n, mutable_elements<T>(out), current_stream(y));
    });
    C10_CUDA_CHECK(err);
  }
  return out;
}

// roles (int8) or window (int32): (B, N) or (1, N) on the metric's device, as a (B, N)
// view (batch stride 0 when shared by the batch).
Tensor per_token(const Tensor& t, const Tensor& metric, const tome_cuda::MetricView& v, const char* name,
                 at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device() == metric.device(), "tome_native::assign (CUDA): ", name, " must be on ", metric.device(),
                    ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "tome_native::assign (CUDA): ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && (t.size(0) == v.batch || t.size(0) == 1) && t.size(1) == v.tokens,
                    "tome_native::assign (CUDA): ", name, " must be (B, N) or (1, N) with B = ", v.batch, " and N = ",
                    v.tokens, ", got ", t.sizes());
  return t.expand({v.batch, v.tokens});
}

std::tuple<Tensor, Tensor> assign_cuda(const Tensor& metric, const Tensor& roles, const std::optional<Tensor>& window) {
  const tome_cuda::MetricView view = metric_view(metric);
  const Tensor role = per_token(roles, metric, view, "roles", at::kChar);
  const std::optional<Tensor> win =
      window.has_value() ? std::optional<Tensor>(per_token(*window, metric, view, "window", at::kInt)) : std::nullopt;
  Tensor best = at::empty({view.batch, view.tokens}, metric.options().dtype(at::kFloat));
  Tensor dst = at::empty({view.batch, view.tokens}, metric.options().dtype(at::kLong));
  if (view.batch > 0 && view.tokens > 0) {
    const c10::cuda::CUDAGuard guard(metric.device());
    Tensor scratch = at::empty({tome_cuda::similarity_scratch(view)}, metric.options().dtype(at::kFloat));
    const tome_cuda::TokenRoles roles_view{role.const_data_ptr<int8_t>(),
                                           role.stride(0),
                                           role.stride(1),
                                           win ? win->const_data_ptr<int32_t>() : nullptr,
                                           win ? win->stride(0) : 0,
                                           win ? win->stride(1) : 0};
    cudaError_t err = cudaSuccess;
    dispatch_float(metric.scalar_type(), [&](auto tag) {
      using T = TOME_ELEMENT(tag);
      err = tome_cuda::launch_assign<T>(elements<T>(metric), view, roles_view, scratch.data_ptr<float>(),
                                        best.data_ptr<float>(), dst.data_ptr<int64_t>(), current_stream(metric));
    });
    C10_CUDA_CHECK(err);
  }
  return {best, dst};
}

Tensor energy_cuda(const Tensor& metric, double margin, double alpha, int64_t form) {
  TORCH_CHECK_VALUE(form == tome_cuda::kPaperForm || form == tome_cuda::kEluForm || form == tome_cuda::kGaussianForm,
                    "tome_native::energy (CUDA): form must be 0 (paper), 1 (elu) or 2 (gaussian), got ", form);
  const tome_cuda::MetricView view = metric_view(metric);
  Tensor energy = at::empty({view.batch, view.tokens}, metric.options().dtype(at::kFloat));
  if (view.batch > 0 && view.tokens > 0) {
    const c10::cuda::CUDAGuard guard(metric.device());
    Tensor scratch = at::empty({tome_cuda::similarity_scratch(view)}, metric.options().dtype(at::kFloat));
    cudaError_t err = cudaSuccess;
    dispatch_float(metric.scalar_type(), [&](auto tag) {
      using T = TOME_ELEMENT(tag);
      // f is evaluated in float32 with the margin, alpha and sigma = 1 - margin rounded to
      // float32, as the reference evaluates it on its float32 similarities with Python-float
      // scalars (sigma made in double first, as the reference's `1.0 - margin`).
      err = tome_cuda::launch_energy<T>(elements<T>(metric), view, static_cast<float>(margin),
                                        static_cast<float>(alpha), static_cast<float>(1.0 - margin),
                                        static_cast<int>(form), scratch.data_ptr<float>(), energy.data_ptr<float>(),
                                        current_stream(metric));
    });
    C10_CUDA_CHECK(err);
  }
  return energy;
}

}  // namespace

TORCH_LIBRARY_IMPL(tome_native, CUDA, m) {
  m.impl("match", &match_cuda);
  m.impl("bipartite_merge", &bipartite_merge_cuda);
  m.impl("merge_wavg", &merge_wavg_cuda);
  m.impl("merge_wavg_backward", &merge_wavg_backward_cuda);
  m.impl("merge", &merge_cuda);
  m.impl("merge_backward", &merge_backward_cuda);
  m.impl("unmerge", &unmerge_cuda);
  m.impl("assign", &assign_cuda);
  m.impl("energy", &energy_cuda);
}
