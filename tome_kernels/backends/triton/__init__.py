"""The "triton" backend and its kernels, layer by layer:

- kernels (``@triton.jit``), one phase per file: ``match.py`` (scores, each A token's best
  B token, the ranking), ``layout.py`` (the output layout and groups), ``merge.py`` (the
  merges, their backwards, unmerge), ``fused.py`` (match, layout and merge of a short row
  in one program), ``similarity.py`` (each source's best destination; PiToMe's energy);
- ``launch.py``: the launchers (allocation, grids, block sizes; no autograd);
- ``ops.py``: the launchers as ``torch.ops.tome_kernels.triton_*`` operators, with the fake
  kernels of ``backends/op_table.py`` and the autograd of ``backends/merge_autograd.py``;
- ``backend.py``: the "triton" backend, which the public functions dispatch to;
- ``compile_check.py``: compiles every kernel for sm_90 without a GPU.

Importing this package imports nothing heavy; the kernel modules import triton, and the
backend imports them lazily, on first use."""
