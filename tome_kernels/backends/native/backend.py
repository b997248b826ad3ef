"""The "cpu" and "cuda" backends: the C++ extensions built from ``csrc/``.

Each loads on first use (``extension_build.load``): an installed ahead-of-time build if
there is one, else a JIT build, cached. A failure to load is remembered and reported as the
reason the backend cannot run; ``auto`` then falls back (with one warning) to the next
backend, and asking for the backend by name raises that reason.
"""

from typing import Optional

import torch
from torch import Tensor

from ..base import energy_form_code
from ..grouped import GroupedBackend

# What each extension's kernels compute: the CPU kernels also run float64 (the reference's
# precision, for gradcheck), the CUDA kernels the dtypes a GPU model runs in.
_DTYPES = {
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def no_cuda_device_reason() -> Optional[str]:
    """Why the cuda backend builds nothing here, or None. A CUDA build of torch on a machine
    without a GPU (PyPI's default torch on Linux) would compile the extension (minutes, with
    nvcc) and load it, and nothing could use it."""
    if torch.version.cuda is not None and not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False), so the cuda extension is not built"
    return None


class NativeBackend(GroupedBackend):
    def __init__(self, device_type: str):
        if device_type not in _DTYPES:
            raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
        self.name = device_type
        self._loaded = False
        self._error: Optional[str] = None

    def _load(self) -> None:
        if self._loaded or self._error is not None:
            return
        from . import extension_build, ops

        if self.name == "cuda" and no_cuda_device_reason():
            self._error = no_cuda_device_reason()
            return
        try:
            extension_build.load(self.name)
        except extension_build.ExtensionUnavailable as error:
            self._error = str(error)
            return
        ops.register_once()
        self._loaded = True

    def tensor_reason(self, t: Tensor) -> Optional[str]:
        dtypes = _DTYPES[self.name]
        if t.device.type != self.name:
            return f"it runs {self.name.upper()} tensors, not {t.device.type} tensors"
        if t.dtype not in dtypes:
            names = ", ".join(_dtype_name(d) for d in dtypes)
            return f"it computes {names}, not {_dtype_name(t.dtype)}"
        return None

    def expected_for(self, device: torch.device) -> bool:
        return device.type == self.name

    def _match_op(self, metric, r, class_token, distill_token):
        return torch.ops.tome_native.match(metric, r, class_token, distill_token)

    def _bipartite_merge_op(self, x, metric, size, r, class_token, distill_token):
        return torch.ops.tome_native.bipartite_merge(x, metric, size, r, class_token, distill_token)

    def _merge_ops(self):
        return torch.ops.tome_native

    # The scores only rank tokens and are never differentiated (the reference computes them
    # under no_grad): the metric goes in detached, so no output carries an autograd history.
    def assign(self, metric, roles, window):
        self._load()
        return torch.ops.tome_native.assign(metric.detach(), roles, window)

    def energy(self, metric, margin, alpha, form):
        self._load()
        return torch.ops.tome_native.energy(metric.detach(), margin, alpha, energy_form_code(form))
