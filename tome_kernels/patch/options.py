"""How the blocks of a patched model match: ToMe's bipartite matching, PiToMe's
energy-protected matching, or DSM (windows of the patch grid at its first merging block,
ToMe's matching after it), with their options, checked at patch time.

PiToMe's options per block come from a preset (``PRESETS``), each of which any option given
explicitly overrides: the configurations of the authors' code per model family (Tran et al.,
NeurIPS 2024; hchautran/PiToMe, read in November 2026), and the paper's formula.
"""

import math
from typing import List, NamedTuple, Optional, Tuple

from ..checks import check_choice, check_flag, check_int, check_int_pair, is_real
from ..methods import check_pitome_alpha, check_pitome_margin
from ..reference.energy import FORMS
from ..reference.roles import SPLITS
from .schedule import dsm_r_per_block, r_per_block

METHODS = ("tome", "pitome", "dsm")


class Preset(NamedTuple):
    """A PiToMe configuration: the margin of block l of L is ``start - fall * (l / L)`` (as the
    authors' patches compute it); ``first_split`` in blocks 0 .. ceil(L / 2) - 1,
    ``second_split`` in the others."""

    start: float
    fall: float
    energy_form: str
    first_split: str
    second_split: str
    prop_attn: bool
    about: str


PRESETS = {
    "authors_vit": Preset(0.75, 0.75, "elu", "bipartite", "alternate", False,
                          "the authors' DeiT / ViT patch"),
    "authors_mae": Preset(0.75, 0.75, "elu", "alternate", "bipartite", False,
                          "the authors' MAE patch"),
    "authors_text": Preset(0.9, 0.25, "gaussian", "halves", "halves", False,
                           "the authors' BERT patch"),
    "paper": Preset(0.9, 0.9, "paper", "alternate", "alternate", True,
                    "equation (4) of the paper, margin 0.9 (1 - l / L)"),
}


class MethodOptions(NamedTuple):
    """How the blocks match. PiToMe: ``margins`` and ``splits`` per block, ``alpha``,
    ``energy_form`` (``pitome_match``'s options), from ``preset`` and the options given;
    DSM: ``delay``, its first merging block, which merges within ``window`` windows of the
    patch grid. ``prop_attn``: proportional attention, as given to the patch or the method's.
    ``alpha`` is None for the Gaussian energy, which has none."""

    method: str = "tome"
    preset: Optional[str] = None
    margins: Tuple[float, ...] = ()
    alpha: Optional[float] = None
    energy_form: str = "elu"
    splits: Tuple[str, ...] = ()
    delay: int = 0
    window: Tuple[int, int] = (2, 2)
    prop_attn: bool = True


def _per_block(name: str, value, num_blocks: int) -> Optional[list]:
    """A per-block list or tuple given for ``name``, checked for its length; None for a single value."""
    if not isinstance(value, (list, tuple)):
        return None
    if len(value) != num_blocks:
        raise ValueError(f"{name} as a list needs one value per block ({num_blocks}), got {len(value)}")
    return list(value)


def _margins(margin, preset: Preset, num_blocks: int) -> List:
    """Each block's margin: the preset's schedule; a number m0 is the first block's, the
    preset's schedule scaled to it (m0 (1 - l / L) at block l of L for the presets that fall
    to 0, the paper's rule); a list gives them all."""
    listed = _per_block("margin", margin, num_blocks)
    if listed is not None:
        return listed
    start, fall = preset.start, preset.fall
    if margin is not None:
        if not is_real(margin):
            raise TypeError(f"margin must be a real number or a list of one per block, got {type(margin).__name__}")
        # fall / start is exactly 1 for the presets that fall to 0: m0 - m0 (l / L) then.
        start, fall = margin, (fall / start) * margin
    return [start - fall * (block / num_blocks) for block in range(num_blocks)]


