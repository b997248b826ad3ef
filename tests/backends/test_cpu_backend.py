"""What only the "cpu" extension does: float64 (with gradcheck and gradgradcheck), bfloat16, both of its
parallel schedules (whole batch rows per thread, or one row split over threads), results
that do not depend on the thread count, and the checks of its operators' arguments.

The shared tests of every fast backend against the reference are in test_fast_backends.py.
"""

import pytest
import torch

import tome_kernels
from tests.helpers import assert_within_twice_reference_error
from tome_kernels import bipartite_match, bipartite_merge, reference

# The "cpu" extension must load (conftest.py): a build failure fails these tests.
pytestmark = pytest.mark.usefixtures("cpu_extension")


def make(batch, n, dtype, heads=3, d=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, c, generator=g).to(dtype)
    keys = torch.randn(batch, heads, n, d, generator=g).to(dtype)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).to(dtype)
    return x, keys, size


@pytest.mark.parametrize("class_token,distill_token", [(False, False), (True, False), (True, True)])
def test_float64_gradcheck(class_token, distill_token):
    x, keys, size = make(2, 11, torch.float64)
    flags = dict(class_token=class_token, distill_token=distill_token)
    plan = bipartite_match(keys, 4, **flags, backend="cpu")
    # Same decisions as the reference, which scores float64 metrics in float64.
    expected = reference.match(keys, 4, **flags)
    for name in ("src_idx", "dst_idx", "unm_idx", "token_map"):
        assert torch.equal(getattr(plan.match_result, name), getattr(expected, name)), name
    xs, ss = x.requires_grad_(), size.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, s: bipartite_merge(x, keys, 4, s, **flags, backend="cpu"), (xs, ss))
    assert torch.autograd.gradcheck(lambda x, s: plan.merge_wavg(x, s), (xs, ss))
    # sum and mean everywhere; amax / amin away from ties (random data has none).
    assert torch.autograd.gradgradcheck(lambda x, s: plan.merge_wavg(x, s), (xs, ss))
    for mode in tome_kernels.MERGE_MODES:
        assert torch.autograd.gradcheck(lambda x: plan.merge(x, mode), (xs,)), mode
        assert torch.autograd.gradgradcheck(lambda x: plan.merge(x, mode), (xs,)), mode
    y = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(plan.unmerge, (y,))
    assert torch.autograd.gradgradcheck(plan.unmerge, (y,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_within_twice_the_reference_error(dtype):
    x, keys, size = make(3, 33, dtype, c=64)
    got = bipartite_merge(x, keys, 12, size.float(), class_token=True, backend="cpu")
    plan = reference.match(keys, 12, class_token=True)
    ref, _ = reference.merge_wavg(plan, x, size.float())
    exact, exact_size = reference.merge_wavg(plan, x.double(), size.double())
    assert_within_twice_reference_error(got[0], ref, exact, ulps=1)
    assert torch.equal(got[1].double(), exact_size)
    assert bipartite_match(keys, 12, class_token=True, backend="cpu").token_map.equal(plan.token_map)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_same_bits_for_any_thread_count(batch):
    """B < threads splits each row's phases over threads, B >= threads gives each thread
    whole rows; either way every output row is computed in the same order."""
    x, keys, size = make(batch, 197, torch.float32, heads=4, d=16, c=96)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            x_out, size_out = bipartite_merge(x, keys, 40, size, class_token=True, backend="cpu")
            plan = bipartite_match(keys, 40, class_token=True, backend="cpu")
            results.append((x_out, size_out, plan.merge(x, "mean"), plan.unmerge(x_out), plan.match_result.token_map))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    plan = reference.match(keys, 40, class_token=True)
    assert_within_twice_reference_error(results[0][:2], reference.merge_wavg(plan, x, size),
                                        reference.merge_wavg(plan, x.double(), size.double()))


def test_large_rows_span_several_score_tiles():
    """N = 600: 300 A tokens, three tiles of the score product."""
    x, keys, size = make(2, 600, torch.float32, heads=2, d=32, c=8)
    plan = bipartite_match(keys, 250, backend="cpu")
    expected = reference.match(keys, 250)
    assert torch.equal(plan.match_result.token_map, expected.token_map)
    assert_within_twice_reference_error(plan.merge_wavg(x, size), reference.merge_wavg(expected, x, size),
                                        reference.merge_wavg(expected, x.double(), size.double()))


OPS = torch.ops.tome_native


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, x, g: OPS.match(m, 0, False, False), r"r must be clamped by the caller to 1\.\.4"),
        (lambda m, x, g: OPS.match(m, 5, False, False), r"r must be clamped"),
        (lambda m, x, g: OPS.match(m[0, 0], 2, False, False), r"metric must be \(B, N, D\)"),
        (lambda m, x, g: OPS.bipartite_merge(x[:, :5], m, None, 2, False, False), r"x must be \(2, 9, C\)"),
        (lambda m, x, g: OPS.merge(x, g[0].long(), g[1], "sum"), r"members and row_start must be int32"),
        (lambda m, x, g: OPS.merge(x, g[0] + 100, g[1], "sum"), r"members must be token indices"),
        (lambda m, x, g: OPS.merge(x, g[0], g[1], "median"), r"mode must be one of sum, mean, amax, amin"),
        (lambda m, x, g: OPS.unmerge(x, torch.full((2, 9), 50), *g), r"token_map entries must be rows of y"),
    ],
)
def test_operators_check_their_arguments(call, message):
    """The operators can be called directly (torch.ops.tome_native), so they check what
    would otherwise make them read or write out of bounds."""
    x, keys, _ = make(2, 9, torch.float32)
    groups = bipartite_match(keys, 3, backend="cpu").match_result.groups
    with pytest.raises(RuntimeError, match=message):
        call(keys, x, groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_auto_takes_the_cpu_extension_for_cpu_tensors(dtype):
    _, keys, _ = make(2, 9, dtype)
    assert bipartite_match(keys, 3).backend == "cpu"
