// CPU kernels of the row reductions over the token-token cosine similarity of a batch row:
// `assign` (each source token's best destination, tome_kernels/reference/partition.py) and
// `energy` (PiToMe's energy, tome_kernels/reference/energy.py).
//
// Both score in the reference's precision (reference.score_dtype): float64 for a float64
// metric, float32 for the others (float16, bfloat16 and float32 metrics). They start from the
// unit rows of the metric (keys averaged over heads as they are read) in that precision, in
// a (B, N, D) scratch. Tiles of up to 128 rows are then multiplied with a block of rows by
// PyTorch's CPU BLAS (at::mm) into a tile-sized buffer that one scan reduces: the N x N
// similarity never exists. Work is split over (batch row, tile), and the tiles depend on the
// shapes and roles only, never on the thread count, so every thread count gives the same bits.
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
constexpr double kNanScore = -3.0;
// The forms of PiToMe's f, by their codes (energy.FORMS.index(name)).
constexpr int64_t kPaper = 0;
constexpr int64_t kElu = 1;
constexpr int64_t kGaussian = 2;

template <typename score_t>
constexpr score_t infinity() {
  return std::numeric_limits<score_t>::infinity();
}

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

// The scoring precision of a metric dtype (reference.score_dtype): float64 for float64
// metrics, float32 otherwise.
template <typename metric_t>
using score_type = std::conditional_t<std::is_same<metric_t, double>::value, double, float>;

// The unit row of token n of batch row b into out (D values), all in score_t: the mean over
// heads, divided by max(norm, 1e-12) (the reference's `normalized_metric`). row is a
// D-element work buffer.
template <typename score_t, typename metric_t>
void unit_row(const metric_t* metric, const MetricLayout& m, int64_t b, int64_t n, std::vector<score_t>& row,
              score_t* out) {
  const metric_t* token = metric + b * m.s_b + n * m.s_n;
  std::fill(row.begin(), row.end(), score_t(0));
  // Heads outermost: each head's features are read front to back.
  for (int64_t h = 0; h < m.H; ++h) {
    const metric_t* head = token + h * m.s_h;
    for (int64_t d = 0; d < m.D; ++d) row[d] += static_cast<score_t>(head[d * m.s_d]);
  }
  score_t squares = 0;
  for (int64_t d = 0; d < m.D; ++d) {
    row[d] /= static_cast<score_t>(m.H);
    squares += row[d] * row[d];
  }
  const score_t denom = std::max(std::sqrt(squares), static_cast<score_t>(kNormEps));
  for (int64_t d = 0; d < m.D; ++d) out[d] = row[d] / denom;
}

// unit[b, s] = the unit row of token `token_of(b, s)` for every slot s < `used(b)`, in
// score_t, which is score_type of the metric's dtype (the callers choose it so).
template <typename score_t, typename TokenOf, typename Used>
void normalise_slots(const at::Tensor& metric, const MetricLayout& m, score_t* unit, TokenOf token_of, Used used) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "tome_native similarity (CPU)", [&] {
    // A float64 metric normalised in float32, or a float32 one in float64, would be a wrong
    // precision: the callers never ask for one.
    TORCH_INTERNAL_ASSERT((std::is_same<score_type<scalar_t>, score_t>::value));
    const scalar_t* data = metric.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(m.D * m.H, 1));
    at::parallel_for(0, m.B * m.N, grain, [&](int64_t begin, int64_t end) {
      std::vector<score_t> row(m.D);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t b = k / m.N, s = k % m.N;
        if (s < used(b)) unit_row(data, m, b, token_of(b, s), row, unit + k * m.D);
      }
    });
  });
}

// The scoring dtype of a metric, as a tensor dtype.
at::ScalarType score_dtype(const at::Tensor& metric) {
  return metric.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Calls tile(b, t) for every batch row b and tile t < tiles of it, in parallel.
template <typename F>
void for_each_tile(int64_t B, int64_t tiles, F tile) {
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) tile(k / tiles, k % tiles);
  });
}

