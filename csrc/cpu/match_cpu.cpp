// CPU kernels of the matching: `match` (the plan's indices and groups) and
// `bipartite_merge` (matching and weighted merge in one call, one pass over x).
//
// Per batch row: (1) the metric rows, keys averaged over heads as they are read, are
// normalised into a small float32 (float64 for float64 metrics) scratch; (2) each A token's
// best score and destination, from tiles of 128 A rows times all B rows (a BLAS product
// into a tile-sized buffer: the N x N score matrix never exists); (3) the stable ranking
// and the output layout, O(N log N); (4) with x, the weighted merge of every output row.
// With at least as many batch rows as threads, each thread takes whole rows and runs the
// four phases back to back while the row's scratch is in cache; with fewer, the rows run
// one after another and each phase is split over tokens instead.
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "cpu_common.h"

namespace tome_cpu {
namespace {

constexpr double kNormEps = 1e-12;  // reference.NORM_EPS: a zero row stays zero
constexpr int64_t kTileA = 128;     // A rows per score tile (a 128 x Nb buffer)

struct Problem {
  int64_t B, N, Na, Nb, H, D, r;
  bool class_token, distill_token;
  int64_t n_unm() const { return Na - r; }
  int64_t n_out() const { return N - r; }
};

// The plan's tensors; the four int64 index tensors are left undefined when not wanted.
struct MatchOutputs {
  at::Tensor src_idx, dst_idx, unm_idx, token_map, members, row_start;
};

// Merges the output rows [k0, k1) of batch row b, counted in token order (group_rows.h).
using MergeRowsFn = std::function<void(int64_t b, int64_t k0, int64_t k1)>;

int64_t max_r(int64_t N, bool class_token, bool distill_token) {
  // As reference.clamp_r: with a distill token and N < 4 there is no destination at all.
  if (distill_token && N < 4) return 0;
  return (N - int64_t(class_token) - int64_t(distill_token)) / 2;
}

Problem check_problem(const at::Tensor& metric, int64_t r, bool class_token, bool distill_token) {
  check_cpu_float(metric, "metric");
  TORCH_CHECK(metric.dim() == 3 || metric.dim() == 4,
              "tome_native (CPU): metric must be (B, N, D) or keys (B, H, N, Dh), got ", metric.sizes());
  const bool keys = metric.dim() == 4;
  Problem p;
  p.B = metric.size(0);
  p.N = metric.size(keys ? 2 : 1);
  p.H = keys ? metric.size(1) : 1;
  p.D = metric.size(keys ? 3 : 2);
  p.Na = (p.N + 1) / 2;
  p.Nb = p.N / 2;
  p.r = r;
  p.class_token = class_token;
  p.distill_token = distill_token;
  TORCH_CHECK(p.H > 0 && p.D > 0, "tome_native (CPU): metric needs at least one head and one feature, got ", metric.sizes());
  const int64_t limit = max_r(p.N, class_token, distill_token);
  TORCH_CHECK(r >= 1 && r <= limit, "tome_native (CPU): r must be clamped by the caller to 1..", limit, " for N = ", p.N,
              ", got ", r);
  return p;
}

// The scoring dtype: float32, float64 for float64 metrics (as reference.score_dtype).
template <typename metric_t>
using score_type = std::conditional_t<std::is_same<metric_t, double>::value, double, float>;

// Eight independent partial sums: one running sum would be a chain of dependent additions
// (the compiler may not reorder them), which made this the slowest loop of the matching.
template <typename score_t>
score_t sum_of_squares(const score_t* v, int64_t n) {
  score_t partial[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int l = 0; l < 8; ++l) partial[l] += v[d + l] * v[d + l];
  }
  score_t total = 0;
  for (; d < n; ++d) total += v[d] * v[d];
  for (int l = 0; l < 8; ++l) total += partial[l];
  return total;
}

template <typename metric_t>
class RowMatcher {
 public:
  using score_t = score_type<metric_t>;

