// CPU kernels of the row reductions over the token-token cosine similarity of a batch row:
// `assign` (each source token's best destination, tome_kernels/reference/partition.py) and
// `energy` (PiToMe's energy, tome_kernels/reference/energy.py).
//
// Both start from the unit rows of the metric (keys averaged over heads as they are read),
// rounded to float32 as the reference scores them, in a (B, N, D) scratch. Tiles of up to
// 128 rows are then multiplied with a block of rows by PyTorch's CPU BLAS (at::mm) into a
// tile-sized buffer that one scan reduces: the N x N similarity never exists. Work is split
// over (batch row, tile), and the tiles depend on the shapes and roles only, never on the
// thread count, so every thread count gives the same bits.
//
// For `assign` each batch row's scratch holds its destinations first, then its sources (each
// in token order), and skips every other token: a tile of sources times the block of
// destinations is the whole product (sources x destinations dot products, not N x N).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace tome_cpu {
namespace {

constexpr double kNormEps = 1e-12;  // reference.NORM_EPS: a zero row stays zero
constexpr int64_t kTile = 128;      // rows per product tile (a 128 x block buffer)
constexpr int8_t kSource = 1;       // partition.SOURCE
constexpr int8_t kDest = 2;         // partition.DEST
// partition._NAN_SCORE: an allowed destination whose score is NaN ranks below any cosine
// but above every token that is no allowed destination (-inf).
constexpr float kNanScore = -3.0f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// metric (B, N, D) or keys (B, H, N, Dh) as the kernels read it (s_h unused when H = 1).
struct MetricLayout {
  int64_t B, N, H, D;
  int64_t s_b, s_h, s_n, s_d;
};

MetricLayout check_metric(const at::Tensor& metric, const char* op) {
  TORCH_CHECK_VALUE(metric.device().is_cpu(), "tome_native::", op, " (CPU): metric must be a CPU tensor, got ",
                    metric.device());
  const auto type = metric.scalar_type();
  TORCH_CHECK_TYPE(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble,
                   "tome_native::", op, " (CPU): metric must be float16, bfloat16, float32 or float64, got ", type);
  TORCH_CHECK_VALUE(metric.dim() == 3 || metric.dim() == 4, "tome_native::", op,
                    " (CPU): metric must be (B, N, D) or keys (B, H, N, Dh), got ", metric.sizes());
  const bool keys = metric.dim() == 4;
  MetricLayout m;
  m.B = metric.size(0);
  m.H = keys ? metric.size(1) : 1;
  m.N = metric.size(-2);
  m.D = metric.size(-1);
  m.s_b = metric.stride(0);
  m.s_h = keys ? metric.stride(1) : 0;
  m.s_n = metric.stride(-2);
  m.s_d = metric.stride(-1);
  TORCH_CHECK_VALUE(m.H > 0, "tome_native::", op, " (CPU): keys (B, H, N, Dh) need at least one head, got ",
                    metric.sizes());
  return m;
}

// roles (int8) or window (int32): (B, N) or (1, N) on the CPU, returned as a (B, N) view
// (batch stride 0 when shared by the batch).
at::Tensor per_token(const at::Tensor& t, const char* name, at::ScalarType dtype, const MetricLayout& m) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "tome_native::assign (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "tome_native::assign (CPU): ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && (t.size(0) == m.B || t.size(0) == 1) && t.size(1) == m.N,
                    "tome_native::assign (CPU): ", name, " must be (B, N) or (1, N) with B = ", m.B, " and N = ", m.N,
                    ", got ", t.sizes());
  return t.expand({m.B, m.N});
}

// The scoring precision of the normalisation: float64 for float64 metrics (as
// reference.score_dtype), float32 otherwise.
template <typename metric_t>
using norm_type = std::conditional_t<std::is_same<metric_t, double>::value, double, float>;

