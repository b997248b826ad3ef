"""The "cpu" and "cuda" backends: C++ and CUDA kernels (``csrc/``) built into two extensions.

- ``extension_build.py``: loading an extension, an installed build or else a JIT build;
- ``ops.py``: the fake kernels (``op_table``) and autograd of ``torch.ops.tome_native.*``;
- ``backend.py``: the backends themselves, dispatching to those operators.

Nothing here compiles or loads an extension at import time.
"""
