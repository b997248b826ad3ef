"""torch.compile(fullgraph=True) over a backend whose first use is inside the compiled call.

Loading a backend imports modules, takes locks and may build an extension, none of which
dynamo can trace; the registry runs the load at trace time as a constant instead
(``registry._load_error``). Each case runs in a fresh interpreter, where nothing has loaded
yet: in this process an earlier test has always loaded the backends already, which hid the
failure unless the compile test happened to run first (``pytest -k``, ``pytest -n``).
"""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT
from tome_kernels.backends import registry

# The first use of the backend named in argv[1], under torch.compile: the result must equal
# the eager call's, the backend must not have been loaded before, and dynamo must make one
# graph (a load seen by dynamo's guards would make a second one on the next call).
FIRST_USE = """
import sys
import torch
import tome_kernels
from torch._dynamo.utils import counters
from tome_kernels.backends import registry

name = sys.argv[1]
loaded_before = {n: b._loaded if hasattr(b, "_loaded") else b._ops is not None
                 for n, b in registry._REGISTRY.items() if n != "reference"}
assert not any(loaded_before.values()), loaded_before

def step(x, metric, size):
    x_out, size_out = tome_kernels.bipartite_merge(x, metric, 5, size, class_token=True, backend=name)
    return x_out * size_out

x, metric, size = torch.randn(2, 17, 8), torch.randn(2, 17, 4), torch.ones(2, 17, 1)
compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
got = [compiled(x, metric, size) for _ in range(2)]
want = step(x, metric, size)
assert all(torch.equal(g, want) for g in got)
print(name, "graphs", counters["stats"]["unique_graphs"])
"""


# "cpu" by name (the registry's cannot_run_reasons), "auto" (select_backend's loop, which
# picks the CPU extension for CPU tensors) and "triton" in the interpreter (its first use
# used to make dynamo compile the function twice).
@pytest.mark.parametrize("name", ["cpu", "auto", "triton"])
def test_first_use_inside_a_fullgraph_compile(cpu_extension, name):
    # cpu_extension: built (or found in the cache) here first, so that a build error fails
    # with its reason and the subprocess does not spend a minute building.
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    env.pop(registry.ENV_VAR, None)
    done = subprocess.run([sys.executable, "-c", FIRST_USE, name], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split()[-3:] == [name, "graphs", "1"], done.stdout


def test_the_constant_mark_is_what_torch_sets():
    """The registry marks its loader the way torch.compiler.assume_constant_result does,
    without importing torch._dynamo at import time: this checks torch still uses that mark."""

    def probe():
        return None

    torch.compiler.assume_constant_result(probe)
    marked = registry._constant_under_compile(lambda: None)
    assert probe.__dict__ == marked.__dict__ == {"_dynamo_marked_constant": True}
