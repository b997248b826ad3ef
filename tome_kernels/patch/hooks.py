"""How a patch changes a module without replacing it: a subclass of its own class with the
ToMe forward, and a forward hook that hands an attention's keys to the merge. Both keep
the state_dict's names, and let ``remove`` restore the module exactly."""

from torch import nn

from .state import ToMeState

_SUBCLASSES = {}


def tome_subclass(cls: type, mixin: type) -> type:
    """The class a patched module takes: ``mixin``'s forward over ``cls``. One per original
    class, so that isinstance checks keep working and ``remove`` knows what to restore."""
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"ToMe{cls.__name__}", (mixin, cls), {"_tome_original_class": cls})
    return _SUBCLASSES[key]


def capture_keys(module: nn.Module, state: ToMeState, to_heads=None):
    """Hand the output of ``module`` (what an attention makes its keys with) to ``state``,
    so that the merge gets the keys as keys (B, H, N, Dh) and no head-mean is ever
    materialised. A forward hook rather than a wrapper module, so that the model's
    state_dict keeps its names while patched. Returns the hook's handle."""

    def hand_over(_module, _inputs, keys):
        state.keys = keys if to_heads is None else to_heads(keys)

    return module.register_forward_hook(hand_over)
