// Selection and layout: from each A token's (best, dst) to the plan's indices and the merge
// groups (docs/semantics.md, "Matching" step 5 and "Output layout"; the same outputs,
// value for value, as tome_kernels/backends/triton/layout.py).
//
// 1. rank_kernel, one block of 128 threads per (batch row, 128 A tokens): first the per-split
//    partial results of the score kernel are folded in split order (a later split, i.e.
//    higher j, must be strictly better), then rank[i] counts the A tokens ahead of i. Each
//    token gets a distinct 64-bit key, (best descending, index ascending), with the class
//    token's key the largest, so the rank is just the number of smaller keys: a stable sort
//    without sorting, O(Na^2 / 128) comparisons per block from shared memory.
// 2. layout_kernel, one block of 512 threads per batch row, walking its tokens in chunks of
//    512 with running counts carried in global scratch (so any N fits): pass 1 gives every
//    source its slot in its destination's group (sources in A-index order) and every kept
//    token its output position; pass 2 turns the per-B-token source counts into group
//    starts (a block scan); pass 3 writes the members, row starts and token map.
// Integers only after the ranking, no atomics whose order could show (one atomicMax, which
// commutes), no host synchronisation.
#include <climits>
#include <cstdint>

#include <cub/block/block_scan.cuh>
#include <math_constants.h>

#include "launchers.h"

