"""A stand-in for torchvision, only so that timm imports on a machine where no torchvision
build runs (no torchvision build on PyPI runs beside the CPU torch 2.13 this project pins).

timm imports names from torchvision at module level (data transforms, datasets, a frozen
batch norm) that no Vision Transformer uses. Every such name resolves here to a placeholder
that raises if it is ever used, so a test that needed real torchvision fails loudly instead
of running on a fake. The tests put this folder on sys.path only when the real torchvision
cannot be imported.
"""

from ._placeholder import placeholder_module

__getattr__ = placeholder_module(__name__)