// The unit row of token n of batch row b into out (D floats): the mean over heads, divided
// by max(norm, 1e-12), then rounded to float32 (the reference's `normalized_metric(...).float()`).
// row is a D-element work buffer.
template <typename metric_t>
void unit_row(const metric_t* metric, const MetricLayout& m, int64_t b, int64_t n, std::vector<norm_type<metric_t>>& row,
              float* out) {
  using norm_t = norm_type<metric_t>;
  const metric_t* token = metric + b * m.s_b + n * m.s_n;
  std::fill(row.begin(), row.end(), norm_t(0));
  // Heads outermost: each head's features are read front to back.
  for (int64_t h = 0; h < m.H; ++h) {
    const metric_t* head = token + h * m.s_h;
    for (int64_t d = 0; d < m.D; ++d) row[d] += static_cast<norm_t>(head[d * m.s_d]);
  }
  norm_t squares = 0;
  for (int64_t d = 0; d < m.D; ++d) {
    row[d] /= static_cast<norm_t>(m.H);
    squares += row[d] * row[d];
  }
  const norm_t denom = std::max(std::sqrt(squares), static_cast<norm_t>(kNormEps));
  for (int64_t d = 0; d < m.D; ++d) out[d] = static_cast<float>(row[d] / denom);
}

// unit[b, s] = the unit row of token `token_of(b, s)` for every slot s < `used(b)`.
template <typename TokenOf, typename Used>
void normalise_slots(const at::Tensor& metric, const MetricLayout& m, float* unit, TokenOf token_of, Used used) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "tome_native similarity (CPU)", [&] {
    const scalar_t* data = metric.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(m.D * m.H, 1));
    at::parallel_for(0, m.B * m.N, grain, [&](int64_t begin, int64_t end) {
      std::vector<norm_type<scalar_t>> row(m.D);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t b = k / m.N, s = k % m.N;
        if (s < used(b)) unit_row(data, m, b, token_of(b, s), row, unit + k * m.D);
      }
    });
  });
}

// Calls tile(b, t) for every batch row b and tile t < tiles of it, in parallel.
template <typename F>
void for_each_tile(int64_t B, int64_t tiles, F tile) {
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) tile(k / tiles, k % tiles);
  });
}

std::tuple<at::Tensor, at::Tensor> assign_cpu(const at::Tensor& metric, const at::Tensor& roles,
                                              const std::optional<at::Tensor>& window) {
  const MetricLayout m = check_metric(metric, "assign");
  const at::Tensor role = per_token(roles, "roles", at::kChar, m);
  const bool windowed = window.has_value();
  const at::Tensor win = windowed ? per_token(*window, "window", at::kInt, m) : at::Tensor();
  auto best = at::empty({m.B, m.N}, metric.options().dtype(at::kFloat));
  auto dst = at::empty({m.B, m.N}, metric.options().dtype(at::kLong));
  if (m.B == 0 || m.N == 0) return {best, dst};

  // Slots of each batch row: destinations, then sources, in token order; their tokens and
  // windows. Tokens that are no source keep best = -inf, dst = -1.
  auto slot_token = at::empty({m.B, m.N}, dst.options());
  auto slot_window = at::empty({windowed ? m.B : 0, m.N}, metric.options().dtype(at::kInt));
  std::vector<int64_t> n_dest(m.B), n_source(m.B);
  {
    const int8_t* p_role = role.const_data_ptr<int8_t>();
    const int32_t* p_win = windowed ? win.const_data_ptr<int32_t>() : nullptr;
    const int64_t sr_b = role.stride(0), sr_n = role.stride(1);
    const int64_t sw_b = windowed ? win.stride(0) : 0, sw_n = windowed ? win.stride(1) : 0;
    int64_t* p_slot = slot_token.data_ptr<int64_t>();
    int32_t* p_slot_win = slot_window.data_ptr<int32_t>();
    float* p_best = best.data_ptr<float>();
    int64_t* p_dst = dst.data_ptr<int64_t>();
    at::parallel_for(0, m.B, std::max<int64_t>(1, 4096 / m.N), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t slots = 0;
        auto take = [&](int8_t wanted) {
          for (int64_t n = 0; n < m.N; ++n) {
            if (p_role[b * sr_b + n * sr_n] != wanted) continue;
            p_slot[b * m.N + slots] = n;
            if (windowed) p_slot_win[b * m.N + slots] = p_win[b * sw_b + n * sw_n];
            ++slots;
          }
        };
        take(kDest);
        n_dest[b] = slots;
        take(kSource);
        n_source[b] = slots - n_dest[b];
        std::fill(p_best + b * m.N, p_best + (b + 1) * m.N, -kInf);
        std::fill(p_dst + b * m.N, p_dst + (b + 1) * m.N, int64_t{-1});
      }
    });
  }

  auto unit = at::empty({m.B, m.N, m.D}, metric.options().dtype(at::kFloat));
  const int64_t* slots = slot_token.const_data_ptr<int64_t>();
  normalise_slots(
      metric, m, unit.data_ptr<float>(), [&](int64_t b, int64_t s) { return slots[b * m.N + s]; },
      [&](int64_t b) { return n_dest[b] + n_source[b]; });

  const int32_t* slot_win = slot_window.const_data_ptr<int32_t>();
  float* p_best = best.data_ptr<float>();
  int64_t* p_dst = dst.data_ptr<int64_t>();
  for_each_tile(m.B, (m.N + kTile - 1) / kTile, [&](int64_t b, int64_t t) {
    const int64_t nd = n_dest[b], first = t * kTile;
    if (nd == 0 || first >= n_source[b]) return;  // nothing to score: the defaults stand
    const int64_t rows = std::min(kTile, n_source[b] - first);
    const auto block = unit[b];
    const auto scores = at::mm(block.narrow(0, nd + first, rows), block.narrow(0, 0, nd).t()).contiguous();
    const float* score = scores.const_data_ptr<float>();
    const int64_t* token = slots + b * m.N;
    const int32_t* ids = windowed ? slot_win + b * m.N : nullptr;
    for (int64_t r = 0; r < rows; ++r, score += nd) {
      const int64_t s = nd + first + r;
      float top = -kInf;
      int64_t arg = -1;
      // Destinations come in token order and only a strictly greater score replaces: ties go
      // to the lowest token index.
      for (int64_t k = 0; k < nd; ++k) {
        if (windowed && ids[k] != ids[s]) continue;
        const float v = std::isnan(score[k]) ? kNanScore : score[k];
        if (v > top) {
          top = v;
          arg = token[k];
        }
      }
      // arg stays -1 only when no destination was allowed; a best of kNanScore was a NaN.
      p_best[b * m.N + token[s]] = top > kNanScore ? top : -kInf;
      p_dst[b * m.N + token[s]] = arg;
    }
  });
  return {best, dst};
}