  RowMatcher(const at::Tensor& metric, const Problem& p, const MatchOutputs& out)
      : p_(p), out_(out), metric_(metric.data_ptr<metric_t>()) {
    const bool keys = metric.dim() == 4;
    s_b_ = metric.stride(0);
    s_h_ = keys ? metric.stride(1) : 0;
    s_n_ = metric.stride(keys ? 2 : 1);
    s_d_ = metric.stride(keys ? 3 : 2);
    const auto options = metric.options().dtype(c10::CppTypeToScalarType<score_t>::value);
    a_rows_ = at::empty({p.B, p.Na, p.D}, options);
    b_rows_ = at::empty({p.B, p.Nb, p.D}, options);
    best_ = at::empty({p.B, p.Na}, options);
    dst_ = at::empty({p.B, p.Na}, options.dtype(at::kLong));
  }

  // Phase 1: unit-norm rows of tokens [n0, n1), the mean over heads taken as they load.
  void normalise(int64_t b, int64_t n0, int64_t n1) const {
    // Contiguous features (the usual layout) get a loop the compiler vectorises.
    if (s_d_ == 1) {
      normalise_rows<true>(b, n0, n1);
    } else {
      normalise_rows<false>(b, n0, n1);
    }
  }

  // Phase 2: best score and destination of A tokens [i0, i1). NaN never wins; ties go to
  // the lowest j (strictly greater replaces); the distill column is no candidate.
  void match(int64_t b, int64_t i0, int64_t i1) const {
    const auto b_rows = b_rows_[b];
    score_t* best = best_.template data_ptr<score_t>() + b * p_.Na;
    int64_t* dst = dst_.template data_ptr<int64_t>() + b * p_.Na;
    const int64_t j0 = p_.distill_token ? 1 : 0;
    for (int64_t t0 = i0; t0 < i1; t0 += kTileA) {
      const int64_t t1 = std::min(i1, t0 + kTileA);
      const auto scores = at::mm(a_rows_[b].narrow(0, t0, t1 - t0), b_rows.t()).contiguous();
      const score_t* s = scores.template data_ptr<score_t>();
      for (int64_t i = t0; i < t1; ++i, s += p_.Nb) {
        score_t top = -std::numeric_limits<score_t>::infinity();
        int64_t arg = j0;  // a row with nothing finite goes to the first candidate
        for (int64_t j = j0; j < p_.Nb; ++j) {
          if (s[j] > top) {
            top = s[j];
            arg = j;
          }
        }
        best[i] = top;
        dst[i] = arg;
      }
    }
  }

