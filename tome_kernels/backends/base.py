"""The backend interface: what every backend computes, and the reference backend (this
interface's own methods, the contract of ``tome_kernels.reference``). Each backend says why
it cannot run (``load_error`` for the whole backend, ``unsupported_reasons`` for given
inputs); the registry (``registry.py``) chooses between them."""

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import reference
from ..reference import MatchResult, energy, partition
from ..reference.partition import Partition

# A plan is a bipartite matching (ToMe) or a general partition (the later methods).
Plan = Union[MatchResult, Partition]


def energy_form_code(form: str) -> int:
    """The code by which the fast backends' energy operators take a form of PiToMe's f: its
    index in ``energy.FORMS``. An unknown name is refused as the reference refuses it."""
    if form not in energy.FORMS:
        raise ValueError(f"form must be one of {energy.FORMS}, got {form!r}")
    return energy.FORMS.index(form)


class Backend:
    """The interface every backend implements; this base class is the reference itself."""

    name = "reference"

    def load_error(self) -> Optional[str]:
        """Why this backend cannot run at all here (missing package, failed build), or None."""
        return None

    def unsupported_reasons(self, tensors: Sequence[Tensor]) -> List[str]:
        """Why this backend cannot run these particular inputs (device, dtype...), each
        reason once. Answered without loading the backend, so that ``auto`` never loads one
        it will not use."""
        reasons = []
        for t in tensors:
            reason = self.tensor_reason(t)
            if reason is not None and reason not in reasons:
                reasons.append(reason)
        return reasons

    def tensor_reason(self, t: Tensor) -> Optional[str]:
        """Why this backend cannot run the tensor ``t``, or None: what backends override."""
        return None

    def expected_for(self, device: torch.device) -> bool:
        """Whether ``auto`` would normally pick this backend on ``device``; failing to load
        then deserves a warning rather than a silent fallback."""
        return False

    def match(self, metric: Tensor, r: int, class_token: bool, distill_token: bool) -> MatchResult:
        return reference.match(metric, r, class_token, distill_token)

    def assign(self, metric: Tensor, roles: Tensor, window: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Each source token's best destination: ``partition.assign``."""
        return partition.assign(metric, roles, window)

    def partition(self, metric: Tensor, roles: Tensor, r: int, window: Optional[Tensor]) -> Partition:
        """The general plan merging ``r`` sources: ``partition.partition`` with this
        backend's ``assign``."""
        return partition.partition(metric, roles, r, window, self)

    def energy(self, metric: Tensor, margin: float, alpha: float, form: str) -> Tensor:
        """PiToMe's energy of every token: ``energy.energy``; ``form`` is a name of
        ``energy.FORMS`` (the operators of the fast backends take its index)."""
        return energy.energy(metric, margin, alpha, form)

    def merge_wavg(self, plan: Plan, x: Tensor, size: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if isinstance(plan, Partition):
            return partition.merge_wavg(plan, x, size)
        return reference.merge_wavg(plan, x, size)

    def merge(self, plan: Plan, x: Tensor, mode: str) -> Tensor:
        if isinstance(plan, Partition):
            return partition.merge(plan, x, mode)
        return reference.merge(plan, x, mode)

    def unmerge(self, plan: Plan, y: Tensor) -> Tensor:
        return reference.unmerge(plan, y)

    def bipartite_merge(self, x, metric, r, size, class_token, distill_token) -> Tuple[Tensor, Tensor]:
        """Match and merge; fused backends override this with a single pass."""
        plan = self.match(metric, r, class_token, distill_token)
        return self.merge_wavg(plan, x, size)
