"""How many Triton compilations a run makes: the distinct compile keys of its launches.

Triton compiles a kernel once per key: the values of its ``tl.constexpr`` arguments, the
launch options (``num_warps``, ...), and for every other argument its type and runtime
specialisation: an integer equal to 1 becomes a constant, an integer or a pointer that is a
multiple of 16 is marked as such (and an argument listed in the kernel's
``do_not_specialize`` is neither). ``compile_key`` computes that key for one launch with
Triton's own specialisation function and the CUDA backend, so it is what a GPU run would
compile, also when the launch runs in the interpreter; ``recording`` records the key of
every launch that ``launch.py`` makes.

    python -m tome_kernels.backends.triton.specializations [--keys FILE] [pytest arguments]

runs pytest with every launch recorded (in the interpreter, as the tests set it up) and
prints the number of distinct keys per kernel and in all; ``--keys`` writes the keys out.
"""

import argparse
import contextlib
import inspect
import json
import sys
from collections import Counter
from typing import Dict, Iterator, Set, Tuple

import torch

# Launch keyword arguments that are options of the compiler, not kernel arguments.
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


def _specialize():
    """Triton's per-argument specialisation (native since triton 3.4; Python before)."""
    from triton.runtime import jit

    impl = getattr(jit, "native_specialize_impl", None) or getattr(jit, "specialize_impl", None)
    if impl is None:
        raise RuntimeError("this triton has no specialize_impl: update compile_key for its version")
    return impl


def kernel_arguments(kernel):
    """(name, is a constexpr, is in do_not_specialize) per argument, for a compiled kernel
    (JITFunction) as for an interpreted one (which keeps its decorator's options in kwargs)."""
    dont = getattr(kernel, "do_not_specialize", None)
    if dont is None:
        dont = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    result = []
    for i, param in enumerate(inspect.signature(kernel.fn).parameters.values()):
        ann = param.annotation
        constexpr = "constexpr" in (ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann)))
        result.append((param.name, constexpr, param.name in dont or i in dont))
    return result


def compile_key(kernel, args: tuple, kwargs: Dict[str, object]) -> Tuple:
    """(kernel name, per-argument specialisation, options): equal keys share one compilation."""
    from triton.backends.nvidia.compiler import CUDABackend

    specialize = _specialize()
    fn = kernel.fn
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in _OPTIONS})
    parts = []
    for name, constexpr, dont in kernel_arguments(kernel):
        value = bound.arguments[name]
        if constexpr:
            parts.append((name, "constexpr", value))
        else:
            parts.append((name,) + tuple(specialize(CUDABackend, value, False, not dont, True)))
    return (fn.__name__, tuple(parts), tuple(sorted(options.items())))


class _Recorded:
    """Stands for a kernel in launch.py: records each launch's key, then launches (or not)."""

    def __init__(self, kernel, keys: Set[Tuple], launch_kernels: bool):
        self.kernel, self.keys, self.launch_kernels = kernel, keys, launch_kernels

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.keys.add(compile_key(self.kernel, args, kwargs))
            if self.launch_kernels:
                self.kernel[grid](*args, **kwargs)

        return launch


class _ZeroedTorch:
    """torch for launch.py, whose ``empty`` buffers start as zeros: with no kernel to fill
    them, what reads them next still finds valid indices."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, **kwargs):
        return torch.zeros(*shape, **kwargs)


@contextlib.contextmanager
def recording(launch_kernels: bool = True) -> Iterator[Set[Tuple]]:
    """Within the block, every kernel launch of launch.py adds its key to the yielded set.

    With ``launch_kernels=False`` no kernel runs (and launch.py's buffers are zeros): a call
    of any size costs only the Python of its launchers, which is how to count the keys of
    the shapes and dtypes a run will use (on CPU tensors, in the interpreter); its results
    are meaningless.
    """
    from . import launch
    from .compile_check import KERNELS

    keys: Set[Tuple] = set()
    saved = {name: getattr(launch, name) for name in KERNELS if hasattr(launch, name)}
    saved_torch = launch.torch
    try:
        for name, kernel in saved.items():
            setattr(launch, name, _Recorded(kernel, keys, launch_kernels))
        if not launch_kernels:
            launch.torch = _ZeroedTorch()
        yield keys
    finally:
        for name, kernel in saved.items():
            setattr(launch, name, kernel)
        launch.torch = saved_torch


def summary(keys: Set[Tuple]) -> str:
    per_kernel = Counter(key[0] for key in keys)
    lines = [f"{count:5d} {name}" for name, count in sorted(per_kernel.items())]
    return "\n".join(lines + [f"{len(keys):5d} distinct compile keys in all"])


class _Plugin:
    """Records from the start of the session, once the tests' conftest has set Triton up."""

    def __init__(self):
        self.keys: Set[Tuple] = set()
        self._recording = None

    def pytest_sessionstart(self, session):
        self._recording = recording()
        self.keys = self._recording.__enter__()

    def pytest_sessionfinish(self, session, exitstatus):
        self._recording.__exit__(None, None, None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", help="write the distinct keys to this JSON file")
    args, pytest_args = parser.parse_known_args(argv)
    import pytest

    plugin = _Plugin()
    status = pytest.main(pytest_args, plugins=[plugin])
    print(summary(plugin.keys))
    if args.keys:
        with open(args.keys, "w") as f:
            json.dump(sorted(plugin.keys, key=repr), f, indent=0, default=repr)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
