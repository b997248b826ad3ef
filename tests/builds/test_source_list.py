"""``csrc/sources.txt`` is the one list every build reads (setup.py, the JIT loader, CMake,
the nvcc compile check): it must name exactly the sources in ``csrc/``, each in the group
its folder says. A source missing from the list links and then fails to load, which no CPU
test would notice (a CUDA kernel's undefined symbol)."""

from pathlib import Path

import pytest

from tests.helpers import ROOT
from tome_kernels.backends.native import extension_build

CSRC = Path(ROOT) / "csrc"
SOURCE_SUFFIXES = (".cpp", ".cu")


def group_of(path: str) -> str:
    """The group a source belongs to, by where it lives: the operator schemas and cpu/ make
    the CPU extension, cuda/ the CUDA one, module.cpp the Python module of both."""
    if path == "module.cpp":
        return "module"
    if path == "ops.cpp" or path.startswith("cpu/"):
        return "cpu"
    if path.startswith("cuda/"):
        return "cuda"
    raise AssertionError(f"csrc/{path}: no group is known for this place; extend group_of and sources.txt together")


def test_the_list_names_every_source_once_in_its_group():
    listed = extension_build.read_sources(CSRC)
    every = [path for paths in listed.values() for path in paths]
    assert len(every) == len(set(every)), f"listed twice: {sorted(p for p in every if every.count(p) > 1)}"
    on_disk = sorted(p.relative_to(CSRC).as_posix() for p in CSRC.rglob("*") if p.suffix in SOURCE_SUFFIXES)
    expected = {group: sorted(p for p in on_disk if group_of(p) == group) for group in extension_build.GROUPS}
    assert {group: sorted(paths) for group, paths in listed.items()} == expected


def test_a_bad_line_is_refused(tmp_path):
    (tmp_path / "sources.txt").write_text("cpu ops.cpp\ngpu cuda/x.cu\n")
    with pytest.raises(ValueError, match="sources.txt:2"):
        extension_build.read_sources(tmp_path)
