"""Autograd of the merge operators, shared by every backend whose operators take the groups
``(members, row_start)``: the Triton operators (``triton_kernels/ops.py``) and the native
ones (``native_ops.py``).

Each backend names its operators in a ``MergeOps``; ``register`` gives its forward
operators their backward through its backward operators. The matching itself has no
gradient (it makes indices).
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor


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


def register(ops: MergeOps) -> None:
    def wavg_backward(ctx, grad_out, grad_size_out, x, size, members, row_start, size_index):
        size_grad = size is not None and ctx.needs_input_grad[size_index]
        # An output autograd needed no gradient for gets zeros.
        shape = (x.shape[0], row_start.shape[1] - 1)
        if grad_out is None:
            grad_out = x.new_zeros(*shape, x.shape[2])
        if grad_size_out is None:
            grad_size_out = x.new_zeros(*shape, 1, dtype=torch.float32)
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
