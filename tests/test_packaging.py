"""The package builds as pyproject.toml says: without build isolation, without fetching torch."""

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_builds_without_isolation(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps", "--no-index",
         "--wheel-dir", str(tmp_path), ROOT],
        check=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("tome_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ["__init__", "api", "backends", "checks", "plan", "reference", "triton_backend"]:
        assert f"tome_kernels/{module}.py" in names
    for module in ["__init__", "match", "layout", "merge", "fused", "launch", "ops", "compile_check"]:
        assert f"tome_kernels/triton_kernels/{module}.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
