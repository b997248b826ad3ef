"""The "triton" backend: the fused Triton kernels of this package, through the operators of
``ops.py``. What it shares with the native backends (a plan applied through its groups, r = 0
kept away from the operators) is ``backends/grouped.py``: this class names the operators.

``auto`` picks it for CUDA tensors. Its kernels load on first use, not at import, and a
failure to load (no triton, an incompatible version) is remembered and reported as the
reason it cannot run. With ``TRITON_INTERPRET=1`` set before that first use, Triton's
interpreter runs the kernels on CPU tensors, which is how the test suite checks them
without a GPU.
"""

import os
from typing import Optional

import torch
from torch import Tensor

from ..base import energy_form_code
from ..grouped import GroupedBackend

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(GroupedBackend):
    name = "triton"

    def __init__(self):
        self._ops = None
        self._launch = None
        self._error: Optional[str] = None
        self._interpreted: Optional[bool] = None

    def _load(self) -> None:
        if self._ops is not None or self._error is not None:
            return
        try:
            from . import launch, ops
        except Exception as error:  # any failure to load is a reason to report, not a crash
            self._error = f"the Triton kernels could not be loaded: {type(error).__name__}: {error}"
            return
        self._ops, self._launch = ops, launch
        # The interpreter is chosen when the kernels are defined, i.e. now.
        self._interpreted = _interpreter_requested()

    def tensor_reason(self, t: Tensor) -> Optional[str]:
        interpreted = _interpreter_requested() if self._interpreted is None else self._interpreted
        if t.device.type == "cpu" and not interpreted:
            return (
                "it runs CUDA tensors; CPU tensors only in Triton's interpreter "
                "(TRITON_INTERPRET=1 set before the first use of tome_kernels)"
            )
        if t.device.type not in ("cpu", "cuda"):
            return f"it runs CUDA tensors, not {t.device.type} tensors"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"it computes float16, bfloat16 and float32, not {str(t.dtype).replace('torch.', '')}"
        return None

    def expected_for(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def _match_op(self, metric, r, class_token, distill_token):
        return self._ops.match(metric, r, class_token, distill_token, self._launch.use_one_pass(metric.shape[-2]))

    def _bipartite_merge_op(self, x, metric, size, r, class_token, distill_token):
        one_pass = self._launch.use_one_pass(metric.shape[-2])
        return self._ops.bipartite_merge(x, metric, size, r, class_token, distill_token, one_pass)

    def _merge_ops(self):
        return self._ops

    def assign(self, metric, roles, window):
        self._load()
        return self._ops.assign(metric, roles, window)

    def energy(self, metric, margin, alpha, form):
        self._load()
        return self._ops.energy(metric, margin, alpha, energy_form_code(form))
