"""Odd shapes, empty batches, non-contiguous inputs, dtypes, and gradients."""

import pytest
import torch

from tests.helpers import assert_within_twice_reference_error
from tome_kernels import MERGE_MODES, bipartite_match, bipartite_merge, reference

from .oracle import merge_groups, oracle_groups


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 197])
@pytest.mark.parametrize("class_token,distill_token", [(False, False), (True, False), (True, True)])
def test_odd_token_counts(n, class_token, distill_token, device):
    x = torch.randn(3, n, 5, device=device)
    metric = torch.randn(3, n, 4, device=device)
    r = 16
    x_out, size_out = bipartite_merge(x, metric, r, class_token=class_token, distill_token=distill_token)
    _, groups = oracle_groups(metric.cpu(), r, class_token, distill_token)
    x_exp, size_exp = merge_groups(groups, x.cpu(), None)
    ref, _ = reference.bipartite_merge(x, metric, r, class_token=class_token, distill_token=distill_token)
    assert_within_twice_reference_error(x_out.cpu(), ref.cpu(), x_exp.reshape(3, -1, 5))
    torch.testing.assert_close(size_out.cpu().double(), size_exp.reshape(3, -1, 1))


@pytest.mark.parametrize("keys", [False, True])
def test_empty_batch(keys, device):
    metric = torch.randn(0, 2, 10, 3, device=device) if keys else torch.randn(0, 10, 3, device=device)
    x = torch.randn(0, 10, 4, device=device)
    x_out, size_out = bipartite_merge(x, metric, 3, torch.ones(0, 10, 1, device=device))
    assert x_out.shape == (0, 7, 4) and size_out.shape == (0, 7, 1)
    plan = bipartite_match(metric, 3)
    assert plan.r == 3 and plan.token_map.shape == (0, 10)
    for mode in MERGE_MODES:
        assert plan.merge(x, mode).shape == (0, 7, 4)
    assert plan.unmerge(x_out).shape == (0, 10, 4)


def test_non_contiguous_inputs(device):
    x = torch.randn(2, 6, 33, device=device).transpose(1, 2)  # (2, 33, 6), strided
    keys = torch.randn(2, 33, 3, 8, device=device).permute(0, 2, 1, 3)  # (2, 3, 33, 8)
    size = torch.randint(1, 4, (2, 66, 1), device=device).float()[:, ::2]
    assert not (x.is_contiguous() or keys.is_contiguous() or size.is_contiguous())
    out = bipartite_merge(x, keys, 7, size, class_token=True)
    expected = bipartite_merge(x.contiguous(), keys.contiguous(), 7, size.contiguous(), class_token=True)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype, device):
    x = torch.randn(2, 50, 16, device=device).to(dtype)
    metric = torch.randn(2, 4, 50, 8, device=device).to(dtype)
    size = torch.randint(1, 5, (2, 50, 1), device=device).float()
    x_out, size_out = bipartite_merge(x, metric, 12, size, class_token=True)
    assert x_out.dtype == dtype and size_out.dtype == torch.float32
    # Decisions are those of the float32 matching on the same (upcast) metric; values are
    # within twice the reference's error of the float64 group averages.
    _, groups = oracle_groups(metric.cpu().float(), 12, True, False)
    x_exp, size_exp = merge_groups(groups, x.cpu(), size.cpu())
    ref, _ = reference.bipartite_merge(x, metric, 12, size, class_token=True)
    assert_within_twice_reference_error(x_out.cpu(), ref.cpu(), x_exp)
    torch.testing.assert_close(size_out.cpu(), size_exp.float(), rtol=0, atol=0)


def test_size_dtype_follows_size():
    x, metric = torch.randn(1, 10, 3), torch.randn(1, 10, 3)
    for given, returned in [(None, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        size = None if given is None else torch.ones(1, 10, 1, dtype=given)
        for r in (0, 3):
            assert bipartite_merge(x, metric, r, size)[1].dtype == returned


def test_float16_sizes_are_exact_beyond_2048():
    # A float16 size accumulator would round 2049 + 1 to 2048 + 2; sizes are float32.
    x, metric = torch.randn(1, 4, 2, dtype=torch.float16), torch.ones(1, 4, 2)
    size = torch.tensor([[[2049.0], [1.0], [1.0], [1.0]]])
    _, size_out = bipartite_merge(x, metric, 1, size)
    assert size_out.flatten().tolist() == [1.0, 2050.0, 1.0]


@pytest.mark.parametrize("class_token,distill_token", [(False, False), (True, False), (True, True)])
def test_gradcheck_weighted_merge(class_token, distill_token):
    x = torch.randn(2, 11, 3, dtype=torch.float64, requires_grad=True)
    size = (torch.rand(2, 11, 1, dtype=torch.float64) + 0.5).requires_grad_()
    metric = torch.randn(2, 2, 11, 4, dtype=torch.float64)

    def step(x, size):
        return bipartite_merge(x, metric, 4, size, class_token=class_token, distill_token=distill_token)

    assert torch.autograd.gradcheck(step, (x, size))
    assert torch.autograd.gradgradcheck(step, (x, size))


def test_gradcheck_plan_methods():
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    plan = bipartite_match(torch.randn(2, 9, 4, dtype=torch.float64), 3)
    for mode in ("sum", "mean", "amax", "amin"):
        assert torch.autograd.gradcheck(lambda t: plan.merge(t, mode), (x,))
    y = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(plan.unmerge, (y,))


def test_metric_gradient_not_required():
    # The matching has no gradient; a metric that requires one must not break the merge.
    metric = torch.randn(2, 9, 4, requires_grad=True)
    x = torch.randn(2, 9, 3, requires_grad=True)
    x_out, _ = bipartite_merge(x, metric, 3)
    x_out.sum().backward()
    assert x.grad is not None and metric.grad is None
