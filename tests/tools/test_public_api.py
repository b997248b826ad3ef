"""What users import from tome_kernels: every name the package exported before its modules
moved into reference/, backends/ and patch/ (issue "a layout that shows the architecture")
is still there, and importing it does no backend work."""

import subprocess
import sys

import pytest

import tome_kernels

# tome_kernels/__init__.py as of 9454da3, just before the move.
NAMES = [
    "patch", "bipartite_match", "bipartite_merge", "grid_match", "kth_bipartite_match", "pitome_match",
    "pitome_merge", "random_bipartite_match", "window_match", "ENV_VAR", "BackendFallbackWarning", "BackendStatus",
    "available_backends", "register_backend", "MergePlan", "MERGE_MODES", "NativeBackend", "TritonBackend",
    "__version__",
]
# Submodules that were, and still are, modules of those names.
MODULES = ["api", "backends", "checks", "flops", "methods", "patch", "plan", "reference", "visualize"]


def test_every_name_is_still_exported():
    missing = [name for name in NAMES + tome_kernels.__all__ if not hasattr(tome_kernels, name)]
    assert not missing


def test_moved_modules_are_still_attributes_with_a_warning():
    """The modules that moved into reference/ and backends/, by their old attribute names."""
    import importlib

    for old, new in tome_kernels._MOVED.items():
        tome_kernels.__dict__.pop(old, None)  # forget an earlier access: it warns once
        with pytest.warns(DeprecationWarning, match=f"tome_kernels.{old} is now tome_kernels.{new}"):
            module = getattr(tome_kernels, old)
        assert module is importlib.import_module(f"tome_kernels.{new}")
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        tome_kernels.no_such_module


def test_the_contract_and_the_registry_keep_their_module_names():
    import importlib

    for name in MODULES:
        importlib.import_module(f"tome_kernels.{name}")
    from tome_kernels import backends, reference

    # The contract's functions and the registry's, where they were.
    for name in ("match", "merge_wavg", "merge", "unmerge", "bipartite_merge", "clamp_r", "MatchResult",
                 "MERGE_MODES", "normalized_metric", "size_dtype"):
        assert hasattr(reference, name), name
    for name in ("Backend", "available_backends", "register_backend", "select_backend", "cannot_run_reasons",
                 "ENV_VAR", "BackendStatus", "BackendFallbackWarning", "check_backend_name"):
        assert hasattr(backends, name), name


def test_import_loads_no_backend():
    """Importing the package builds no extension and imports neither triton nor a kernel."""
    code = ("import sys, tome_kernels\n"
            "heavy = ('tome_kernels._C', 'tome_kernels.backends.triton.launch',\n"
            "         'tome_kernels.backends.native.extension_build')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton' or m.startswith(heavy)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
