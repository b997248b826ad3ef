"""Backend choice: auto, by name, by environment variable, and the fallback warning."""

import warnings

import pytest
import torch

import tome_kernels
from tests.helpers import runs_cpu_tensors
from tome_kernels import BackendFallbackWarning, available_backends, bipartite_match, bipartite_merge, reference
from tome_kernels.backends import ENV_VAR, register_backend, registry
from tome_kernels.backends.base import Backend
from tome_kernels.backends.native import extension_build
from tome_kernels.backends.native.backend import NativeBackend
from tome_kernels.backends.triton.backend import TritonBackend

# The registry as the package left it (the fixture below empties it for each test).
REGISTERED_AT_IMPORT = list(registry._REGISTRY)


@pytest.fixture(autouse=True)
def _stand_ins_only(_isolated_backend_state):
    """The stand-in backends below are tested ahead of the reference alone: the real fast
    backends ("cpu", and "triton", which the interpreter lets run CPU tensors here) would
    take their inputs."""
    for name in [n for n in registry._REGISTRY if n != "reference"]:
        registry._REGISTRY.pop(name)


class BrokenBackend(Backend):
    """Stands in for a fast backend whose package or build is missing here."""

    name = "broken"

    def load_error(self):
        return "fastlib is not installed"

    def expected_for(self, device):
        return True


class PickyBackend(Backend):
    """Loads, but only runs float64 inputs; records every call so tests can see it ran."""

    name = "picky"

    def __init__(self):
        self.calls = 0

    def unsupported_reasons(self, tensors):
        return [f"{t.dtype} is not supported" for t in tensors if t.dtype != torch.float64][:1]

    def bipartite_merge(self, *args):
        self.calls += 1
        return super().bipartite_merge(*args)


def inputs(dtype=torch.float32):
    return torch.randn(2, 9, 4, dtype=dtype), torch.randn(2, 9, 3, dtype=dtype)


def test_available_backends_reports_every_backend():
    register_backend(BrokenBackend())
    status = available_backends()
    assert list(status) == ["broken", "reference"]
    assert status["reference"].available and status["reference"].reason is None
    assert not status["broken"].available and status["broken"].reason == "fastlib is not installed"


