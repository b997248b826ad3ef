"""The pytest-benchmark suite over the named shapes and every provider that can run here.

    pytest benchmarks/test_merge_benchmarks.py --benchmark-only          # time them
    pytest benchmarks/test_merge_benchmarks.py --benchmark-disable       # run each once

Each case first checks its provider against the reference on the same inputs, so a run
with timing disabled is still a test. ``python -m benchmarks.run`` gives the fuller table
(bandwidth, memory, speed-ups) and saves raw timings.
"""

import pytest
import torch

from .measure import rel_err
from .providers import applies, make_inputs, make_step, method_agreement, provider_names, unavailable_reason
from .shapes import default_shapes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
# ||out - ref|| / ||ref||: float32 reorderings stay far below 1e-5; half precision below 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# kth, random and grid plans rank scores computed the same way in every backend: at most a
# rare near-tie may part. (PiToMe's energies tie too often to ask this; its energies are
# compared instead.)
MIN_PLAN_AGREEMENT = 0.99

# Every (shape, provider, pass) that applies: the methods other than ToMe run on the
# backends by name, forward only.
CASES = [
    pytest.param(shape, provider, pass_name, id=f"{shape.name}-{provider}-{pass_name}")
    for shape in default_shapes(DEVICE)
    for provider in provider_names()
    if applies(provider, shape)
    for pass_name in shape.passes
]


@pytest.mark.parametrize("shape,provider,pass_name", CASES)
def test_merge_step(benchmark, shape, provider, pass_name):
    inputs = make_inputs(shape, DEVICE, DTYPE)
    reason = unavailable_reason(provider, inputs)
    if reason:
        pytest.skip(f"{provider} cannot run here: {reason}")
    backward = pass_name == "fwd+bwd"
    step = make_step(provider, shape, inputs, backward)
    if shape.method == "tome":
        expected = make_step("reference", shape, inputs, backward)()
        assert rel_err(step(), expected) <= TOLERANCE[DTYPE]
    elif provider == "reference":
        # The yardstick itself: its plan and merge are the same at every call.
        for got, want in zip(step(), step()):
            assert torch.equal(got, want)
    else:
        agreement = method_agreement(provider, shape, inputs)
        assert agreement["rel_err_same_plan"] <= TOLERANCE[DTYPE]
        if shape.method == "pitome":
            assert agreement["energy_rel_err"] <= TOLERANCE[DTYPE]
        else:
            assert agreement["plan_agreement"] >= MIN_PLAN_AGREEMENT

    def synchronized():
        out = step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(batch=shape.batch, min_bytes=shape.min_bytes(DTYPE, backward), dtype=str(DTYPE))
    benchmark.pedantic(synchronized, warmup_rounds=2, rounds=10 if DEVICE.type == "cpu" else 100)
