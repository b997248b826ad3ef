import os
import sys

# Triton's interpreter must be chosen before any @triton.jit function is defined, so that
# the Triton backend can run on CPU tensors in CI; a GPU run sets TOME_TEST_DEVICE=cuda.
if os.environ.get("TOME_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from tests.helpers import NO_DEVICE  # noqa: E402
from tome_kernels.backends import registry  # noqa: E402

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _isolated_backend_state(monkeypatch):
    """Each test sees the real registry, no env override and a fresh warn-once memory, and
    leaves pip unimported."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_warned", set())
    torch.manual_seed(0)
    yield
    # On Python < 3.12, `import pip` switches setuptools' distutils shim off for the rest of the
    # process: every later `import setuptools` in this worker (torch's cpp_extension, inductor's
    # C++ builds) fails, in whichever test comes next. Name the test that did it instead (once:
    # pip is dropped from sys.modules, though the shim stays off).
    if "pip" in sys.modules:
        for name in [name for name in sys.modules if name == "pip" or name.startswith("pip.")]:
            del sys.modules[name]
        pytest.fail("this test imported pip in the pytest process; run pip in a subprocess", pytrace=False)


@pytest.fixture
def device():
    """Where the tensors of a test live: the CPU in CI, the GPU when TOME_TEST_DEVICE=cuda.
    A GPU run on a machine without a GPU skips the tests on the device, saying why."""
    if NO_DEVICE:
        pytest.skip(NO_DEVICE)
    return torch.device(os.environ.get("TOME_TEST_DEVICE", "cpu"))