  // Phase 3: ranking, the plan's indices and the groups (csrc/ops.cpp), in O(N log N).
  void layout(int64_t b) const {
    const int64_t Na = p_.Na, Nb = p_.Nb, r = p_.r, n_unm = p_.n_unm(), n_out = p_.n_out();
    const score_t* best = best_.template data_ptr<score_t>() + b * Na;
    const int64_t* dst = dst_.template data_ptr<int64_t>() + b * Na;

    // Rank by best score, descending, ties to the lower index; the class token goes last.
    std::vector<int64_t> order(Na);
    std::iota(order.begin(), order.end(), 0);
    const int64_t first = p_.class_token ? 1 : 0;
    std::stable_sort(order.begin() + first, order.end(), [&](int64_t i, int64_t j) { return best[i] > best[j]; });
    if (p_.class_token) std::rotate(order.begin(), order.begin() + 1, order.end());
    std::vector<int64_t> unm(order.begin() + r, order.end());
    // With a class token the kept tokens stay in index order (the class token first).
    if (p_.class_token) std::sort(unm.begin(), unm.end());
    std::vector<char> is_src(Na, 0);
    std::vector<int32_t> sources(Nb, 0);
    for (int64_t k = 0; k < r; ++k) {
      is_src[order[k]] = 1;
      ++sources[dst[order[k]]];
    }

    // Output rows: [kept A, B] or, with a distill token, [class, distill, other kept A, other B].
    auto b_row = [&](int64_t j) { return p_.distill_token && j == 0 ? 1 : n_unm + j; };
    auto unm_row = [&](int64_t k) { return p_.distill_token && k >= 1 ? k + 1 : k; };
    std::vector<int32_t> row_token(n_out);
    for (int64_t k = 0; k < n_unm; ++k) row_token[unm_row(k)] = static_cast<int32_t>(2 * unm[k]);
    for (int64_t j = 0; j < Nb; ++j) row_token[b_row(j)] = static_cast<int32_t>(2 * j + 1);

    // Groups: each row's members contiguous, a B token first, then its sources by A index.
    int32_t* members = out_.members.data_ptr<int32_t>() + b * p_.N;
    int32_t* row_start = out_.row_start.data_ptr<int32_t>() + b * (n_out + 1);
    std::vector<int32_t> next_slot(Nb, 0);
    int32_t pos = 0;
    for (int64_t o = 0; o < n_out; ++o) {
      const int32_t t = row_token[o];
      row_start[o] = pos;
      members[pos] = t;
      if (t % 2 == 1) {
        next_slot[t / 2] = pos + 1;
        pos += 1 + sources[t / 2];
      } else {
        pos += 1;
      }
    }
    row_start[n_out] = pos;
    for (int64_t i = 0; i < Na; ++i) {
      if (is_src[i]) members[next_slot[dst[i]]++] = static_cast<int32_t>(2 * i);
    }

    if (!out_.token_map.defined()) return;
    int64_t* src_idx = out_.src_idx.data_ptr<int64_t>() + b * r;
    int64_t* dst_idx = out_.dst_idx.data_ptr<int64_t>() + b * r;
    int64_t* unm_idx = out_.unm_idx.data_ptr<int64_t>() + b * n_unm;
    int64_t* token_map = out_.token_map.data_ptr<int64_t>() + b * p_.N;
    for (int64_t k = 0; k < r; ++k) {
      src_idx[k] = order[k];
      dst_idx[k] = dst[order[k]];
      token_map[2 * order[k]] = b_row(dst[order[k]]);
    }
    for (int64_t k = 0; k < n_unm; ++k) {
      unm_idx[k] = unm[k];
      token_map[2 * unm[k]] = unm_row(k);
    }
    for (int64_t j = 0; j < Nb; ++j) token_map[2 * j + 1] = b_row(j);
  }

 private:
  template <bool kContig>
  void normalise_rows(int64_t b, int64_t n0, int64_t n1) const {
    std::vector<score_t> row(p_.D);
    for (int64_t n = n0; n < n1; ++n) {
      const metric_t* token = metric_ + b * s_b_ + n * s_n_;
      // Sixteen features at a time summed over every head in registers; a running row in
      // memory would be loaded and stored again for each head (this loop was the
      // matching's hot spot).
      int64_t d0 = 0;
      for (; d0 + 16 <= p_.D; d0 += 16) {
        score_t acc[16] = {};
        for (int64_t h = 0; h < p_.H; ++h) {
          const metric_t* src = token + h * s_h_ + d0 * s_d_;
          for (int l = 0; l < 16; ++l) acc[l] += static_cast<score_t>(load<kContig>(src, l, s_d_));
        }
        std::copy(acc, acc + 16, row.begin() + d0);
      }
      for (int64_t d = d0; d < p_.D; ++d) {
        score_t acc = 0;
        for (int64_t h = 0; h < p_.H; ++h) acc += static_cast<score_t>(load<kContig>(token + h * s_h_, d, s_d_));
        row[d] = acc;
      }
      if (p_.H > 1) {
        for (int64_t d = 0; d < p_.D; ++d) row[d] /= static_cast<score_t>(p_.H);
      }
      const score_t denom = std::max(std::sqrt(sum_of_squares(row.data(), p_.D)), static_cast<score_t>(kNormEps));
      const bool is_a = n % 2 == 0;
      score_t* dst = (is_a ? a_rows_ : b_rows_).template data_ptr<score_t>() + (b * (is_a ? p_.Na : p_.Nb) + n / 2) * p_.D;
      for (int64_t d = 0; d < p_.D; ++d) dst[d] = row[d] / denom;
    }
  }

