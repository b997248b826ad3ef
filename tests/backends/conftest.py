"""The backend a test of this folder runs on, ready to be compared with the reference.

``backend`` is each fast backend, ``any_backend`` the reference too; a module picks other
cases with ``BACKEND_CASES`` / ``ANY_BACKEND_CASES``. A case is a backend name, or
"triton_one_pass" / "triton_multi_kernel": the Triton backend with that path forced for
every call of the test. Every buffer a kernel allocates starts as NaN (integers: -7 in
Triton's launchers, their maximum in the C++ kernels), so an output element a kernel forgets
to write fails the comparison instead of passing by luck. A native backend that cannot load
fails the test: a build error is a defect, not a skip.
"""


import pytest
import torch

from tests.helpers import ON_GPU, poison_triton_buffers
from tome_kernels.backends import cannot_run_reasons

# The native extension of the device the tests run on.
NATIVE = "cuda" if ON_GPU else "cpu"
# Each fast backend once, the Triton backend once per path.
FAST_CASES = ["triton_one_pass", "triton_multi_kernel", NATIVE]


def pytest_generate_tests(metafunc):
    # A test that parametrizes the name itself (the GPU checks: plain backend names) keeps its own.
    own = {name.strip() for mark in metafunc.definition.iter_markers("parametrize")
           for name in (mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0])}
    for fixture, default in (("backend", FAST_CASES), ("any_backend", ["reference", *FAST_CASES])):
        if fixture in metafunc.fixturenames and fixture not in own:
            cases = getattr(metafunc.module, f"{fixture.upper()}_CASES", default)
            metafunc.parametrize(fixture, cases, indirect=True)


def _prepare(case, request, monkeypatch, device):
    """The backend name to ask for, with its buffers poisoned (and a Triton path forced)."""
    if case.startswith("triton"):
        if case != "triton":
            from tome_kernels.backends.triton import launch

            monkeypatch.setattr(launch, "ONE_PASS_MAX_TOKENS", 10**9 if case == "triton_one_pass" else 0)
        poison_triton_buffers(monkeypatch)
        return "triton"
    if case == "reference":
        return case
    reasons = cannot_run_reasons(case, [torch.zeros(1, device=device)])
    assert not reasons, reasons
    # In this mode PyTorch fills every new tensor with NaN (integers: their maximum), the ones
    # the C++ kernels allocate included.
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)

    def restore():
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    request.addfinalizer(restore)
    return case


@pytest.fixture
def backend(request, monkeypatch, device):
    """A fast backend, to compare with the reference."""
    return _prepare(request.param, request, monkeypatch, device)


@pytest.fixture
def any_backend(request, monkeypatch, device):
    """Every backend, the reference too, for properties that hold in each."""
    return _prepare(request.param, request, monkeypatch, device)


@pytest.fixture
def cpu_extension():
    """The "cpu" extension, which must load: a build failure fails the test, not skips it."""
    reasons = cannot_run_reasons("cpu", [torch.zeros(1)])
    assert not reasons, reasons