at::Tensor energy_cpu(const at::Tensor& metric, double margin, double alpha, bool shifted) {
  const MetricLayout m = check_metric(metric, "energy");
  auto energy = at::empty({m.B, m.N}, metric.options().dtype(at::kFloat));
  if (m.B == 0 || m.N == 0) return energy;
  auto unit = at::empty({m.B, m.N, m.D}, energy.options());
  normalise_slots(
      metric, m, unit.data_ptr<float>(), [](int64_t, int64_t s) { return s; }, [&](int64_t) { return m.N; });

  // f in float32, as the reference evaluates it on its float32 similarities; the mean
  // accumulates in float64.
  const float m_f = static_cast<float>(margin), alpha_f = static_cast<float>(alpha);
  float* out = energy.data_ptr<float>();
  for_each_tile(m.B, (m.N + kTile - 1) / kTile, [&](int64_t b, int64_t t) {
    const int64_t first = t * kTile, rows = std::min(kTile, m.N - first);
    const auto block = unit[b];
    const auto scores = at::mm(block.narrow(0, first, rows), block.t()).contiguous();
    const float* score = scores.const_data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r, score += m.N) {
      double total = 0;
      int64_t count = 0;
      for (int64_t j = 0; j < m.N; ++j) {
        const float x = score[j];
        if (std::isnan(x)) continue;  // NaN similarities are left out of the mean
        total += x >= m_f ? (shifted ? x - m_f : x) : alpha_f * std::expm1(x - m_f);
        ++count;
      }
      out[b * m.N + first + r] = count > 0 ? static_cast<float>(total / static_cast<double>(count)) : -kInf;
    }
  });
  return energy;
}

}  // namespace
}  // namespace tome_cpu

TORCH_LIBRARY_IMPL(tome_native, CPU, m) {
  m.impl("assign", &tome_cpu::assign_cpu);
  m.impl("energy", &tome_cpu::energy_cpu);
}
