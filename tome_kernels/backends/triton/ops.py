"""The Triton kernels as PyTorch operators (namespace ``tome_kernels``), with the fake
kernels of ``op_table`` and registered autograd, so that ``torch.compile(fullgraph=True)``
traces through them and ``torch.library.opcheck`` passes.

Each operator takes an already clamped ``r > 0`` and the groups (``members``, ``row_start``,
see ``layout.py``) that the matching produced; ``r = 0`` ("no merge", whose
outputs are the inputs themselves) is handled by the caller, because an operator may not
return its input. Autograd comes from ``merge_autograd``, shared with the native operators.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...reference import MERGE_MODES
from ...reference.energy import FORMS
from .. import merge_autograd, op_table
from . import launch

_MODES = MERGE_MODES


@torch.library.custom_op("tome_kernels::triton_match", mutates_args=())
def match(
    metric: Tensor, r: int, class_token: bool, distill_token: bool, one_pass: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(src_idx, dst_idx, unm_idx, token_map, members, row_start)."""
    return launch.match(metric, r, class_token, distill_token, one_pass)


@torch.library.custom_op("tome_kernels::triton_bipartite_merge", mutates_args=())
def bipartite_merge(
    x: Tensor, metric: Tensor, size: Optional[Tensor], r: int, class_token: bool, distill_token: bool, one_pass: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_merged, size_merged, members, row_start): matching and weighted merge."""
    return launch.bipartite_merge(x, metric, size, r, class_token, distill_token, one_pass)


@torch.library.custom_op("tome_kernels::triton_merge_wavg", mutates_args=())
def merge_wavg(x: Tensor, size: Optional[Tensor], members: Tensor, row_start: Tensor) -> Tuple[Tensor, Tensor]:
    """(x_merged, size_merged) for the groups of a matching."""
    return launch.merge(x, size, members, row_start, "wavg")


@torch.library.custom_op("tome_kernels::triton_merge_wavg_backward", mutates_args=())
def merge_wavg_backward(
    grad_out: Tensor, grad_size_out: Tensor, x: Tensor, size: Optional[Tensor], members: Tensor,
    row_start: Tensor, size_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """(grad_x, grad_size); grad_size is empty unless ``size_grad`` and a size was given."""
    return launch.merge_wavg_backward(grad_out, grad_size_out, x, size, members, row_start, size_grad)


@torch.library.custom_op("tome_kernels::triton_merge", mutates_args=())
def merge(x: Tensor, members: Tensor, row_start: Tensor, mode: str) -> Tensor:
    """Each group reduced by ``mode``: "sum", "mean", "amax" or "amin"."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return launch.merge(x, None, members, row_start, mode)[0]


@torch.library.custom_op("tome_kernels::triton_merge_backward", mutates_args=())
def merge_backward(grad_out: Tensor, x: Tensor, out: Tensor, members: Tensor, row_start: Tensor, mode: str) -> Tensor:
    """grad_x of ``out = merge(x, members, row_start, mode)``."""
    return launch.merge_backward(grad_out, x, out, members, row_start, mode)


@torch.library.custom_op("tome_kernels::triton_unmerge", mutates_args=())
def unmerge(y: Tensor, token_map: Tensor, members: Tensor, row_start: Tensor) -> Tensor:
    """(B, N, C): each input token's output row of y. The groups serve the backward."""
    return launch.unmerge(y, token_map)


@torch.library.custom_op("tome_kernels::triton_assign", mutates_args=())
def assign(metric: Tensor, roles: Tensor, window: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(best, dst): each source token's best destination (``partition.assign``)."""
    return launch.assign(metric, roles, window)


@torch.library.custom_op("tome_kernels::triton_energy", mutates_args=())
def energy(metric: Tensor, margin: float, alpha: float, form: int) -> Tensor:
    """(B, N) float32 PiToMe energy (``energy.energy``); ``form`` is the code
    ``energy.FORMS.index(name)``."""
    # The kernel reads any code it does not know as "paper": refused here, as the native
    # operators refuse it.
    if form not in range(len(FORMS)):
        raise ValueError(f"form must be the code of one of {FORMS}, 0 to {len(FORMS) - 1}, got {form}")
    return launch.energy(metric, margin, alpha, form)


# Operator name (as in op_table) -> the operator.
OPS = {
    "match": match, "bipartite_merge": bipartite_merge, "merge_wavg": merge_wavg,
    "merge_wavg_backward": merge_wavg_backward, "merge": merge, "merge_backward": merge_backward,
    "unmerge": unmerge, "assign": assign, "energy": energy,
}
for _name, _op in OPS.items():
    _op.register_fake(op_table.FAKES[_name])

merge_autograd.register(
    merge_autograd.MergeOps(bipartite_merge, merge_wavg, merge_wavg_backward, merge, merge_backward, unmerge)
)
