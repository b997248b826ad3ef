"""One table of every operator's outputs (``tome_kernels.backends.op_table``) gives both kernel
families their fake kernels: each family implements exactly the operators it lists. Each
fake against its kernel's real outputs is ``torch.library.opcheck``'s work
(test_fast_backends.py, test_methods.py, test_native_methods.py)."""

import torch

from tome_kernels.backends import op_table
from tome_kernels.backends.native import extension_build
from tome_kernels.backends.triton import ops as triton_ops


def test_the_triton_operators_are_the_table():
    assert set(triton_ops.OPS) == set(op_table.FAKES)
    for name in triton_ops.OPS:
        assert hasattr(torch.ops.tome_kernels, f"triton_{name}"), name


def test_the_native_operators_are_the_table():
    extension_build.load("cpu")
    declared = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                if name.startswith("tome_native::")}
    assert declared == set(op_table.FAKES)


def test_sizes_follow_the_size_dtype_rule():
    """float32 sizes unless given in float64, in every family (the Triton copy once said
    float32 whatever the size)."""
    x = torch.empty(2, 9, 4, device="meta")
    for size, dtype in ((None, torch.float32), (torch.empty(2, 9, 1, device="meta"), torch.float32),
                        (torch.empty(2, 9, 1, dtype=torch.float64, device="meta"), torch.float64)):
        assert op_table.bipartite_merge(x, x, size, 3, True, False)[1].dtype == dtype
        assert op_table.merge_wavg(x, size, None, torch.empty(2, 7, device="meta"))[1].dtype == dtype