// assign in score_t, the scoring precision of the metric's dtype: best (B, N) in score_t and
// dst (B, N) int64, as partition.assign.
template <typename score_t>
std::tuple<at::Tensor, at::Tensor> assign_scored(const at::Tensor& metric, const MetricLayout& m,
                                                 const at::Tensor& role, const at::Tensor& win, bool windowed) {
  constexpr score_t kInf = infinity<score_t>();
  constexpr score_t kNan = static_cast<score_t>(kNanScore);
  at::Tensor best = at::empty({m.B, m.N}, metric.options().dtype(c10::CppTypeToScalarType<score_t>::value));
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
    score_t* p_best = best.data_ptr<score_t>();
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

  at::Tensor unit = at::empty({m.B, m.N, m.D}, best.options());
  const int64_t* slots = slot_token.const_data_ptr<int64_t>();
  normalise_slots(
      metric, m, unit.data_ptr<score_t>(), [&](int64_t b, int64_t s) { return slots[b * m.N + s]; },
      [&](int64_t b) { return n_dest[b] + n_source[b]; });

  const int32_t* slot_win = slot_window.const_data_ptr<int32_t>();
  score_t* p_best = best.data_ptr<score_t>();
  int64_t* p_dst = dst.data_ptr<int64_t>();
  for_each_tile(m.B, (m.N + kTile - 1) / kTile, [&](int64_t b, int64_t t) {
    const int64_t nd = n_dest[b], first = t * kTile;
    if (nd == 0 || first >= n_source[b]) return;  // nothing to score: the defaults stand
    const int64_t rows = std::min(kTile, n_source[b] - first);
    const auto block = unit[b];
    const auto scores = at::mm(block.narrow(0, nd + first, rows), block.narrow(0, 0, nd).t()).contiguous();
    const score_t* score = scores.const_data_ptr<score_t>();
    const int64_t* token = slots + b * m.N;
    const int32_t* ids = windowed ? slot_win + b * m.N : nullptr;
    for (int64_t r = 0; r < rows; ++r, score += nd) {
      const int64_t s = nd + first + r;
      score_t top = -kInf;
      int64_t arg = -1;
      // Destinations come in token order and only a strictly greater score replaces: ties go
      // to the lowest token index.
      for (int64_t k = 0; k < nd; ++k) {
        if (windowed && ids[k] != ids[s]) continue;
        const score_t v = std::isnan(score[k]) ? kNan : score[k];
        if (v > top) {
          top = v;
          arg = token[k];
        }
      }
      // arg stays -1 only when no destination was allowed; a best of kNan was a NaN.
      p_best[b * m.N + token[s]] = top > kNan ? top : -kInf;
      p_dst[b * m.N + token[s]] = arg;
    }
  });
  return {best, dst};
}

std::tuple<at::Tensor, at::Tensor> assign_cpu(const at::Tensor& metric, const at::Tensor& roles,
                                              const std::optional<at::Tensor>& window) {
  const MetricLayout m = check_metric(metric, "assign");
  const at::Tensor role = per_token(roles, "roles", at::kChar, m);
  const bool windowed = window.has_value();
  const at::Tensor win = windowed ? per_token(*window, "window", at::kInt, m) : at::Tensor();
  if (score_dtype(metric) == at::kDouble) return assign_scored<double>(metric, m, role, win, windowed);
  return assign_scored<float>(metric, m, role, win, windowed);
}

// The running sum of a token's f terms. float32 terms (score_t = float) go into a plain
// double, whose rounding errors stay far below float32's for any N these rows have.
template <typename score_t>
struct EnergySum {
  double total = 0;
  void add(float x) { total += x; }
  double value() const { return total; }
};

// float64 terms go into a compensated (Neumaier) sum. A plain float64 sum's error grows with
// N: measured on N = 400 tokens, up to 8.5 ulps of the largest energy, against 1 to 1.5 for
// the reference, whose torch.sum adds pairwise (the tests allow twice that plus 4 ulps).
template <>
struct EnergySum<double> {
  double total = 0, carry = 0;
  void add(double x) {
    const double t = total + x;
    // What the addition rounded off, taken from the smaller operand.
    carry += std::abs(total) >= std::abs(x) ? (total - t) + x : (x - t) + total;
    total = t;
  }
  double value() const { return total + carry; }
};

