"""MergePlan: the result of one matching, applied to any number of token tensors."""

from typing import Optional, Tuple

from torch import Tensor

from . import checks
from .backends.ambient import fixed_numerics
from .backends.base import Backend, Plan
from .reference import MatchResult

# Applies a plan to tensors its own backend cannot run (e.g. float64 with the Triton one).
_REFERENCE = Backend()


class MergePlan:
    """Which tokens merge into which, for a batch of B rows of N tokens.

    Made by ``bipartite_match`` and the other methods' ``*_match`` functions. Applying it costs
    no new matching, so one plan can merge several tensors that share the token axis
    (features, sizes, positions...).

    Attributes:
        r: tokens removed per row, after clamping (0 means the plan is the identity).
        token_map: (B, N) int64, the output row of every input token.
        num_tokens: N, the input length; outputs have ``num_tokens - r`` rows.
        backend: name of the backend that made the plan and applies it.
    """

    def __init__(self, match: Plan, backend: Backend):
        self._match = match
        self._backend = backend

    @property
    def r(self) -> int:
        return self._match.r

    @property
    def token_map(self) -> Tensor:
        return self._match.token_map

    @property
    def num_tokens(self) -> int:
        return self._match.token_map.shape[1]

    @property
    def batch_size(self) -> int:
        return self._match.token_map.shape[0]

    @property
    def device(self):
        return self._match.token_map.device

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def match_result(self) -> Plan:
        """The raw plan: a ``reference.MatchResult`` (index tensors of a bipartite matching)
        or a ``partition.Partition`` (token map of a general method)."""
        return self._match

    def _backend_for(self, *tensors: Optional[Tensor]) -> Backend:
        """The plan's backend, or the reference for tensors that backend cannot run: any
        backend's plan is a valid reference plan, so the result is the same."""
        given = [t for t in tensors if t is not None]
        return _REFERENCE if self._backend.unsupported_reasons(given) else self._backend

    def _check_tokens(self, name: str, value, tokens: int) -> Tensor:
        # The message says where B and N come from: this plan, not a metric the caller may no
        # longer have at hand; for unmerge, the rows expected are the plan's output, N - r.
        if tokens == self.num_tokens:
            return checks.check_tokens(name, value, self.batch_size, tokens, self.device, f"(B, {tokens}, C)",
                                       "from the plan")
        return checks.check_tokens(name, value, self.batch_size, tokens, self.device, f"(B, {tokens}, C)",
                                   f"from the plan: N={self.num_tokens}, r={self.r}", "N - r")

    @fixed_numerics
    def merge_wavg(self, x: Tensor, size: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Size-weighted average of each group: (x (B, N-r, C), size (B, N-r, 1))."""
        self._check_tokens("x", x, self.num_tokens)
        checks.check_size(size, self.batch_size, self.num_tokens, self.device, "from the plan")
        return self._backend_for(x, size).merge_wavg(self._match, x, size)

    @fixed_numerics
    def merge(self, x: Tensor, mode: str = "mean") -> Tensor:
        """Reduce each group by ``mode``: "sum", "mean", "amax" or "amin"."""
        checks.check_mode(mode)
        self._check_tokens("x", x, self.num_tokens)
        return self._backend_for(x).merge(self._match, x, mode)

    @fixed_numerics
    def unmerge(self, y: Tensor) -> Tensor:
        """(B, N-r, C) back to (B, N, C): each input token gets the row it was merged into."""
        self._check_tokens("y", y, self.num_tokens - self.r)
        return self._backend_for(y).unmerge(self._match, y)

    def __repr__(self) -> str:
        flags = ""
        if isinstance(self._match, MatchResult):
            flags = f"class_token={self._match.class_token}, distill_token={self._match.distill_token}, "
        return (
            f"MergePlan(batch_size={self.batch_size}, num_tokens={self.num_tokens}, r={self.r}, "
            f"{flags}backend={self.backend!r})"
        )