def test_auto_falls_back_with_one_warning():
    register_backend(BrokenBackend())
    x, metric = inputs()
    with pytest.warns(BackendFallbackWarning, match=r"'broken' backend could not load \(fastlib is not installed\)"):
        out = bipartite_merge(x, metric, 3)
    torch.testing.assert_close(out, reference.bipartite_merge(x, metric, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bipartite_merge(x, metric, 3)


def test_named_backend_that_cannot_load_raises_its_reason():
    register_backend(BrokenBackend())
    x, metric = inputs()
    with pytest.raises(ValueError, match=r"backend='broken' cannot run these inputs: fastlib is not installed"):
        bipartite_merge(x, metric, 3, backend="broken")


def test_auto_skips_backend_that_cannot_run_these_inputs():
    picky = PickyBackend()
    register_backend(picky)
    bipartite_merge(*inputs(torch.float32), 3)
    assert picky.calls == 0
    bipartite_merge(*inputs(torch.float64), 3)
    assert picky.calls == 1
    with pytest.raises(ValueError, match=r"backend='picky' cannot run these inputs: torch.float32 is not supported"):
        bipartite_merge(*inputs(torch.float32), 3, backend="picky")


def test_environment_variable_overrides_auto(monkeypatch):
    picky = PickyBackend()
    register_backend(picky)
    monkeypatch.setenv(ENV_VAR, "reference")
    bipartite_merge(*inputs(torch.float64), 3)
    assert picky.calls == 0
    # An explicit name still wins over the environment.
    bipartite_merge(*inputs(torch.float64), 3, backend="picky")
    assert picky.calls == 1


def test_environment_variable_errors_name_it(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match=rf"the environment variable {ENV_VAR}='nope' is not a backend"):
        bipartite_merge(*inputs(), 3)
    register_backend(BrokenBackend())
    monkeypatch.setenv(ENV_VAR, "broken")
    with pytest.raises(ValueError, match=rf"{ENV_VAR}='broken' cannot run these inputs: fastlib"):
        bipartite_match(inputs()[1], 3)


def test_plan_reports_its_backend():
    plan = bipartite_match(inputs()[1], 3, backend="reference")
    assert plan.backend == "reference"
    assert "backend='reference'" in repr(plan)


@pytest.mark.parametrize("backend, error, match", [
    (None, TypeError, "backend must be a tome_kernels.backends.Backend"),
    (Backend(), ValueError, "got 'reference'"),
    (type("Auto", (Backend,), {"name": "auto"})(), ValueError, "got 'auto'"),
    (type("Unnamed", (Backend,), {"name": ""})(), ValueError, "got ''"),
])
def test_register_backend_refuses_what_would_break_the_registry(backend, error, match):
    before = dict(registry._REGISTRY)
    with pytest.raises(error, match=match):
        register_backend(backend)
    assert registry._REGISTRY == before


def test_registered_order_for_auto():
    """CPU tensors go to the "cpu" extension, CUDA tensors to "triton", then "cuda"."""
    assert REGISTERED_AT_IMPORT == ["cpu", "triton", "cuda", "reference"]


@runs_cpu_tensors("triton")
def test_triton_takes_cpu_tensors_only_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {"triton": TritonBackend(), **registry._REGISTRY})
    assert list(available_backends()) == ["triton", "reference"]
    # Under the interpreter (tests/conftest.py) it takes float32 CPU inputs; float64 it
    # leaves to the reference, and asked for by name it says why not.
    assert bipartite_match(inputs()[1], 3).backend == "triton"
    assert bipartite_match(inputs(torch.float64)[1], 3).backend == "reference"
    message = r"backend='triton' cannot run these inputs: it computes float16, bfloat16 and float32, not float64"
    with pytest.raises(ValueError, match=message):
        bipartite_match(inputs(torch.float64)[1], 3, backend="triton")


def test_triton_without_interpreter_refuses_cpu_tensors_without_loading(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fresh = TritonBackend()
    assert fresh.unsupported_reasons([torch.zeros(1)]) == [
        "it runs CUDA tensors; CPU tensors only in Triton's interpreter "
        "(TRITON_INTERPRET=1 set before the first use of tome_kernels)"
    ]
    assert fresh._ops is None and fresh._error is None
    assert fresh.expected_for(torch.device("cuda")) and not fresh.expected_for(torch.device("cpu"))


def test_package_exports():
    for name in ["bipartite_merge", "bipartite_match", "MergePlan", "available_backends"]:
        assert hasattr(tome_kernels, name)


def test_native_backends_say_why_they_cannot_run_without_building():
    cpu, cuda = NativeBackend("cpu"), NativeBackend("cuda")
    assert cpu.unsupported_reasons([torch.zeros(1, device="meta")]) == ["it runs CPU tensors, not meta tensors"]
    assert cuda.unsupported_reasons([torch.zeros(1)]) == ["it runs CUDA tensors, not cpu tensors"]
    assert cuda.unsupported_reasons([torch.zeros(1, dtype=torch.float64, device="meta")]) == [
        "it runs CUDA tensors, not meta tensors"
    ]
    assert not cpu._loaded and cpu._error is None and not cuda._loaded and cuda._error is None
    assert cpu.expected_for(torch.device("cpu")) and cuda.expected_for(torch.device("cuda"))
    assert not cpu.expected_for(torch.device("cuda"))
    with pytest.raises(ValueError, match="device_type must be 'cpu' or 'cuda'"):
        NativeBackend("mps")


def test_cuda_backend_builds_nothing_without_a_device(monkeypatch):
    """A CUDA build of torch on a machine without a GPU (PyPI's default torch on Linux): the
    cuda extension would compile for minutes and load, and nothing could run it."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_build(kind):
        raise AssertionError(f"tried to load or build the {kind} extension")

    monkeypatch.setattr(extension_build, "load", no_build)
    reason = NativeBackend("cuda").load_error()
    assert reason is not None and "no CUDA device is available" in reason


def test_cuda_backend_reports_a_torch_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch, whatever this one is
    monkeypatch.setattr(extension_build, "_failed", {})
    # As if the cuda extension had not been loaded in this process.
    monkeypatch.setattr(extension_build, "_loaded", {k: v for k, v in extension_build._loaded.items() if k != "cuda"})
    reason = NativeBackend("cuda").load_error()
    assert reason is not None and "CUDA" in reason
