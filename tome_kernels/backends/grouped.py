"""The part of a fast backend that is the same for every kernel family: the Triton kernels
and the native (CPU / CUDA) extensions both apply a matching through its groups
``(members, row_start)`` (see ``csrc/ops.cpp``), so plans made by one run on the other.

A subclass loads its operators in ``_load`` (recording a failure in ``_error``), says which
tensors it cannot run in ``tensor_reason``, and names them through ``_match_op``,
``_bipartite_merge_op`` and ``_merge_ops``; ``r = 0`` ("no merge") never reaches an
operator, because an operator may not return its input.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..reference import MatchResult
from ..reference.partition import Partition
from .base import Backend, Plan


class GroupedBackend(Backend):
    _error: Optional[str] = None  # why loading failed, set by _load

    def _load(self) -> None:
        """Load the operators once, or record in ``_error`` why they cannot load."""
        raise NotImplementedError

    def load_error(self) -> Optional[str]:
        self._load()
        return self._error

    def _match_op(self, metric: Tensor, r: int, class_token: bool, distill_token: bool):
        """(src_idx, dst_idx, unm_idx, token_map, members, row_start)."""
        raise NotImplementedError

    def _bipartite_merge_op(self, x, metric, size, r: int, class_token: bool, distill_token: bool):
        """(x_out, size_out, members, row_start)."""
        raise NotImplementedError

    def _merge_ops(self):
        """An object with ``merge_wavg``, ``merge`` and ``unmerge`` operators."""
        raise NotImplementedError

    def match(self, metric: Tensor, r: int, class_token: bool, distill_token: bool) -> MatchResult:
        n = metric.shape[-2]
        r = reference.clamp_r(r, n, class_token, distill_token)
        if r == 0:
            return reference.identity_match(metric, class_token, distill_token)
        self._load()
        src, dst, unm, token_map, members, row_start = self._match_op(metric, r, class_token, distill_token)
        return MatchResult(r, src, dst, unm, token_map, class_token, distill_token, (members, row_start))

    def partition(self, metric, roles, r, window) -> Partition:
        # The groups are derived once here, not again by every merge, unmerge and backward.
        plan = super().partition(metric, roles, r, window)
        # A new Partition rather than plan._replace: torch 2.11's dynamo cannot rebuild a named
        # tuple made by _replace at a graph break (an AssertionError in its side_effects.py).
        return Partition(plan.r, plan.token_map, self._groups(plan)) if plan.r else plan

    def _groups(self, plan: Plan) -> Tuple[Tensor, Tensor]:
        """The plan's groups; for a plan made without them (by the reference, or a general
        partition), derived from its token map: members sorted by output row, in token
        order within a row."""
        if plan.groups is not None:
            return plan.groups
        token_map = plan.token_map
        members = torch.argsort(token_map, dim=1, stable=True)
        rows = torch.arange(token_map.shape[1] - plan.r + 1, device=token_map.device)
        row_start = torch.searchsorted(token_map.gather(1, members), rows.expand(token_map.shape[0], -1).contiguous())
        return members.to(torch.int32), row_start.to(torch.int32)

    def merge_wavg(self, plan: Plan, x: Tensor, size: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if plan.r == 0:
            return reference.merge_wavg(plan, x, size)
        self._load()
        return self._merge_ops().merge_wavg(x, size, *self._groups(plan))

    def merge(self, plan: Plan, x: Tensor, mode: str) -> Tensor:
        if plan.r == 0:
            return reference.merge(plan, x, mode)
        self._load()
        return self._merge_ops().merge(x, *self._groups(plan), mode)

    def unmerge(self, plan: Plan, y: Tensor) -> Tensor:
        if plan.r == 0:
            return reference.unmerge(plan, y)
        self._load()
        return self._merge_ops().unmerge(y, plan.token_map, *self._groups(plan))

    def bipartite_merge(self, x, metric, r, size, class_token, distill_token) -> Tuple[Tensor, Tensor]:
        n = metric.shape[-2]
        r = reference.clamp_r(r, n, class_token, distill_token)
        if r == 0:
            return reference.bipartite_merge(x, metric, 0, size, class_token, distill_token)
        self._load()
        x_out, size_out, _, _ = self._bipartite_merge_op(x, metric, size, r, class_token, distill_token)
        return x_out, size_out
