"""Fake kernels and autograd of the native operators ``torch.ops.tome_native.*``.

The schemas and the CPU / CUDA kernels are C++ (``csrc/``); what the compiler stack and
autograd need on top is registered here, once, after the CPU extension (which holds the
schemas) has loaded: the fake kernels of ``op_table`` (the outputs every family's
operators produce) and the shared merge autograd.
"""

import threading

import torch

from .. import merge_autograd, op_table

_lock = threading.Lock()
_registered = False


def register_once() -> None:
    """Register the fakes and autograd; the schemas must be loaded (``extension_build``)."""
    global _registered
    with _lock:
        if _registered:
            return
        for name, fake in op_table.FAKES.items():
            torch.library.register_fake(f"tome_native::{name}")(fake)
        ops = torch.ops.tome_native
        merge_autograd.register(
            merge_autograd.MergeOps(
                ops.bipartite_merge.default, ops.merge_wavg.default, ops.merge_wavg_backward.default,
                ops.merge.default, ops.merge_backward.default, ops.unmerge.default,
            )
        )
        _registered = True
