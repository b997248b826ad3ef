"""Part of the torchvision stand-in (see torchvision/__init__.py)."""

from torchvision._placeholder import placeholder_module

__getattr__ = placeholder_module(__name__)
