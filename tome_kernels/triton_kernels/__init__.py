"""Triton kernels of the "triton" backend; importing this package imports triton (see
``tome_kernels.triton_backend``, which does so lazily)."""
