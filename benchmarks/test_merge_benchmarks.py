"""The pytest-benchmark suite over the named shapes and every provider that can run here.

    pytest benchmarks/test_merge_benchmarks.py --benchmark-only          # time them
    pytest benchmarks/test_merge_benchmarks.py --benchmark-disable       # run each once

Each case first checks its provider against the reference on the same inputs, so a run
with timing disabled is still a test. ``python -m benchmarks.run`` gives the fuller table
(bandwidth, memory, speed-ups) and saves raw timings.
"""

import pytest
import torch

from .providers import make_inputs, make_step, provider_names, unavailable_reason
from .measure import rel_err
from .shapes import default_shapes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
# ||out - ref|| / ||ref||: float32 reorderings stay far below 1e-5; half precision below 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("pass_name", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", provider_names())
@pytest.mark.parametrize("shape", default_shapes(DEVICE), ids=lambda s: s.name)
def test_merge_step(benchmark, shape, provider, pass_name):
    inputs = make_inputs(shape, DEVICE, DTYPE)
    reason = unavailable_reason(provider, inputs)
    if reason:
        pytest.skip(f"{provider} cannot run here: {reason}")
    backward = pass_name == "fwd+bwd"
    step = make_step(provider, shape, inputs, backward)
    expected = make_step("reference", shape, inputs, backward)()
    assert rel_err(step(), expected) <= TOLERANCE[DTYPE]

    def synchronized():
        out = step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(batch=shape.batch, min_bytes=shape.min_bytes(DTYPE, backward), dtype=str(DTYPE))
    benchmark.pedantic(synchronized, warmup_rounds=2, rounds=10 if DEVICE.type == "cpu" else 100)