def _splits(split, preset: Preset, num_blocks: int) -> List:
    listed = _per_block("split", split, num_blocks)
    if listed is not None:
        return listed
    if split is not None:
        return [split] * num_blocks
    first = math.ceil(num_blocks / 2)
    return [preset.first_split] * first + [preset.second_split] * (num_blocks - first)


def check_method(method, allowed: Tuple[str, ...], num_blocks: int, default_preset: str = "authors_vit", *,
                 preset=None, margin=None, alpha=None, energy_form=None, split=None,
                 delay=0, window=(2, 2)) -> MethodOptions:
    """The checked options of ``method`` for a model of ``num_blocks`` blocks. An option the
    method does not use must not be given (PiToMe's: None; DSM's: their defaults): a margin
    given with method="tome" would otherwise be ignored without a word."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {', '.join(allowed)}; got {type(method).__name__}")
    if method not in allowed:
        why = ""
        if method in METHODS:
            why = " (DSM merges in windows of a patch grid: vision models only, patch.timm and patch.transformers)"
        raise ValueError(f"method must be one of {', '.join(allowed)}, got {method!r}{why}")
    given = dict(preset=preset, margin=margin, alpha=alpha, energy_form=energy_form, split=split)
    unused = [name for name, value in given.items() if value is not None and method != "pitome"]
    unused += [name for name, value, default in (("delay", delay, 0), ("window", window, (2, 2)))
               if method != "dsm" and value != default]
    if unused:
        user = "pitome" if unused[0] in given else "dsm"
        verb = "applies" if len(unused) == 1 else "apply"
        raise ValueError(f"{', '.join(unused)} {verb} to method={user!r} only, not method={method!r}")
    delay = check_int("delay", delay, 0, "blocks without merging")
    window = check_int_pair("window", window)
    if method != "pitome":
        return MethodOptions(method, delay=delay, window=window)
    name = check_choice("preset", default_preset if preset is None else preset, tuple(PRESETS))
    chosen = PRESETS[name]
    # pitome_match's own checks: a patch takes what the function takes, and says so in the
    # same words; the margin and split of each block, naming it where they were given per block.
    energy_form = check_choice("energy_form", chosen.energy_form if energy_form is None else energy_form, FORMS)
    alpha = check_pitome_alpha(alpha, energy_form)
    margins, splits = [], []
    for block, (m, s) in enumerate(zip(_margins(margin, chosen, num_blocks), _splits(split, chosen, num_blocks))):
        try:
            margins.append(check_pitome_margin(m, energy_form))
            splits.append(check_choice("split", s, SPLITS))
        except (TypeError, ValueError) as error:
            if not isinstance(margin, (list, tuple)) and not isinstance(split, (list, tuple)):
                raise
            raise type(error)(f"block {block}: {error}") from None
    return MethodOptions(method, name, tuple(margins), alpha, energy_form, tuple(splits), delay, window,
                         chosen.prop_attn)


def with_prop_attn(prop_attn, options: MethodOptions) -> MethodOptions:
    """``options`` with the proportional attention in force: as given, or the method's (PiToMe's
    preset's) when None."""
    return options._replace(prop_attn=options.prop_attn if prop_attn is None else check_flag("prop_attn", prop_attn))



def check_vision_method(r, num_blocks: int, prop_attn, method, **options) -> Tuple[MethodOptions, List[int]]:
    """The checked options and r per block of a vision patch (``patch.timm``,
    ``patch.transformers``): ToMe, PiToMe (default preset "authors_vit") or DSM, whose
    schedule spends its budget from its delay on; ``options`` as ``check_method`` takes them."""
    checked = with_prop_attn(prop_attn, check_method(method, ("tome", "pitome", "dsm"), num_blocks, "authors_vit",
                                                     **options))
    if checked.method == "dsm":
        return checked, dsm_r_per_block(r, num_blocks, checked.delay)
    return checked, r_per_block(r, num_blocks)
