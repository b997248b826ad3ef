// The operators of the native extensions, declared once. Every device registers its own
// implementation of each (csrc/cpu/*_cpu.cpp for CPU, csrc/cuda/ops_cuda.cpp for CUDA);
// fake kernels and autograd are registered from Python (tome_kernels/backends/native/ops.py).
//
// Conventions shared by every implementation (the contract: docs/semantics.md):
// - r is already clamped by the caller and 0 < r <= (N - protected) / 2.
// - metric is (B, N, D) or keys (B, H, N, Dh), keys averaged over heads on the fly.
// - The groups of a matching: output row o gathers the input tokens
//   members[b, row_start[b, o] : row_start[b, o + 1]] (int32): a kept A token alone, or a B
//   token followed by the sources merging into it in A-index order. Token indices are
//   positions in x (A token i is 2 i, B token j is 2 j + 1).
// - Outputs are contiguous; inputs may have any strides.
#include <torch/library.h>

TORCH_LIBRARY(tome_native, m) {
  // (src_idx, dst_idx, unm_idx, token_map) int64 as in reference.MatchResult, then
  // (members, row_start) int32.
  m.def("match(Tensor metric, int r, bool class_token, bool distill_token)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (x_out, size_out, members, row_start): matching and weighted merge in one call.
  m.def("bipartite_merge(Tensor x, Tensor metric, Tensor? size, int r, bool class_token,"
        " bool distill_token) -> (Tensor, Tensor, Tensor, Tensor)");
  // (x_out, size_out) of the size-weighted average of each group.
  m.def("merge_wavg(Tensor x, Tensor? size, Tensor members, Tensor row_start) -> (Tensor, Tensor)");
  // (grad_x, grad_size); grad_size is an empty float32 tensor unless size_grad and size.
  m.def("merge_wavg_backward(Tensor grad_out, Tensor grad_size_out, Tensor x, Tensor? size,"
        " Tensor members, Tensor row_start, bool size_grad) -> (Tensor, Tensor)");
  // Each group reduced by mode: "sum", "mean", "amax" or "amin".
  m.def("merge(Tensor x, Tensor members, Tensor row_start, str mode) -> Tensor");
  // grad_x of out = merge(x, members, row_start, mode).
  m.def("merge_backward(Tensor grad_out, Tensor x, Tensor out, Tensor members, Tensor row_start,"
        " str mode) -> Tensor");
  // (B, N, C): every input token's output row of y. The groups serve the backward.
  m.def("unmerge(Tensor y, Tensor token_map, Tensor members, Tensor row_start) -> Tensor");
  // Each source token's best destination by cosine similarity, as partition.assign: best
  // (B, N) in the scoring dtype, float64 for a float64 metric and float32 otherwise (-inf
  // for tokens that are no source or have no allowed destination), and dst (B, N) int64 (-1
  // for those). roles int8 (KEEP 0, SOURCE 1, DEST 2) and window int32 are (B, N) or (1, N),
  // shared by the batch; a source may only take a destination of its own window when window
  // is given.
  m.def("assign(Tensor metric, Tensor roles, Tensor? window) -> (Tensor best, Tensor dst)");
  // (B, N) PiToMe energy of every token, as energy.energy, in the scoring dtype (float64 for
  // a float64 metric, float32 otherwise). form is the code of f, energy.FORMS.index(name):
  // 0 "paper", 1 "elu", 2 "gaussian" (alpha unused there); any other code is refused.
  m.def("energy(Tensor metric, float margin, float alpha, int form) -> Tensor");
}
