"""Fake kernels and autograd of the native operators ``torch.ops.tome_native.*``.

The schemas and the CPU / CUDA kernels are C++ (``csrc/``); what the compiler stack and
autograd need on top is registered here, once, after the CPU extension (which holds the
schemas) has loaded. The shapes and dtypes below are those the C++ kernels produce.
"""

import threading

import torch

from . import merge_autograd, reference

_lock = threading.Lock()
_registered = False


def _index(t, *shape):
    return t.new_empty(shape, dtype=torch.long)


def _int32(t, *shape):
    return t.new_empty(shape, dtype=torch.int32)


def _register_fakes() -> None:
    fake = torch.library.register_fake

    @fake("tome_native::match")
    def _(metric, r, class_token, distill_token):
        B, N = metric.shape[0], metric.shape[-2]
        na = (N + 1) // 2
        return (
            _index(metric, B, r), _index(metric, B, r), _index(metric, B, na - r), _index(metric, B, N),
            _int32(metric, B, N), _int32(metric, B, N - r + 1),
        )

    @fake("tome_native::bipartite_merge")
    def _(x, metric, size, r, class_token, distill_token):
        B, N, C = x.shape
        return (
            x.new_empty(B, N - r, C), x.new_empty(B, N - r, 1, dtype=reference.size_dtype(size)),
            _int32(x, B, N), _int32(x, B, N - r + 1),
        )

    @fake("tome_native::merge_wavg")
    def _(x, size, members, row_start):
        B, _, C = x.shape
        n_out = row_start.shape[1] - 1
        return x.new_empty(B, n_out, C), x.new_empty(B, n_out, 1, dtype=reference.size_dtype(size))

    @fake("tome_native::merge_wavg_backward")
    def _(grad_out, grad_size_out, x, size, members, row_start, size_grad):
        if size_grad and size is not None:
            return x.new_empty(x.shape), size.new_empty(*x.shape[:2], 1)
        return x.new_empty(x.shape), x.new_empty(0, dtype=torch.float32)

    @fake("tome_native::merge")
    def _(x, members, row_start, mode):
        return x.new_empty(x.shape[0], row_start.shape[1] - 1, x.shape[2])

    @fake("tome_native::merge_backward")
    def _(grad_out, x, out, members, row_start, mode):
        return x.new_empty(x.shape)

    @fake("tome_native::unmerge")
    def _(y, token_map, members, row_start):
        return y.new_empty(y.shape[0], token_map.shape[1], y.shape[2])

    @fake("tome_native::assign")
    def _(metric, roles, window):
        B, N = metric.shape[0], metric.shape[-2]
        return metric.new_empty(B, N, dtype=torch.float32), _index(metric, B, N)

    @fake("tome_native::energy")
    def _(metric, margin, alpha, shifted):
        return metric.new_empty(metric.shape[0], metric.shape[-2], dtype=torch.float32)


def register_once() -> None:
    """Register the fakes and autograd; the schemas must be loaded (``extension_build``)."""
    global _registered
    with _lock:
        if _registered:
            return
        _register_fakes()
        ops = torch.ops.tome_native
        merge_autograd.register(
            merge_autograd.MergeOps(
                ops.bipartite_merge.default, ops.merge_wavg.default, ops.merge_wavg_backward.default,
                ops.merge.default, ops.merge_backward.default, ops.unmerge.default,
            )
        )
        _registered = True