// energy[b, i] = the mean of f(cos(i, j)) over the tokens j whose cosine is not NaN (-inf
// where none is), f evaluated in score_t: every tile of 128 tokens times all N unit rows.
template <typename score_t, typename F>
void energy_rows(const at::Tensor& unit, const MetricLayout& m, score_t* out, F f) {
  for_each_tile(m.B, (m.N + kTile - 1) / kTile, [&](int64_t b, int64_t t) {
    const int64_t first = t * kTile, rows = std::min(kTile, m.N - first);
    const auto block = unit[b];
    const auto scores = at::mm(block.narrow(0, first, rows), block.t()).contiguous();
    const score_t* score = scores.const_data_ptr<score_t>();
    for (int64_t r = 0; r < rows; ++r, score += m.N) {
      EnergySum<score_t> total;
      int64_t count = 0;
      for (int64_t j = 0; j < m.N; ++j) {
        const score_t x = score[j];
        if (std::isnan(x)) continue;  // NaN similarities are left out of the mean
        total.add(f(x));
        ++count;
      }
      out[b * m.N + first + r] =
          count > 0 ? static_cast<score_t>(total.value() / static_cast<double>(count)) : -infinity<score_t>();
    }
  });
}

// energy in score_t, the scoring precision of the metric's dtype: (B, N) in score_t.
template <typename score_t>
at::Tensor energy_scored(const at::Tensor& metric, const MetricLayout& m, double margin, double alpha, int64_t form) {
  at::Tensor energy = at::empty({m.B, m.N}, metric.options().dtype(c10::CppTypeToScalarType<score_t>::value));
  if (m.B == 0 || m.N == 0) return energy;
  at::Tensor unit = at::empty({m.B, m.N, m.D}, energy.options());
  normalise_slots(
      metric, m, unit.data_ptr<score_t>(), [](int64_t, int64_t s) { return s; }, [&](int64_t) { return m.N; });

  // f in score_t with the margin, alpha and sigma rounded to it, as the reference evaluates
  // f on its similarities with Python-float scalars; sigma = 1 - margin is made in double
  // first, as the reference's `1.0 - margin`.
  const score_t m_s = static_cast<score_t>(margin), alpha_s = static_cast<score_t>(alpha);
  const score_t sigma = static_cast<score_t>(1.0 - margin);
  score_t* out = energy.data_ptr<score_t>();
  if (form == kPaper) {
    energy_rows(unit, m, out, [=](score_t x) { return x >= m_s ? x : alpha_s * std::expm1(x - m_s); });
  } else if (form == kElu) {
    energy_rows(unit, m, out, [=](score_t x) { return x >= m_s ? x - m_s : alpha_s * std::expm1(x - m_s); });
  } else {
    energy_rows(unit, m, out, [=](score_t x) {
      const score_t t = (score_t(1) - x) / sigma;
      return std::exp(score_t(-0.5) * (t * t));
    });
  }
  return energy;
}

at::Tensor energy_cpu(const at::Tensor& metric, double margin, double alpha, int64_t form) {
  TORCH_CHECK_VALUE(form == kPaper || form == kElu || form == kGaussian,
                    "tome_native::energy (CPU): form must be 0 (paper), 1 (elu) or 2 (gaussian), got ", form);
  const MetricLayout m = check_metric(metric, "energy");
  if (score_dtype(metric) == at::kDouble) return energy_scored<double>(metric, m, margin, alpha, form);
  return energy_scored<float>(metric, m, margin, alpha, form);
}

}  // namespace
}  // namespace tome_cpu

TORCH_LIBRARY_IMPL(tome_native, CPU, m) {
  m.impl("assign", &tome_cpu::assign_cpu);
  m.impl("energy", &tome_cpu::energy_cpu);
}
