"""PiToMe's energy score in plain PyTorch: the reference of the fused energy kernels.

Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging" (NeurIPS
2024), score each token by how much it resembles the others:

    E_i = mean_j f(cos(k_i, k_j))

A high energy means many near-duplicates (a token that can be merged without loss); a low
one an informative token, which PiToMe protects. Three forms of f, the ``form`` argument:

- ``"elu"``: ELU(x - m) = x - m if x >= m else alpha * (exp(x - m) - 1). What the authors'
  code computes for images (``F.elu(sim - margin, alpha)``), the default.
- ``"paper"``: x if x >= m else alpha * (exp(x - m) - 1), equation (4) of the paper. It
  ranks tokens differently from ``"elu"``: the shift applies above the margin only.
- ``"gaussian"``: exp(-((1 - x) / sigma)^2 / 2) with sigma = 1 - m, what the authors' code
  computes for text (their comment: it worked better there than equation (4)). Their code
  also multiplies the mean by 1 / (sigma sqrt(2 pi)); that scales every energy alike and
  changes no ranking, so it is left out. alpha does not enter.

Choices made here:

- The caller passes the metric of the tokens that may merge: the protected ones (class,
  distillation, register tokens) are left out before this function, as the authors' code
  does (``metric[:, 1:]``). The mean runs over every token passed, the token itself included.
- Energies are computed in the scoring precision (``bipartite.score_dtype``): float64 for a
  float64 metric, float32 otherwise.
- Similarities that are NaN (a NaN metric row, e.g. padding marked so) are left out of the
  mean and its count, so padding does not change the energy of real tokens; a token with no
  finite similarity at all has energy -inf (it is ranked last).
"""

import torch
from torch import Tensor

from . import bipartite

# The forms of f, in the order of their integer codes in the kernels (``FORMS.index(form)``).
FORMS = ("paper", "elu", "gaussian")


@torch.no_grad()
def energy(metric: Tensor, margin: float, alpha: float = 1.0, form: str = "elu") -> Tensor:
    """(B, N) energy of every token of metric (B, N, D) or keys (B, H, N, Dh): float64 for a
    float64 metric, float32 otherwise."""
    m = bipartite.normalized_metric(metric)
    return energy_of_similarity(bipartite.similarity(m, m), margin, alpha, form)


def energy_of_similarity(sim: Tensor, margin: float, alpha: float = 1.0, form: str = "elu") -> Tensor:
    """(B, N) energy from the (B, N, N) cosine similarities, in their dtype: the formula above,
    NaN similarities left out, -inf where none is left. (The tests' float64 truth calls it
    with float64 similarities.)"""
    if form == "gaussian":
        f = torch.exp(-0.5 * ((1 - sim) / (1.0 - margin)) ** 2)
    elif form in ("elu", "paper"):
        above = sim - margin if form == "elu" else sim
        f = torch.where(sim >= margin, above, alpha * torch.expm1(sim - margin))
    else:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    valid = ~sim.isnan()
    count = valid.sum(dim=-1)
    total = torch.where(valid, f, 0.0).sum(dim=-1)
    return torch.where(count > 0, total / count.clamp_min(1), float("-inf"))
