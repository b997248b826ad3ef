"""The CUDA toolkit the loader hands to torch (``extension_build.cuda_home_of_nvcc`` and
``use_real_cuda_home``), with fake ``nvcc`` scripts in a temporary folder: nothing is built.

torch's own guess is the parent of the folder of ``which nvcc``, which is wrong for a wrapper
script such as this machine's ``/usr/local/bin/nvcc`` (``exec /usr/local/cuda-13.0/bin/nvcc
"$@"``): it gives ``/usr/local``. These tests need a POSIX shell, not nvcc.
"""

import os
import stat
import sys

import pytest
import torch

from tome_kernels.backends.native import extension_build

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fake nvcc scripts are POSIX shell scripts")


def _script(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _toolkit(root, headers=True):
    """A fake toolkit: bin/nvcc prints what the real one prints for --dryrun (to stderr, as
    nvcc does), and include/cuda_runtime.h exists unless ``headers`` is False."""
    nvcc = _script(root / "bin" / "nvcc", f'echo "#$ _HERE_={root}/bin" >&2\necho "#$ TOP={root}/bin/.." >&2\n')
    if headers:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    return nvcc


def _on_path(monkeypatch, folder):
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")


def test_a_wrapper_script_leads_to_the_toolkit_it_runs(tmp_path, monkeypatch):
    real = _toolkit(tmp_path / "cuda-13.0")
    _script(tmp_path / "local" / "bin" / "nvcc", f'exec {real} "$@"\n')
    _on_path(monkeypatch, tmp_path / "local" / "bin")
    assert extension_build.cuda_home_of_nvcc() == str((tmp_path / "cuda-13.0").resolve())


def test_a_symlinked_nvcc_resolves_without_asking_it(tmp_path):
    # An nvcc that prints nothing for --dryrun: the link's target still names the toolkit.
    real = _script(tmp_path / "cuda" / "bin" / "nvcc", "exit 1\n")
    (tmp_path / "cuda" / "include").mkdir()
    (tmp_path / "cuda" / "include" / "cuda_runtime.h").write_text("")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "nvcc").symlink_to(real)
    assert extension_build.cuda_home_of_nvcc(str(tmp_path / "links" / "nvcc")) == str((tmp_path / "cuda").resolve())


def test_no_toolkit_without_its_headers(tmp_path):
    real = _toolkit(tmp_path / "cuda-13.0", headers=False)
    _script(tmp_path / "local" / "bin" / "nvcc", f'exec {real} "$@"\n')
    assert extension_build.cuda_home_of_nvcc(str(tmp_path / "local" / "bin" / "nvcc")) is None


def test_no_nvcc_no_toolkit(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert extension_build.cuda_home_of_nvcc() is None


@pytest.fixture
def wrapped_toolkit(tmp_path, monkeypatch):
    """A wrapper nvcc on PATH, no CUDA_HOME / CUDA_PATH, a torch that says it is a CUDA build,
    and torch's cpp_extension holding its wrong guess; all restored afterwards."""
    from torch.utils import cpp_extension

    real = _toolkit(tmp_path / "cuda-13.0")
    _script(tmp_path / "local" / "bin" / "nvcc", f'exec {real} "$@"\n')
    _on_path(monkeypatch, tmp_path / "local" / "bin")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "local"))
    return cpp_extension, str((tmp_path / "cuda-13.0").resolve())


def test_torch_is_pointed_at_the_real_toolkit(wrapped_toolkit):
    cpp_extension, home = wrapped_toolkit
    assert extension_build.use_real_cuda_home() == home
    # Both: the environment for a cpp_extension imported later, the module for this one.
    assert os.environ["CUDA_HOME"] == home and cpp_extension.CUDA_HOME == home


def test_the_users_cuda_home_wins(wrapped_toolkit, monkeypatch):
    cpp_extension, _ = wrapped_toolkit
    guess = cpp_extension.CUDA_HOME
    monkeypatch.setenv("CUDA_HOME", "/opt/my-cuda")
    assert extension_build.use_real_cuda_home() == "/opt/my-cuda"
    assert cpp_extension.CUDA_HOME == guess


def test_a_cpu_torch_is_left_alone(wrapped_toolkit, monkeypatch):
    cpp_extension, _ = wrapped_toolkit
    guess = cpp_extension.CUDA_HOME
    monkeypatch.setattr(torch.version, "cuda", None)
    assert extension_build.use_real_cuda_home() is None
    assert "CUDA_HOME" not in os.environ and cpp_extension.CUDA_HOME == guess
