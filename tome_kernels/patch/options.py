"""How the blocks of a patched model match: ToMe's bipartite matching, PiToMe's
energy-protected matching, or DSM (windows of the patch grid at its first merging block,
ToMe's matching after it), with their options, checked at patch time."""

from typing import NamedTuple, Tuple

from ..checks import check_flag, check_int, check_int_pair
from ..methods import PITOME_MARGIN, check_pitome_energy

METHODS = ("tome", "pitome", "dsm")


class MethodOptions(NamedTuple):
    """How the blocks match. ``margin``, ``alpha``, ``shifted``: PiToMe's energy (the margin
    of block l of L is ``margin * (1 - l / L)``); ``delay``: DSM's first merging block, which
    merges within ``window`` windows of the patch grid."""

    method: str = "tome"
    margin: float = PITOME_MARGIN
    alpha: float = 1.0
    shifted: bool = False
    delay: int = 0
    window: Tuple[int, int] = (2, 2)


def check_method(method, allowed: Tuple[str, ...], **options) -> MethodOptions:
    """The checked options of ``method``. An option the method does not use must keep its
    default: a margin given with method="tome" would otherwise be ignored without a word."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {', '.join(allowed)}; got {type(method).__name__}")
    if method not in allowed:
        why = " (DSM merges in windows of a patch grid: timm ViTs only)" if method in METHODS else ""
        raise ValueError(f"method must be one of {', '.join(allowed)}, got {method!r}{why}")
    default = MethodOptions()
    # PiToMe's margin and alpha by pitome_match's own rule: a patch takes what the function takes.
    margin, alpha = check_pitome_energy(options.get("margin", default.margin), options.get("alpha", default.alpha))
    checked = dict(
        margin=margin,
        alpha=alpha,
        shifted=check_flag("shifted", options.get("shifted", default.shifted)),
        window=check_int_pair("window", options.get("window", default.window)),
    )
    checked["delay"] = check_int("delay", options.get("delay", default.delay), 0, "blocks without merging")
    users = {"margin": "pitome", "alpha": "pitome", "shifted": "pitome", "delay": "dsm", "window": "dsm"}
    unused = [name for name, user in users.items() if user != method and checked[name] != getattr(default, name)]
    if unused:
        verb = "applies" if len(unused) == 1 else "apply"
        raise ValueError(f"{', '.join(unused)} {verb} to method={users[unused[0]]!r} only, not method={method!r}")
    return MethodOptions(method, **checked)
