"""``python -m tome_kernels``: the environment report a bug report asks for, run as a user
would, in a subprocess from a folder outside the repository."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import tome_kernels

REPOSITORY = Path(__file__).resolve().parents[2]


def report(tmp_path, *args, **env):
    """The report's text, run from ``tmp_path`` with the JIT cache in an empty folder there."""
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY), TOME_KERNELS_CACHE=str(tmp_path / "cache"), **env)
    done = subprocess.run([sys.executable, "-m", "tome_kernels", *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_report_names_versions_backends_and_the_cache_without_building(tmp_path):
    """Versions, every backend with its state, and the cache folder; nothing is built: the
    empty cache stays empty and the cpu backend says its first use will compile it (the
    sources named, so that an installed build does not answer instead)."""
    text = report(tmp_path, TOME_KERNELS_CSRC=str(REPOSITORY / "csrc"))
    assert f"tome_kernels {tome_kernels.__version__}" in text
    assert f"torch {torch.__version__}" in text
    for name in tome_kernels.available_backends():
        assert f"  {name} " in text
    assert f"extension build cache: {tmp_path / 'cache'}" in text
    assert "cpu        not built yet: its first use compiles" in text
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    # The switches in force are shown: they change which backend runs.
    assert f"environment: TOME_KERNELS_CSRC={REPOSITORY / 'csrc'}" in text
    if torch.version.cuda is not None and not torch.cuda.is_available():
        assert "cuda       unavailable: no CUDA device" in text


def test_report_is_quiet_on_stderr(tmp_path):
    """Nothing but the report: no log line from torch (cpp_extension logs one when imported
    with a CUDA torch on a machine without a GPU)."""
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY), TOME_KERNELS_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "tome_kernels"], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_load_reports_why_a_backend_cannot_run(tmp_path):
    """--load loads every backend as a first use would and gives each one's reason; with JIT
    builds disabled and no installed build, the cpu backend's reason says so."""
    text = report(tmp_path, "--load", TOME_KERNELS_NO_JIT="1", TOME_KERNELS_CSRC=str(REPOSITORY / "csrc"))
    assert "cpu        unavailable: no ahead-of-time build of the cpu extension is usable" in text
    assert "reference  available" in text
