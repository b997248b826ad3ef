"""Every operator's outputs, described once: their shapes and dtypes as functions of the
inputs. Both kernel families register these as their fake (meta) kernels, which is what
``torch.compile`` and ``torch.library.opcheck`` see of an operator: the Triton operators
(``torch.ops.tome_kernels.triton_<name>``) and the native ones
(``torch.ops.tome_native.<name>``, schemas in ``csrc/ops.cpp``).

The operators take an already clamped ``r > 0``; a matching's groups are ``members``
(B, N) int32, the input tokens sorted by output row, and ``row_start`` (B, N - r + 1)
int32, where each output row's members begin (docs/semantics.md, "Output layout").
``*kernel_choice``: arguments a family adds to pick one of its own code paths (Triton's
``one_pass``), which do not change the outputs.
"""

from typing import Callable, Dict

import torch
from torch import Tensor

from ..reference import score_dtype, size_dtype


def _index(t: Tensor, *shape: int) -> Tensor:
    return t.new_empty(shape, dtype=torch.long)


def _int32(t: Tensor, *shape: int) -> Tensor:
    return t.new_empty(shape, dtype=torch.int32)


def match(metric, r, class_token, distill_token, *kernel_choice):
    """(src_idx, dst_idx, unm_idx, token_map) int64 and the groups (members, row_start)."""
    B, N = metric.shape[0], metric.shape[-2]
    na = (N + 1) // 2
    return (
        _index(metric, B, r), _index(metric, B, r), _index(metric, B, na - r), _index(metric, B, N),
        _int32(metric, B, N), _int32(metric, B, N - r + 1),
    )


def bipartite_merge(x, metric, size, r, class_token, distill_token, *kernel_choice):
    """(x_merged in x's dtype, size_merged in ``size_dtype(size)``, members, row_start)."""
    B, N, C = x.shape
    return (
        x.new_empty(B, N - r, C), x.new_empty(B, N - r, 1, dtype=size_dtype(size)),
        _int32(x, B, N), _int32(x, B, N - r + 1),
    )


def merge_wavg(x, size, members, row_start):
    """(x_merged, size_merged) for the groups."""
    B, _, C = x.shape
    n_out = row_start.shape[1] - 1
    return x.new_empty(B, n_out, C), x.new_empty(B, n_out, 1, dtype=size_dtype(size))


def merge_wavg_backward(grad_out, grad_size_out, x, size, members, row_start, size_grad):
    """(grad_x, grad_size); grad_size is an empty float32 tensor unless ``size_grad`` and a
    size was given (an operator returns a tensor where Python would return None)."""
    if size_grad and size is not None:
        return x.new_empty(x.shape), size.new_empty(*x.shape[:2], 1)
    return x.new_empty(x.shape), x.new_empty(0, dtype=torch.float32)


def merge(x, members, row_start, mode):
    """Each group reduced by ``mode``: (B, N - r, C) in x's dtype."""
    return x.new_empty(x.shape[0], row_start.shape[1] - 1, x.shape[2])


def merge_backward(grad_out, x, out, members, row_start, mode):
    """grad_x, shaped like x."""
    return x.new_empty(x.shape)


def unmerge(y, token_map, members, row_start):
    """(B, N, C): each input token's output row of y."""
    return y.new_empty(y.shape[0], token_map.shape[1], y.shape[2])


def assign(metric, roles, window):
    """(best score (B, N) in ``score_dtype(metric)``, best destination (B, N) int64) of every
    source token."""
    B, N = metric.shape[0], metric.shape[-2]
    return metric.new_empty(B, N, dtype=score_dtype(metric)), _index(metric, B, N)


def energy(metric, margin, alpha, form):
    """(B, N) in ``score_dtype(metric)`` (float64 for a float64 metric, float32 otherwise):
    PiToMe's energy of every token. ``form`` is the code ``energy.FORMS.index(name)``."""
    return metric.new_empty(metric.shape[0], metric.shape[-2], dtype=score_dtype(metric))


# Operator name -> fake kernel: every family implements exactly these operators.
FAKES: Dict[str, Callable] = {
    fake.__name__: fake
    for fake in (
        match, bipartite_merge, merge_wavg, merge_wavg_backward, merge, merge_backward, unmerge, assign, energy,
    )
}
