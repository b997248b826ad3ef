// Host launchers of the CUDA kernels, on raw pointers, int64 sizes and strides (in elements)
// and a stream. No PyTorch header here: the glue (ops_cuda.cpp) includes this with the host
// compiler, the .cu files with nvcc. Each launcher returns the launch's cudaError_t; none of
// them synchronises, so every op can be captured in a CUDA graph.
//
// Element types: float, __half, __nv_bfloat16 (explicitly instantiated in the .cu files).
// Sizes (`size`, `size_out`, `grad_size_out`, `grad_size`) are float32; the glue converts.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace tome_cuda {

// ---------------------------------------------------------------------------------------
// Matching (match_cuda.cu) and selection (select_cuda.cu)
// ---------------------------------------------------------------------------------------

// Tile of the score kernel: kTileA A tokens x kTileB B tokens, features in chunks of kChunkD.
constexpr int64_t kTileA = 64;
constexpr int64_t kTileB = 64;
constexpr int64_t kChunkD = 16;
// The B tokens of a row are split over several blocks when a batch has too few A tiles to
// fill the GPU (B = 1 at N = 4096 has 32): about two waves on a 132-SM H100. A function of
// the shapes only, so results never depend on the device.
constexpr int64_t kTargetBlocks = 264;
constexpr int64_t kMaxSplits = 32;

// metric (B, N, D) or keys (B, H, N, D); strides in elements (stride_h unused when H = 1).
struct MetricView {
  int64_t batch, heads, tokens, features;
  int64_t stride_b, stride_h, stride_n, stride_d;
};

// How the matching of one metric shape is cut up, and the scratch it needs.
struct MatchGeometry {
  int64_t na, nb;            // A tokens (even positions) and B tokens (odd positions)
  int64_t padded_d;          // features rounded up to kChunkD, zero padded
  int64_t tiles_a, tiles_b;  // score tiles along A and B
  int64_t splits;            // blocks sharing the B tiles of one A tile
  int64_t tiles_per_split;
  // float32 scratch: normalised metric (B, N, padded_d), then partial best (B, splits, Na).
  int64_t float_scratch;
  // int32 scratch: partial dst (B, splits, Na), rank, dst, pos (B, Na) each, count (B, Nb).
  int64_t int_scratch;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline MatchGeometry match_geometry(int64_t batch, int64_t tokens, int64_t features) {
  MatchGeometry g;
  g.na = (tokens + 1) / 2;
  g.nb = tokens / 2;
  // At least one chunk, so that D = 0 (all-zero rows) still runs the same code.
  g.padded_d = features > 0 ? ceil_div(features, kChunkD) * kChunkD : kChunkD;
  g.tiles_a = ceil_div(g.na, kTileA);
  g.tiles_b = ceil_div(g.nb > 0 ? g.nb : 1, kTileB);
  const int64_t a_blocks = batch * g.tiles_a > 0 ? batch * g.tiles_a : 1;
  int64_t splits = ceil_div(kTargetBlocks, a_blocks);
  splits = splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits);
  splits = splits > g.tiles_b ? g.tiles_b : splits;
  g.tiles_per_split = ceil_div(g.tiles_b, splits);
  // No empty split: each covers tiles_per_split tiles, the last possibly fewer.
  g.splits = ceil_div(g.tiles_b, g.tiles_per_split);
  g.float_scratch = batch * tokens * g.padded_d + batch * g.splits * g.na;
  g.int_scratch = batch * g.splits * g.na + 3 * batch * g.na + batch * g.nb;
  return g;
}

// Outputs of the matching. The int64 index tensors are contiguous (B, r), (B, r),
// (B, Na - r), (B, N); pass null for all four to skip them (bipartite_merge). members
// (B, N) and row_start (B, N - r + 1) are int32 and always written.
struct MatchOutputs {
  int64_t* src_idx;
  int64_t* dst_idx;
  int64_t* unm_idx;
  int64_t* token_map;
  int32_t* members;
  int32_t* row_start;
};

// The whole matching: normalise, score, rank, layout (four kernels). r is already clamped:
// 0 < r <= (N - class_token - distill_token) / 2. Scratch sizes from match_geometry.
template <typename T>
cudaError_t launch_match(const T* metric, const MetricView& view, int64_t r, bool class_token,
                         bool distill_token, float* float_scratch, int32_t* int_scratch,
                         const MatchOutputs& out, cudaStream_t stream);

// select_cuda.cu. Ranks: from the partial (best, dst) of each split, the rank of every A
// token (best descending, ties to the lower index, class token last) and its final dst.
cudaError_t launch_rank(const float* partial_best, const int32_t* partial_dst, int64_t batch,
                        int64_t na, int64_t splits, bool class_token, int32_t* rank, int32_t* dst,
                        cudaStream_t stream);

