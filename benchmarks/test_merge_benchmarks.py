"""The pytest-benchmark suite over the named shapes and every provider that can run here.

    pytest benchmarks/test_merge_benchmarks.py --benchmark-only          # time them
    pytest benchmarks/test_merge_benchmarks.py --benchmark-disable       # run each once

Each case first checks its provider against the reference on the same inputs, so a run
with timing disabled is still a test. ``python -m benchmarks.run`` gives the fuller table
(bandwidth, memory, speed-ups) and saves raw timings.
"""

import math

import pytest
import torch

import tome_kernels
from tests.helpers import assert_within_twice_reference_error, energy_float64
from tome_kernels.backends import select_backend
from tome_kernels.backends.base import Backend
from tome_kernels.plan import MergePlan

from .providers import (
    applies,
    apply_plan,
    make_inputs,
    make_step,
    method_agreement,
    method_plan,
    provider_names,
    unavailable_reason,
)
from .shapes import default_shapes

# Full-size rows of the benchmarks, one provider at a time: the fast loop leaves them out.
pytestmark = pytest.mark.slow

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
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
    # Values: within twice the reference's error against the reference in float64 on the
    # same plan (float64 tokens, sizes and gradients; the metric, which decides, unchanged).
    inputs64 = {name: t if name == "metric" else t.double() for name, t in inputs.items()}
    if shape.method == "tome":
        expected = make_step("reference", shape, inputs, backward)()
        exact = make_step("reference", shape, inputs64, backward)()
        # The size gradient (the backward's last output) sums over the C channels, each path
        # in its own order: that rounding grows as sqrt(C), and so does its floor.
        ulps = [4, 4, 4, 4 * math.sqrt(shape.channels)]
        for part, (got, want, truth) in enumerate(zip(step(), expected, exact)):
            assert_within_twice_reference_error(got, want, truth, ulps=ulps[part], msg=f"{provider} output {part}")
    elif provider == "reference":
        # The yardstick itself: its plan and merge are the same at every call.
        for got, want in zip(step(), step()):
            assert torch.equal(got, want)
    else:
        # The provider's own plan (near-ties may part it from the reference's), merged by the
        # provider and by the reference.
        plan = method_plan(provider, shape, inputs["metric"])
        by_reference = MergePlan(plan.match_result, Backend())
        assert_within_twice_reference_error(apply_plan(plan, shape, inputs["x"], inputs["size"]),
                                            apply_plan(by_reference, shape, inputs["x"], inputs["size"]),
                                            apply_plan(by_reference, shape, inputs64["x"], inputs64["size"]))
        if shape.method == "pitome":
            metric, margin = inputs["metric"], tome_kernels.methods.PITOME_MARGIN
            assert_within_twice_reference_error(select_backend(provider, (metric,)).energy(metric, margin, 1.0, "elu"),
                                                Backend().energy(metric, margin, 1.0, "elu"),
                                                energy_float64(metric, margin, 1.0, "elu"), msg="energy")
        else:
            assert method_agreement(provider, shape, inputs)["plan_agreement"] >= MIN_PLAN_AGREEMENT

    def synchronized():
        out = step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(batch=shape.batch, min_bytes=shape.min_bytes(DTYPE, backward), dtype=str(DTYPE))
    benchmark.pedantic(synchronized, warmup_rounds=2, rounds=10 if DEVICE.type == "cpu" else 100)
