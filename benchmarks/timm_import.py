"""timm for the model benchmarks, on any machine.

timm imports torchvision, which has no build for the CPU torch of the project's CI-class
machines: there, and only there, the tests' stand-in (tests/stand_ins/torchvision, which
only lets timm import) is put on the path first; tests/conftest.py does the same through
use_stand_in_if_needed.
"""

import importlib
import importlib.util
import os
import sys

_STAND_INS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "stand_ins")


def use_stand_in_if_needed() -> None:
    """Put the torchvision stand-in on sys.path when (and only when) the real one is missing."""
    if importlib.util.find_spec("torchvision") is None and _STAND_INS not in sys.path:
        sys.path.insert(0, _STAND_INS)


def import_timm():
    use_stand_in_if_needed()
    return importlib.import_module("timm")
