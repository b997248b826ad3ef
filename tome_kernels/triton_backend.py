"""The "triton" backend: the fused Triton kernels (``tome_kernels/triton_kernels``).

``auto`` picks it for CUDA tensors. Its kernels load on first use, not at import, and a
failure to load (no triton, an incompatible version) is remembered and reported as the
reason it cannot run. With ``TRITON_INTERPRET=1`` set before that first use, Triton's
interpreter runs the kernels on CPU tensors, which is how the test suite checks them
without a GPU.
"""

import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference
from .backends import Backend
from .reference import MatchResult

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
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
            from .triton_kernels import launch, ops
        except Exception as error:  # any failure to load is a reason to report, not a crash
            self._error = f"the Triton kernels could not be loaded: {type(error).__name__}: {error}"
            return
        self._ops, self._launch = ops, launch
        # The interpreter is chosen when the kernels are defined, i.e. now.
        self._interpreted = _interpreter_requested()

    def load_error(self) -> Optional[str]:
        self._load()
        return self._error

    def unsupported_reasons(self, tensors: Sequence[Tensor]) -> List[str]:
        interpreted = _interpreter_requested() if self._interpreted is None else self._interpreted
        reasons = []
        for t in tensors:
            if t.device.type == "cpu" and not interpreted:
                reason = (
                    "it runs CUDA tensors; CPU tensors only in Triton's interpreter "
                    "(TRITON_INTERPRET=1 set before the first use of tome_kernels)"
                )
            elif t.device.type not in ("cpu", "cuda"):
                reason = f"it runs CUDA tensors, not {t.device.type} tensors"
            elif t.dtype not in SUPPORTED_DTYPES:
                reason = f"it computes float16, bfloat16 and float32, not {str(t.dtype).replace('torch.', '')}"
            else:
                continue
            if reason not in reasons:
                reasons.append(reason)
        return reasons

    def expected_for(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def _use_one_pass(self, num_tokens: int) -> bool:
        return self._launch.use_one_pass(num_tokens)

    def match(self, metric: Tensor, r: int, class_token: bool, distill_token: bool) -> MatchResult:
        self._load()
        n = metric.shape[-2]
        r = reference.clamp_r(r, n, class_token, distill_token)
        if r == 0:
            return reference.identity_match(metric, class_token, distill_token)
        src, dst, unm, token_map, members, row_start = self._ops.match(
            metric, r, class_token, distill_token, self._use_one_pass(n)
        )
        return MatchResult(r, src, dst, unm, token_map, class_token, distill_token, (members, row_start))

    def _groups(self, plan: MatchResult) -> Tuple[Tensor, Tensor]:
        """The plan's groups; for a plan another backend made, derived from its token map
        (members sorted by output row, in token order within a row)."""
        if plan.groups is not None:
            return plan.groups
        token_map = plan.token_map
        members = torch.argsort(token_map, dim=1, stable=True)
        rows = torch.arange(token_map.shape[1] - plan.r + 1, device=token_map.device)
        row_start = torch.searchsorted(token_map.gather(1, members), rows.expand(token_map.shape[0], -1).contiguous())
        return members.to(torch.int32), row_start.to(torch.int32)

    def merge_wavg(self, plan: MatchResult, x: Tensor, size: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if plan.r == 0:
            return reference.merge_wavg(plan, x, size)
        self._load()
        return self._ops.merge_wavg(x, size, *self._groups(plan))

    def merge(self, plan: MatchResult, x: Tensor, mode: str) -> Tensor:
        if plan.r == 0:
            return reference.merge(plan, x, mode)
        self._load()
        return self._ops.merge(x, *self._groups(plan), mode)

    def unmerge(self, plan: MatchResult, y: Tensor) -> Tensor:
        if plan.r == 0:
            return reference.unmerge(plan, y)
        self._load()
        return self._ops.unmerge(y, plan.token_map, *self._groups(plan))

    def bipartite_merge(self, x, metric, r, size, class_token, distill_token) -> Tuple[Tensor, Tensor]:
        n = metric.shape[-2]
        r = reference.clamp_r(r, n, class_token, distill_token)
        if r == 0:
            return reference.bipartite_merge(x, metric, 0, size, class_token, distill_token)
        self._load()
        x_out, size_out, _, _ = self._ops.bipartite_merge(
            x, metric, size, r, class_token, distill_token, self._use_one_pass(n)
        )
        return x_out, size_out
