"""The Triton kernels as PyTorch operators (namespace ``tome_kernels``), with fake kernels and
registered autograd, so that ``torch.compile(fullgraph=True)`` traces through them and
``torch.library.opcheck`` passes.

Each operator takes an already clamped ``r > 0`` and the groups (``members``, ``row_start``,
see ``layout.py``) that the matching produced; ``r = 0`` ("no merge", whose
outputs are the inputs themselves) is handled by the caller, because an operator may not
return its input. Autograd comes from ``merge_autograd``, shared with the native operators.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import merge_autograd
from ..reference import MERGE_MODES
from . import launch

_MODES = MERGE_MODES


def _index(t: Tensor, *shape: int) -> Tensor:
    return t.new_empty(shape, dtype=torch.long)


def _int32(t: Tensor, *shape: int) -> Tensor:
    return t.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("tome_kernels::triton_match", mutates_args=())
def match(
    metric: Tensor, r: int, class_token: bool, distill_token: bool, one_pass: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(src_idx, dst_idx, unm_idx, token_map, members, row_start)."""
    return launch.match(metric, r, class_token, distill_token, one_pass)


@match.register_fake
def _(metric, r, class_token, distill_token, one_pass):
    B, N = metric.shape[0], metric.shape[-2]
    na = (N + 1) // 2
    return (
        _index(metric, B, r), _index(metric, B, r), _index(metric, B, na - r), _index(metric, B, N),
        _int32(metric, B, N), _int32(metric, B, N - r + 1),
    )


@torch.library.custom_op("tome_kernels::triton_bipartite_merge", mutates_args=())
def bipartite_merge(
    x: Tensor, metric: Tensor, size: Optional[Tensor], r: int, class_token: bool, distill_token: bool, one_pass: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_merged, size_merged, members, row_start): matching and weighted merge."""
    return launch.bipartite_merge(x, metric, size, r, class_token, distill_token, one_pass)


@bipartite_merge.register_fake
def _(x, metric, size, r, class_token, distill_token, one_pass):
    B, N, C = x.shape
    return (
        x.new_empty(B, N - r, C), x.new_empty(B, N - r, 1, dtype=torch.float32),
        _int32(x, B, N), _int32(x, B, N - r + 1),
    )


@torch.library.custom_op("tome_kernels::triton_merge_wavg", mutates_args=())
def merge_wavg(x: Tensor, size: Optional[Tensor], members: Tensor, row_start: Tensor) -> Tuple[Tensor, Tensor]:
    """(x_merged, size_merged) for the groups of a matching."""
    return launch.merge(x, size, members, row_start, "wavg")


@merge_wavg.register_fake
def _(x, size, members, row_start):
    B, _, C = x.shape
    n_out = row_start.shape[1] - 1
    return x.new_empty(B, n_out, C), x.new_empty(B, n_out, 1, dtype=torch.float32)


@torch.library.custom_op("tome_kernels::triton_merge_wavg_backward", mutates_args=())
def merge_wavg_backward(
    grad_out: Tensor, grad_size_out: Tensor, x: Tensor, size: Optional[Tensor], members: Tensor,
    row_start: Tensor, size_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """(grad_x, grad_size); grad_size is empty unless ``size_grad`` and a size was given."""
    return launch.merge_wavg_backward(grad_out, grad_size_out, x, size, members, row_start, size_grad)


@merge_wavg_backward.register_fake
def _(grad_out, grad_size_out, x, size, members, row_start, size_grad):
    if size_grad and size is not None:
        return x.new_empty(x.shape), size.new_empty(*x.shape[:2], 1)
    return x.new_empty(x.shape), x.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("tome_kernels::triton_merge", mutates_args=())
def merge(x: Tensor, members: Tensor, row_start: Tensor, mode: str) -> Tensor:
    """Each group reduced by ``mode``: "sum", "mean", "amax" or "amin"."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return launch.merge(x, None, members, row_start, mode)[0]


@merge.register_fake
def _(x, members, row_start, mode):
    return x.new_empty(x.shape[0], row_start.shape[1] - 1, x.shape[2])


@torch.library.custom_op("tome_kernels::triton_merge_backward", mutates_args=())
def merge_backward(grad_out: Tensor, x: Tensor, out: Tensor, members: Tensor, row_start: Tensor, mode: str) -> Tensor:
    """grad_x of ``out = merge(x, members, row_start, mode)``."""
    return launch.merge_backward(grad_out, x, out, members, row_start, mode)


@merge_backward.register_fake
def _(grad_out, x, out, members, row_start, mode):
    return x.new_empty(x.shape)


@torch.library.custom_op("tome_kernels::triton_unmerge", mutates_args=())
def unmerge(y: Tensor, token_map: Tensor, members: Tensor, row_start: Tensor) -> Tensor:
    """(B, N, C): each input token's output row of y. The groups serve the backward."""
    return launch.unmerge(y, token_map)


@unmerge.register_fake
def _(y, token_map, members, row_start):
    return y.new_empty(y.shape[0], token_map.shape[1], y.shape[2])


@torch.library.custom_op("tome_kernels::triton_assign", mutates_args=())
def assign(metric: Tensor, roles: Tensor, window: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(best, dst): each source token's best destination (``partition.assign``)."""
    return launch.assign(metric, roles, window)


@assign.register_fake
def _(metric, roles, window):
    B, N = metric.shape[0], metric.shape[-2]
    return metric.new_empty(B, N, dtype=torch.float32), _index(metric, B, N)


@torch.library.custom_op("tome_kernels::triton_energy", mutates_args=())
def energy(metric: Tensor, margin: float, alpha: float, shifted: bool) -> Tensor:
    """(B, N) float32 PiToMe energy (``energy.energy``)."""
    return launch.energy(metric, margin, alpha, shifted)


@energy.register_fake
def _(metric, margin, alpha, shifted):
    return metric.new_empty(metric.shape[0], metric.shape[-2], dtype=torch.float32)


merge_autograd.register(
    merge_autograd.MergeOps(bipartite_merge, merge_wavg, merge_wavg_backward, merge, merge_backward, unmerge)
)
