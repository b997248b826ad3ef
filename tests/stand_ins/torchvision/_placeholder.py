"""Placeholder names for the torchvision stand-in (see __init__.py)."""


class _PlaceholderMeta(type):
    # Class-level attributes (enum members such as InterpolationMode.BILINEAR) are read at
    # import time by timm; they resolve to their own dotted name.
    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return f"{cls.__qualname__}.{attr}"


def _placeholder(module_name, name):
    def refuse(*args, **kwargs):
        raise NotImplementedError(f"{module_name}.{name} is a stand-in: real torchvision is not installed")

    return _PlaceholderMeta(name, (), {"__init__": refuse, "__module__": module_name})


def placeholder_module(module_name):
    """A module ``__getattr__`` giving a placeholder for any public name."""

    def module_getattr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(module_name, name)

    return module_getattr
