"""How many tokens each block merges away: the r schedules of docs/models.md ("r schedules")."""

import math
from typing import List, Sequence, Tuple, Union

from ..checks import check_int, check_real

RSchedule = Union[int, Sequence[int], Tuple[int, float]]


def r_per_block(r: RSchedule, num_blocks: int) -> List[int]:
    """The tokens removed by each of ``num_blocks`` blocks.

    - an int: the same r in every block;
    - a list: r per block, padded with zeros (longer than the model is an error);
    - a tuple ``(r, inflection)``: a linear ramp from ``lo = int(r * (1 - inflection))`` to
      ``hi = 2 * r - lo`` over the blocks; the inflection is in [-1, 1]: 0 is constant, 1
      increasing from 0, -1 decreasing to 0. The total stays about ``r * num_blocks``.

    Each block then clamps its r to what its token count allows (the merge contract).
    """
    num_blocks = check_int("num_blocks", num_blocks, 1, "the blocks of the model")
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple must be (r, inflection), got {r!r}; give a per-block schedule as a list")
        base = check_int("r (the first item of (r, inflection))", r[0])
        # Outside [-1, 1] the ramp's ends go negative and are cut to 0: the total is no longer
        # about r per block, and (r, 4) is more likely a per-block list mistyped as a tuple.
        inflection = check_real("the inflection of r = (r, inflection)", r[1], -1.0, 1.0)
        lo = int(base * (1 - inflection))
        hi = 2 * base - lo
        if num_blocks == 1:
            return [base]
        return [max(int(lo + block * (hi - lo) / (num_blocks - 1)), 0) for block in range(num_blocks)]
    if isinstance(r, list):
        if len(r) > num_blocks:
            raise ValueError(f"r gives {len(r)} per-block values but the model has {num_blocks} blocks")
        values = [check_int(f"r[{i}]", v) for i, v in enumerate(r)]
        return values + [0] * (num_blocks - len(values))
    if isinstance(r, float) and 0 < r < 1:
        # A fraction is more likely the keep ratio of the PiToMe authors' scripts than a slip.
        raise TypeError(f"r must be an int, tokens removed per block, got {r!r}; for a keep ratio use "
                        "r=tome_kernels.patch.schedule.keep_ratio_r(ratio, tokens, num_blocks)")
    return [check_int("r", r)] * num_blocks


def dsm_r_per_block(r: int, num_blocks: int, delay: int) -> List[int]:
    """DSM's schedule: ToMe's budget of ``r`` tokens per block over all ``num_blocks`` blocks
    (``r * num_blocks``), spent by the blocks after the first ``delay`` ones only.

    The first ``delay`` blocks merge nothing (their attention has not settled yet, the
    premise of delayed merging); the budget is split evenly over the others, the remainder
    one token each to the earliest of them. Each block still clamps its count to what its
    token count allows, so a large r can leave part of the budget unspent.
    """
    r = check_int("r (an int for method='dsm': the total budget is r per block)", r)
    num_blocks = check_int("num_blocks", num_blocks, 1, "the blocks of the model")
    delay = check_int("delay", delay, 0, "blocks without merging")
    if delay >= num_blocks:
        raise ValueError(f"delay must be in [0, {num_blocks}) for a model of {num_blocks} blocks, got {delay}")
    merging = num_blocks - delay
    each, extra = divmod(r * num_blocks, merging)
    return [0] * delay + [each + (1 if i < extra else 0) for i in range(merging)]


def keep_ratio_r(ratio: float, tokens: int, num_blocks: int, protected: int = 1) -> List[int]:
    """The r per block that a keep ratio gives a model seeing ``tokens`` tokens at its first
    block, ``protected`` of them kept (class / distillation tokens): each block removes
    floor(T - T * ratio) of the T unprotected tokens it sees, as the PiToMe authors' image
    code does, clamped to T // 2 as every block clamps its r. ``ratio`` in (0, 1]; 1 keeps
    everything. Pass the list as ``r`` to the patches."""
    ratio = check_real("ratio", ratio, 0.0, 1.0, low_open=True, meaning="the share of tokens each block keeps")
    tokens = check_int("tokens", tokens, 0, "the tokens at the first block")
    num_blocks = check_int("num_blocks", num_blocks, 1, "the blocks of the model")
    protected = check_int("protected", protected, 0, "tokens never merged")
    schedule = []
    remaining = max(tokens - protected, 0)
    for _ in range(num_blocks):
        r = min(math.floor(remaining - remaining * ratio), remaining // 2)
        schedule.append(r)
        remaining -= r
    return schedule
