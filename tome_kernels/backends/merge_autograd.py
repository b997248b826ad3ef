"""Autograd of the merge operators, shared by every backend whose operators take the groups
``(members, row_start)``: the Triton operators (``triton/ops.py``) and the native
ones (``native/ops.py``).

Each backend names its operators in a ``MergeOps``; ``register`` gives its forward
operators their backward through its backward operators. Those backward kernels are not
themselves differentiable, so a backward that must be (``create_graph=True``, e.g. for a
gradient penalty or ``gradgradcheck``) is computed instead by differentiating the same
merge written in PyTorch ops (``_merge_in_torch``): slower, but exact to all orders,
never a silent zero. The matching itself has no gradient (it makes indices).
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import partition


@dataclass(frozen=True)
class MergeOps:
    """A backend's operators, each callable and accepted by ``torch.library.register_autograd``
    (a ``custom_op``, or a C++ operator's ``OpOverload`` such as ``torch.ops.ns.op.default``).

    ``bipartite_merge(x, metric, size, ...) -> (x_out, size_out, members, row_start)``,
    ``merge_wavg(x, size, members, row_start) -> (x_out, size_out)``,
    ``merge_wavg_backward(grad_out, grad_size_out, x, size, members, row_start, size_grad)``,
    ``merge(x, members, row_start, mode)``,
    ``merge_backward(grad_out, x, out, members, row_start, mode)``,
    ``unmerge(y, token_map, members, row_start)``.
    """

    bipartite_merge: Any
    merge_wavg: Any
    merge_wavg_backward: Any
    merge: Any
    merge_backward: Any
    unmerge: Any


def _token_rows(members: Tensor, row_start: Tensor) -> Tensor:
    """(B, N) int64: the output row of every input token (the plan's token map)."""
    positions = torch.arange(members.shape[1], device=members.device).expand(members.shape[0], -1).contiguous()
    rows = torch.searchsorted(row_start[:, 1:].contiguous(), positions.to(row_start.dtype), right=True)
    return torch.empty_like(rows).scatter_(1, members.long(), rows)


def _merge_in_torch(x: Tensor, size: Optional[Tensor], members: Tensor, row_start: Tensor, mode: str):
    """The merge of the kernels as differentiable PyTorch ops: (x_out, size_out) for "wavg",
    x_out for the other modes. Only for a backward that must itself be differentiable."""
    return partition.merge_by_map(x, size, _token_rows(members, row_start), row_start.shape[1] - 1, mode)


def _differentiable_grads(outputs, inputs, grads):
    """Gradients of ``outputs`` (a tuple) for ``inputs`` (None where not needed), with their graph.

    Only the outputs that depend on a wanted input take part: ``autograd.grad`` refuses an
    output without a graph, and the merged size has none when ``size`` needs no gradient
    (or is None), which is the usual case of a gradient penalty on x."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    pairs = [(out, grad) for out, grad in zip(outputs, grads) if out.requires_grad]
    if not wanted or not pairs:
        return [None] * len(inputs)
    outs, out_grads = zip(*pairs)
    found = iter(torch.autograd.grad(outs, wanted, out_grads, create_graph=True, allow_unused=True))
    return [next(found) if t is not None and t.requires_grad else None for t in inputs]


def register(ops: MergeOps) -> None:
    def wavg_backward(ctx, grad_out, grad_size_out, x, size, members, row_start, size_index):
        size_grad = size is not None and ctx.needs_input_grad[size_index]
        # An output autograd needed no gradient for gets zeros.
        shape = (x.shape[0], row_start.shape[1] - 1)
        if grad_out is None:
            grad_out = x.new_zeros(*shape, x.shape[2])
        if grad_size_out is None:
            grad_size_out = x.new_zeros(*shape, 1, dtype=reference.size_dtype(size))
        if torch.is_grad_enabled():  # create_graph=True: this backward must be differentiable
            outputs = _merge_in_torch(x, size, members, row_start, "wavg")
            grad_x, grad_size = _differentiable_grads(outputs, (x, size), (grad_out, grad_size_out))
            return grad_x, (grad_size if size_grad else None)
        grad_x, grad_size = ops.merge_wavg_backward(grad_out, grad_size_out, x, size, members, row_start, size_grad)
        return grad_x, (grad_size if size_grad else None)

    def setup_bipartite_merge(ctx, inputs, output):
        x, _, size = inputs[:3]
        ctx.save_for_backward(x, size, *output[2:])
        ctx.num_inputs = len(inputs)

    def backward_bipartite_merge(ctx, grad_out, grad_size_out, _members, _row_start):
        x, size, members, row_start = ctx.saved_tensors
        grad_x, grad_size = wavg_backward(ctx, grad_out, grad_size_out, x, size, members, row_start, 2)
        return (grad_x, None, grad_size) + (None,) * (ctx.num_inputs - 3)

    torch.library.register_autograd(ops.bipartite_merge, backward_bipartite_merge, setup_context=setup_bipartite_merge)

    def setup_merge_wavg(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_merge_wavg(ctx, grad_out, grad_size_out):
        x, size, members, row_start = ctx.saved_tensors
        grad_x, grad_size = wavg_backward(ctx, grad_out, grad_size_out, x, size, members, row_start, 1)
        return grad_x, grad_size, None, None

    torch.library.register_autograd(ops.merge_wavg, backward_merge_wavg, setup_context=setup_merge_wavg)

    def setup_merge(ctx, inputs, output):
        x, members, row_start, mode = inputs
        ctx.save_for_backward(x, output, members, row_start)
        ctx.mode = mode

    def backward_merge(ctx, grad_out: Optional[Tensor]):
        x, out, members, row_start = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if torch.is_grad_enabled():  # create_graph=True: this backward must be differentiable
            merged = _merge_in_torch(x, None, members, row_start, ctx.mode)
            (grad_x,) = _differentiable_grads((merged,), (x,), (grad_out,))
            return grad_x, None, None, None
        return ops.merge_backward(grad_out, x, out, members, row_start, ctx.mode), None, None, None

    torch.library.register_autograd(ops.merge, backward_merge, setup_context=setup_merge)

    def setup_unmerge(ctx, inputs, output):
        _, _, members, row_start = inputs
        ctx.save_for_backward(members, row_start)

    def backward_unmerge(ctx, grad_out):
        members, row_start = ctx.saved_tensors
        # Each output row received copies of one row of y: its gradient is their sum.
        return ops.merge(grad_out, members, row_start, "sum"), None, None, None

    torch.library.register_autograd(ops.unmerge, backward_unmerge, setup_context=setup_unmerge)