// select_cuda.cu. Layout: from rank and dst, the index outputs and the groups. pos (B, Na)
// and count (B, Nb) are int32 scratch.
cudaError_t launch_layout(const int32_t* rank, const int32_t* dst, int32_t* pos, int32_t* count,
                          int64_t batch, int64_t tokens, int64_t r, bool class_token,
                          bool distill_token, const MatchOutputs& out, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Merge, its backward, unmerge (merge_cuda.cu)
// ---------------------------------------------------------------------------------------

enum class MergeMode : int { kWavg = 0, kSum = 1, kMean = 2, kAmax = 3, kAmin = 4 };

// Strides in elements of a (B, rows, C) tensor.
struct Strides3 {
  int64_t b, n, c;
};

// The groups of a matching: output row o of batch row b gathers the input tokens
// members[b, row_start[b, o] : row_start[b, o + 1]]; both int32 and contiguous.
struct Groups {
  const int32_t* members;
  const int32_t* row_start;
  int64_t batch;     // B
  int64_t tokens;    // N, the width of members
  int64_t rows_out;  // N - r, row_start has rows_out + 1 columns
};

// Optional float32 sizes (B, N, 1) with their strides; data null means all ones.
struct SizeView {
  const float* data;
  int64_t stride_b, stride_n;
};

// out (B, rows_out, C) contiguous = each group reduced by mode; with kWavg also
// size_out (B, rows_out) float32 contiguous = the group's total size (null otherwise).
template <typename T>
cudaError_t launch_merge(const T* x, Strides3 sx, int64_t channels, SizeView size, const Groups& groups,
                         MergeMode mode, T* out, float* size_out, cudaStream_t stream);

// Backward of the weighted merge: grad_x (B, N, C) contiguous; grad_size (B, N) float32
// contiguous, or null when the size gradient is not wanted (grad_size_out is then unused).
template <typename T>
cudaError_t launch_merge_wavg_backward(const T* grad_out, Strides3 sg, SizeView grad_size_out,
                                       const T* x, Strides3 sx, int64_t channels, SizeView size,
                                       const Groups& groups, T* grad_x, float* grad_size,
                                       cudaStream_t stream);

// Backward of merge in the modes sum, mean, amax, amin: grad_x (B, N, C) contiguous. y is the
// forward output, contiguous (B, rows_out, C); only amax / amin read it.
template <typename T>
cudaError_t launch_merge_backward(const T* grad_out, Strides3 sg, const T* x, Strides3 sx, const T* y,
                                  int64_t channels, const Groups& groups, MergeMode mode, T* grad_x,
                                  cudaStream_t stream);

// out (B, N, C) contiguous: out[b, k] = y[b, token_map[b, k]]; y is (B, rows_in, C) strided,
// token_map int64 contiguous (B, N).
template <typename T>
cudaError_t launch_unmerge(const T* y, Strides3 sy, int64_t rows_in, int64_t channels, const int64_t* token_map,
                           int64_t batch, int64_t tokens, T* out, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Row reductions over the token-token cosine similarity: assign, energy (similarity_cuda.cu)
// ---------------------------------------------------------------------------------------

// Per-token int8 roles (partition.KEEP 0, SOURCE 1, DEST 2) and optional int32 window ids,
// read as (B, N) through their strides (batch stride 0 when shared by the batch); window is
// null when not given.
struct TokenRoles {
  const int8_t* roles;
  int64_t roles_stride_b, roles_stride_n;
  const int32_t* window;
  int64_t window_stride_b, window_stride_n;
};

// float32 scratch of both launchers: the unit metric rows (B, N, D).
inline int64_t similarity_scratch(const MetricView& view) { return view.batch * view.tokens * view.features; }

// best (B, N) float32 and dst (B, N) int64, contiguous: each source's best destination, as
// partition.assign. N must be below 2^31.
template <typename T>
cudaError_t launch_assign(const T* metric, const MetricView& view, const TokenRoles& roles, float* scratch, float* best,
                          int64_t* dst, cudaStream_t stream);

// The forms of PiToMe's f, by their codes (energy.FORMS.index(name)).
enum EnergyForm : int {
  kPaperForm = 0,     // x if x >= margin else alpha * expm1(x - margin)
  kEluForm = 1,       // x - margin if x >= margin else alpha * expm1(x - margin)
  kGaussianForm = 2,  // exp(-0.5 t^2), t = (1 - x) / sigma, sigma = 1 - margin
};

// energy (B, N) float32, contiguous: PiToMe's energy, as energy.energy, for the form of f
// `form` (one of EnergyForm, which the caller has checked); sigma is used by the Gaussian
// form only, margin and alpha by the others. N below 2^31.
template <typename T>
cudaError_t launch_energy(const T* metric, const MetricView& view, float margin, float alpha, float sigma, int form,
                          float* scratch, float* energy, cudaStream_t stream);

}  // namespace tome_cuda