namespace tome_cuda {
namespace {

constexpr int kRankThreads = 128;
constexpr int kLayoutThreads = 512;
constexpr uint64_t kLastKey = ~0ull;

// Sorting key of A token i: ascending key = descending best, then ascending index. Keys are
// distinct, so "how many keys are smaller" is a rank with the stable sort's tie rule.
__device__ __forceinline__ uint64_t sort_key(float best, int64_t i) {
  if (isnan(best)) best = -CUDART_INF_F;  // cannot come from the score kernel; ranks as -inf
  if (best == 0.f) best = 0.f;            // -0 and +0 compare equal: give them one key
  const uint32_t bits = __float_as_uint(best);
  // Monotone map of floats onto unsigned integers, then flipped so higher scores come first.
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(i);
}

// best of A token i over all splits; with `dst`, also its argmax. Splits cover increasing
// j ranges, so folding them in order with "strictly greater" keeps the lowest j on ties
// and the initial dst of a row with no finite score.
__device__ __forceinline__ float fold_splits(const float* partial_best, const int32_t* partial_dst, int64_t b,
                                             int64_t i, int64_t na, int64_t splits, int32_t* dst) {
  const int64_t o = b * splits * na + i;
  float best = partial_best[o];
  int32_t d = dst ? partial_dst[o] : 0;
  for (int64_t s = 1; s < splits; ++s) {
    const float v = partial_best[o + s * na];
    if (v > best) {
      best = v;
      if (dst) d = partial_dst[o + s * na];
    }
  }
  if (dst) *dst = d;
  return best;
}

__global__ void __launch_bounds__(kRankThreads)
    rank_kernel(const float* __restrict__ partial_best, const int32_t* __restrict__ partial_dst, int64_t na,
                int64_t splits, int64_t tiles, bool class_token, int32_t* __restrict__ rank,
                int32_t* __restrict__ dst) {
  __shared__ __align__(16) uint64_t s_key[kRankThreads];
  const int64_t b = blockIdx.x / tiles;
  const int64_t i = (blockIdx.x % tiles) * kRankThreads + threadIdx.x;

  // The class token (A 0) comes after every other A token: it is never a source.
  uint64_t key = kLastKey;
  if (i < na) {
    int32_t d;
    const float best = fold_splits(partial_best, partial_dst, b, i, na, splits, &d);
    dst[b * na + i] = d;
    if (!(class_token && i == 0)) key = sort_key(best, i);
  }

  int32_t ahead = 0;
  for (int64_t k0 = 0; k0 < na; k0 += kRankThreads) {
    const int64_t k = k0 + threadIdx.x;
    uint64_t other = kLastKey;  // padding is never ahead of anyone
    if (k < na && !(class_token && k == 0)) other = sort_key(fold_splits(partial_best, partial_dst, b, k, na, splits, nullptr), k);
    s_key[threadIdx.x] = other;
    __syncthreads();
    // Two keys per shared load; every thread reads the same address (a broadcast).
    const ulonglong2* pairs = reinterpret_cast<const ulonglong2*>(s_key);
#pragma unroll 8
    for (int t = 0; t < kRankThreads / 2; ++t) {
      const ulonglong2 q = pairs[t];
      ahead += (q.x < key ? 1 : 0) + (q.y < key ? 1 : 0);
    }
    __syncthreads();
  }
  if (i < na) rank[b * na + i] = ahead;
}

__device__ __forceinline__ int b_token_row(int j, int n_unm, bool distill_token) {
  // Layout [kept A..., B...], except that the distill token (B 0) is row 1.
  return (distill_token && j == 0) ? 1 : n_unm + j;
}

using LayoutScan = cub::BlockScan<int, kLayoutThreads>;

__global__ void __launch_bounds__(kLayoutThreads)
    layout_kernel(const int32_t* __restrict__ rank_all, const int32_t* __restrict__ dst_all, int32_t* pos_all,
                  int32_t* count_all, int n, int r, bool class_token, bool distill_token, MatchOutputs out) {
  __shared__ typename LayoutScan::TempStorage scan_storage;
  __shared__ __align__(16) int s_key[kLayoutThreads];
  const int na = (n + 1) / 2, nb = n / 2, n_unm = na - r, n_out = n - r;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int32_t* rank = rank_all + b * na;
  const int32_t* dst = dst_all + b * na;
  int32_t* pos = pos_all + b * na;
  int32_t* count = count_all + b * nb;  // per B token: its sources, then its group start
  int32_t* members = out.members + b * n;
  int32_t* row_start = out.row_start + b * (n_out + 1);
  const bool indices = out.src_idx != nullptr;

  for (int j = tid; j < nb; j += kLayoutThreads) count[j] = 0;
  __syncthreads();

  // Pass 1, A tokens in index order. slot = sources of the same destination in earlier
  // chunks (count) + in earlier warps of this chunk (shared scan) + earlier lanes of this
  // warp (match_any). A kept token's position: rank - r, or its index order with a class token.
  int kept_before = 0;
  for (int i0 = 0; i0 < na; i0 += kLayoutThreads) {
    const int i = i0 + tid;
    const bool valid = i < na;
    const int rk = valid ? rank[i] : na;
    const int d = valid ? dst[i] : -1;
    // An out-of-range dst cannot come from the score kernel; it is never used as an address.
    const bool src = valid && rk < r && d >= 0 && d < nb;
    const bool kept = valid && rk >= r;
    const int key = src ? d : -1;
    s_key[tid] = key;
    int upos = rk - r;
    if (class_token) {
      int before, total;
      LayoutScan(scan_storage).ExclusiveSum(kept ? 1 : 0, before, total);
      upos = kept_before + before;
      kept_before += total;
    }
    __syncthreads();

    int earlier = 0;
    const int4* quads = reinterpret_cast<const int4*>(s_key);  // four keys per shared load
    for (int k = 0; k < warp * 8; ++k) {
      const int4 q = quads[k];
      earlier += (q.x == key ? 1 : 0) + (q.y == key ? 1 : 0) + (q.z == key ? 1 : 0) + (q.w == key ? 1 : 0);
    }
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    earlier += __popc(peers & ((1u << lane) - 1u));
    // Read through L2: the counts were last changed by other threads' atomics.
    const int slot = src ? __ldcg(&count[d]) + earlier : 0;
    if (valid) pos[i] = src ? slot : upos;
    if (indices) {
      if (src) {
        out.src_idx[b * r + rk] = i;
        out.dst_idx[b * r + rk] = d;
      }
      if (kept && upos >= 0 && upos < n_unm) out.unm_idx[b * n_unm + upos] = i;
    }
    // Every read of count, s_key and the scan storage is done before they change. The max
    // of a destination's slots + 1 is its new count, whatever order the atomics run in.
    __syncthreads();
    if (src) atomicMax(&count[d], slot + 1);
  }
  __syncthreads();

  // With a distill token, the kept A tokens after the first start after B token 0's group.
  const int count0 = nb > 0 ? __ldcg(&count[0]) : 0;
  __syncthreads();

  // Pass 2, B tokens: group starts, an exclusive running sum of the counts, replace the
  // counts in place; each B token leads its own group.
  int sources_before = 0;
  for (int j0 = 0; j0 < nb; j0 += kLayoutThreads) {
    const int j = j0 + tid;
    const bool valid = j < nb;
    const int c = valid ? __ldcg(&count[j]) : 0;
    int before, total;
    LayoutScan(scan_storage).ExclusiveSum(c, before, total);
    if (valid) {
      const int start = (distill_token && j == 0) ? 1 : n_unm + j + sources_before + before;
      const int row = b_token_row(j, n_unm, distill_token);
      count[j] = start;
      if (start < n) members[start] = 2 * j + 1;
      if (row < n_out) row_start[row] = start;
      if (indices) out.token_map[b * n + 2 * j + 1] = row;
    }
    sources_before += total;
    __syncthreads();  // the scan storage is reused by the next chunk
  }
  __syncthreads();

  // Pass 3, A tokens: sources join their destination's group after the B token, kept tokens
  // get their own row. Each thread rereads the pos it wrote itself in pass 1.
  for (int i0 = 0; i0 < na; i0 += kLayoutThreads) {
    const int i = i0 + tid;
    if (i >= na) continue;
    const int rk = rank[i];
    const int d = dst[i];
    const int p = pos[i];
    if (rk < r) {
      if (d < 0 || d >= nb) continue;
      const int at = __ldcg(&count[d]) + 1 + p;
      if (at >= 0 && at < n) members[at] = 2 * i;
      if (indices) out.token_map[b * n + 2 * i] = b_token_row(d, n_unm, distill_token);
    } else {
      const bool shifted = distill_token && p >= 1;
      const int row = shifted ? p + 1 : p;
      const int start = shifted ? p + 1 + count0 : p;
      if (start >= 0 && start < n) members[start] = 2 * i;
      if (row >= 0 && row < n_out) row_start[row] = start;
      if (indices) out.token_map[b * n + 2 * i] = row;
    }
  }
  if (tid == 0) row_start[n_out] = n;
}

}  // namespace

cudaError_t launch_rank(const float* partial_best, const int32_t* partial_dst, int64_t batch, int64_t na,
                        int64_t splits, bool class_token, int32_t* rank, int32_t* dst, cudaStream_t stream) {
  if (batch == 0 || na == 0) return cudaSuccess;
  const int64_t tiles = ceil_div(na, kRankThreads);
  if (batch * tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  rank_kernel<<<static_cast<unsigned>(batch * tiles), kRankThreads, 0, stream>>>(
      partial_best, partial_dst, na, splits, tiles, class_token, rank, dst);
  return cudaGetLastError();
}

cudaError_t launch_layout(const int32_t* rank, const int32_t* dst, int32_t* pos, int32_t* count, int64_t batch,
                          int64_t tokens, int64_t r, bool class_token, bool distill_token, const MatchOutputs& out,
                          cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  // Token positions are int32 (members, row_start); the glue checks N against this too.
  if (batch > INT_MAX || tokens >= INT_MAX / 2 || r < 0 || 2 * r > tokens) return cudaErrorInvalidValue;
  layout_kernel<<<static_cast<unsigned>(batch), kLayoutThreads, 0, stream>>>(
      rank, dst, pos, count, static_cast<int>(tokens), static_cast<int>(r), class_token, distill_token, out);
  return cudaGetLastError();
}

}  // namespace tome_cuda
