"""The CUDA extension (``_C_cuda``) links and loads, and every operator has its CUDA kernel,
on a machine without a GPU: nothing runs on a device.

A CUDA source once went missing from ``csrc/sources.txt``; ``_C_cuda`` still linked, then
failed to load (an undefined symbol), and no CPU test saw it because nothing on a CPU
machine loads ``_C_cuda``. A CUDA build of torch imports, builds and loads extensions without
a GPU, so this test does it with one, in a separate interpreter: ``$TOME_CUDA_PYTHON``, else
this interpreter if its torch is a CUDA build (the README's .venv/, which CI uses, and the GPU
machine). It is skipped, saying why, when there is none, or no CUDA toolkit.

The extension is JIT-built from the checkout's csrc/ (``TOME_KERNELS_CSRC``, so that a stale
in-place build cannot stand in for it) into the usual cache, which is keyed by every source
file and by torch: a change to any source is a new build, an unchanged tree a cache hit that
still loads the library (ctypes loads with RTLD_NOW: every symbol must resolve).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT

# A build (minutes on two cores the first time): left out of the fast loop.
pytestmark = pytest.mark.build

TIMEOUT_S = 900
# One architecture is enough to link and load, and sm_90 is the GPU machine's; both sm_80
# and sm_90 are compiled by tests/builds/test_cuda_compile.py.
ARCHS = "9.0"

# Loads "cuda" (which loads "cpu", the schemas, first) and reports what is registered.
CHECK = """
import json, os, time
t0 = time.perf_counter()
import torch
from tome_kernels.backends import op_table
from tome_kernels.backends.native import extension_build as eb
t1 = time.perf_counter()
eb.load("cuda")
t2 = time.perf_counter()
from torch.utils import cpp_extension
names = sorted(op_table.FAKES)
print(json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.is_available(),
    "cuda_home": cpp_extension.CUDA_HOME, "import_s": t1 - t0, "load_s": t2 - t1,
    "from": {kind: eb.loaded_from(kind) for kind in ("cpu", "cuda")},
    "declared": sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                       if n.startswith("tome_native::")),
    "kernels": {key: [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(f"tome_native::{n}", key)]
                for key in ("CPU", "CUDA")},
    "table": names,
}))
"""


def _cuda_python():
    """(python, None), or (None, why there is none)."""
    if os.environ.get("TOME_CUDA_PYTHON"):
        return os.environ["TOME_CUDA_PYTHON"], None
    if torch.version.cuda is not None:
        return sys.executable, None
    return None, (f"no CUDA build of torch to build _C_cuda with: this torch ({torch.__version__}) is a CPU build "
                  "and TOME_CUDA_PYTHON is not set (the README's .venv/ has a CUDA build: bash scripts/test.sh)")


def _env():
    # The loader's switches would change what is checked (TOME_KERNELS_NO_JIT would refuse the
    # build); its cache stays where the user put it.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TOME_KERNELS_NO_JIT", "TOME_KERNELS_CSRC", "PYTHONPATH", "TORCH_CUDA_ARCH_LIST")}
    env.update(PYTHONPATH=str(ROOT), TOME_KERNELS_CSRC=str(Path(ROOT) / "csrc"), TORCH_CUDA_ARCH_LIST=ARCHS)
    return env


def test_cuda_extension_links_loads_and_registers_every_operator(tmp_path):
    python, why = _cuda_python()
    if python is None:
        pytest.skip(why)
    if shutil.which("nvcc") is None and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        pytest.skip("no CUDA toolkit: nvcc is not on PATH and CUDA_HOME is not set")
    start = time.perf_counter()
    # cwd is not the checkout: only PYTHONPATH decides which tome_kernels is imported.
    proc = subprocess.run([python, "-c", CHECK], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cuda"] is not None, report
    assert report["from"]["cuda"] and report["from"]["cpu"], report["from"]
    assert report["declared"] == report["table"]
    for key in ("CPU", "CUDA"):
        missing = sorted(set(report["table"]) - set(report["kernels"][key]))
        assert not missing, f"tome_native operators without a {key} kernel: {missing}"
    print(f"_C_cuda with torch {report['torch']} (CUDA {report['cuda']}, GPU: {report['gpu']}, "
          f"CUDA_HOME {report['cuda_home']}): import {report['import_s']:.1f} s, build or cache hit and load "
          f"{report['load_s']:.1f} s, {seconds:.1f} s in all")
