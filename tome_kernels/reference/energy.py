"""PiToMe's energy score in plain PyTorch: the reference of the fused energy kernels.

Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging" (NeurIPS
2024), score each token by how much it resembles all the others:

    E_i = mean_j f_m(cos(k_i, k_j)),  f_m(x) = x if x >= m else alpha * (exp(x - m) - 1)

A high energy means many near-duplicates (a token that can be merged without loss); a low
one an informative token, which PiToMe protects. Choices made here:

- The mean runs over every token j of the row, the token itself and protected tokens
  included (the self term adds the same amount to every token and changes no ranking).
- Similarities that are NaN (a NaN metric row, e.g. padding marked so) are left out of the
  mean and its count, so padding does not change the energy of real tokens; a token with no
  finite similarity at all has energy -inf (it is ranked last).
- ``shifted=True`` is the variant of the authors' code, ELU(x - m): x - m above the margin
  instead of x. The default follows the paper.
"""

import torch
from torch import Tensor

from . import bipartite


@torch.no_grad()
def energy(metric: Tensor, margin: float, alpha: float = 1.0, shifted: bool = False) -> Tensor:
    """(B, N) float32 energy of every token of metric (B, N, D) or keys (B, H, N, Dh)."""
    m = bipartite.normalized_metric(metric).float()
    return energy_of_similarity(bipartite.similarity(m, m), margin, alpha, shifted)


def energy_of_similarity(sim: Tensor, margin: float, alpha: float = 1.0, shifted: bool = False) -> Tensor:
    """(B, N) energy from the (B, N, N) cosine similarities, in their dtype: the formula above,
    NaN similarities left out, -inf where none is left. (The tests' float64 truth calls it
    with float64 similarities.)"""
    above = sim - margin if shifted else sim
    f = torch.where(sim >= margin, above, alpha * torch.expm1(sim - margin))
    valid = ~sim.isnan()
    count = valid.sum(dim=-1)
    total = torch.where(valid, f, 0.0).sum(dim=-1)
    return torch.where(count > 0, total / count.clamp_min(1), float("-inf"))
