"""How a patch changes a module without replacing it: a subclass of its own class with the
ToMe forward, and a forward hook that hands an attention's keys to the merge. Both keep
the state_dict's names, and let ``remove`` restore the module exactly.

Both survive what users do to modules: the subclasses pickle (``torch.save(model)``) and
deep-copy (``copy.deepcopy``, timm's ``ModelEmaV3``) as their original class with the patch
on, and the hooks are objects, not closures, so a copy's hooks point at the copy's state.
"""

import inspect
from typing import Callable, Optional

from torch import Tensor, nn

from .state import ToMeState

_SUBCLASSES = {}


def _patched_instance(original: type, mixin: type) -> nn.Module:
    """An empty instance of ``original`` patched with ``mixin``, for unpickling: the
    subclass is made at run time, so pickle cannot find it by name and finds this instead."""
    cls = tome_subclass(original, mixin)
    return cls.__new__(cls)


def _reduce_ex(self, protocol: int):
    # object's own reduction names the class itself; name the original and the mixin instead.
    reduced = object.__reduce_ex__(self, protocol)
    return (_patched_instance, (self._tome_original_class, self._tome_mixin), *reduced[2:])


def tome_subclass(cls: type, mixin: type) -> type:
    """The class a patched module takes: ``mixin``'s forward over ``cls``. One per original
    class, so that isinstance checks keep working and ``remove`` knows what to restore. It
    keeps the original's name: libraries write a model's class name into what they save
    (transformers' config "architectures", diffusers' "_class_name") and load by it."""
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        namespace = {"_tome_original_class": cls, "_tome_mixin": mixin, "__reduce_ex__": _reduce_ex,
                     "__qualname__": cls.__qualname__, "__module__": cls.__module__}
        _SUBCLASSES[key] = type(cls.__name__, (mixin, cls), namespace)
    return _SUBCLASSES[key]


# inspect.signature costs tens of microseconds, on every forward: made once per function. A
# plain dict, which dynamo reads as it is (it warns on, and bypasses, functools.lru_cache).
_SIGNATURES = {}


def call_arguments(function: Callable, *args, **kwargs) -> dict:
    """The arguments of a call ``function(*args, **kwargs)`` by name, defaults left out."""
    if function not in _SIGNATURES:
        _SIGNATURES[function] = inspect.signature(function)
    return _SIGNATURES[function].bind(*args, **kwargs).arguments


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before any patch."""
    return getattr(type(module), "_tome_original_class", type(module))


class KeyCapture:
    """A forward hook that hands the output of the module it is on (what an attention makes
    its keys with) to ``state``, as keys (B, H, N, Dh): no head-mean is ever materialised.
    ``head_dim`` splits a (B, N, H * Dh) output into heads (BERT's key projection); None
    takes the output as it is (timm's key norm, already (B, H, N, Dh))."""

    def __init__(self, state: ToMeState, head_dim: Optional[int] = None):
        self.state = state
        self.head_dim = head_dim

    def __call__(self, _module: nn.Module, _inputs, keys: Tensor) -> None:
        if self.head_dim is not None:
            keys = keys.view(*keys.shape[:-1], -1, self.head_dim).transpose(1, 2)
        self.state.keys = keys


def remove_hooks(module: nn.Module, kind: type) -> None:
    """Remove every forward hook and forward pre-hook of ``module`` that is a ``kind``. The
    hooks are found, not remembered by handle, so a copied or unpickled model removes its own."""
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for key in [key for key, hook in hooks.items() if isinstance(hook, kind)]:
            del hooks[key]
            # A hook registered with_kwargs / always_call is also listed in these.
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                          "_forward_pre_hooks_with_kwargs"):
                getattr(module, extra, {}).pop(key, None)

