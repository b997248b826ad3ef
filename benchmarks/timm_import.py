"""timm for the model benchmarks, on any machine.

timm imports torchvision, which has no build for the CPU torch of the project's CI-class
machines: there, and only there, the tests' stand-in (tests/stand_ins/torchvision, which
only lets timm import) is put on the path first, exactly as tests/conftest.py does.
"""

import importlib
import importlib.util
import os
import sys

_STAND_INS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "stand_ins")


def import_timm():
    if importlib.util.find_spec("torchvision") is None and _STAND_INS not in sys.path:
        sys.path.insert(0, _STAND_INS)
    return importlib.import_module("timm")