  const Problem p_;
  const MatchOutputs out_;
  const metric_t* metric_;
  int64_t s_b_, s_h_, s_n_, s_d_;
  at::Tensor a_rows_, b_rows_, best_, dst_;
};

// Runs every phase for every batch row, then merge(b, k0, k1) when given.
void run_matching(const at::Tensor& metric, const Problem& p, const MatchOutputs& out, const MergeRowsFn* merge) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "tome_native::match (CPU)", [&] {
    const RowMatcher<scalar_t> matcher(metric, p, out);
    if (p.B >= at::get_num_threads()) {
      // Rows are handed out one at a time as threads free up, not split in equal shares
      // up front: on a shared machine one slowed thread would otherwise hold up the call.
      std::atomic<int64_t> next_row{0};
      at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
        for (int64_t b = next_row++; b < p.B; b = next_row++) {
          matcher.normalise(b, 0, p.N);
          matcher.match(b, 0, p.Na);
          matcher.layout(b);
          if (merge) (*merge)(b, 0, p.n_out());
        }
      });
      return;
    }
    for (int64_t b = 0; b < p.B; ++b) {
      at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) { matcher.normalise(b, n0, n1); });
      at::parallel_for(0, p.Na, 16, [&](int64_t i0, int64_t i1) { matcher.match(b, i0, i1); });
      matcher.layout(b);
      if (merge) at::parallel_for(0, p.n_out(), 8, [&](int64_t k0, int64_t k1) { (*merge)(b, k0, k1); });
    }
  });
}

MatchOutputs groups_for(const at::Tensor& metric, const Problem& p) {
  const auto options = metric.options().dtype(at::kInt);
  MatchOutputs out;
  out.members = at::empty({p.B, p.N}, options);
  out.row_start = at::empty({p.B, p.n_out() + 1}, options);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> match_cpu(
    const at::Tensor& metric, int64_t r, bool class_token, bool distill_token) {
  const Problem p = check_problem(metric, r, class_token, distill_token);
  MatchOutputs out = groups_for(metric, p);
  const auto index = metric.options().dtype(at::kLong);
  out.src_idx = at::empty({p.B, r}, index);
  out.dst_idx = at::empty({p.B, r}, index);
  out.unm_idx = at::empty({p.B, p.n_unm()}, index);
  out.token_map = at::empty({p.B, p.N}, index);
  if (p.B > 0) run_matching(metric, p, out, nullptr);
  return {out.src_idx, out.dst_idx, out.unm_idx, out.token_map, out.members, out.row_start};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bipartite_merge_cpu(
    const at::Tensor& x, const at::Tensor& metric, const std::optional<at::Tensor>& size, int64_t r, bool class_token,
    bool distill_token) {
  const Problem p = check_problem(metric, r, class_token, distill_token);
  check_tokens(x, "x");
  TORCH_CHECK(x.size(0) == p.B && x.size(1) == p.N, "tome_native (CPU): x must be (", p.B, ", ", p.N,
              ", C) like the metric, got ", x.sizes());
  check_size(size, p.B, p.N);
  const int64_t C = x.size(2), n_out = p.n_out();
  const MatchOutputs out = groups_for(metric, p);
  const auto acc = acc_dtype(x, size);
  const auto sizes = sizes_as(size, acc);
  auto x_out = at::empty({p.B, n_out, C}, x.options());
  auto size_out = at::empty({p.B, n_out}, x.options().dtype(acc));
  if (p.B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tome_native::bipartite_merge (CPU)", [&] {
      with_acc_type(acc, [&](auto acc_value) {
        using acc_t = decltype(acc_value);
        scalar_t* p_out = x_out.data_ptr<scalar_t>();
        acc_t* p_size_out = size_out.data_ptr<acc_t>();
        const MergeRowsFn merge = [&](int64_t b, int64_t k0, int64_t k1) {
          merge_rows<scalar_t, acc_t>(Mode::kWavg, rows_of<scalar_t>(x, b), batch_sizes<acc_t>(sizes, b, p.N),
                                      groups_of(out.members, out.row_start, b), p.N, n_out, k0, k1, C, p_out + b * n_out * C,
                                      p_size_out + b * n_out);
        };
        run_matching(metric, p, out, &merge);
      });
    });
  }
  return {x_out, size_output(size_out, size), out.members, out.row_start};
}

}  // namespace
}  // namespace tome_cpu

TORCH_LIBRARY_IMPL(tome_native, CPU, m) {
  m.impl("match", &tome_cpu::match_cpu);
  m.impl("bipartite_merge", &tome_cpu::bipartite_merge_cpu);
}
