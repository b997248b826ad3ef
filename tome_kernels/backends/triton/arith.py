"""Arithmetic helpers shared by the kernels: IEEE division with broadcasting.

Compiled Triton lowers ``x / y`` on float32 to ``div.full.f32`` (approximate, up to 2 ulp)
and ``tl.sqrt`` to ``sqrt.approx.ftz.f32``. The kernels use the round-to-nearest forms
instead (docs/semantics.md, "Arithmetic"); ``tl.div_rn`` takes operands of one shape only,
hence this wrapper.
"""

import triton
import triton.language as tl


@triton.jit
def div_rn(x, y):
    """x / y in float32, rounded to nearest, after broadcasting x and y to a common shape."""
    x, y = tl.broadcast(x.to(tl.float32), y.to(tl.float32))
    return tl.div_rn(x, y)
