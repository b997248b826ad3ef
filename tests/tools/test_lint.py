"""The tree is clean under the ruff configuration of pyproject.toml (pyflakes, import order,
pycodestyle, 120 columns). ruff is one of the test tools (requirements/dev.txt); where it
is not installed (a GPU machine's image), this is reported as skipped."""

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (requirements/dev.txt)")
def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", ROOT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
