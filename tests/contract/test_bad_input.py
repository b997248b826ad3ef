"""Every bad input of the contract raises the right exception, naming the argument."""

import pytest
import torch

from tome_kernels import bipartite_match, bipartite_merge

X = torch.randn(2, 8, 4)
METRIC = torch.randn(2, 8, 3)
SIZE = torch.ones(2, 8, 1)


def merge_call(**overrides):
    args = dict(x=X, metric=METRIC, r=2, size=SIZE)
    args.update(overrides)
    return lambda: bipartite_merge(**args)


@pytest.mark.parametrize("call,error,pattern", [
    # wrong rank
    (merge_call(x=torch.randn(8, 4)), ValueError, r"x must have shape \(B, N, C\)"),
    (merge_call(x=torch.randn(2, 8, 4, 1)), ValueError, r"x must have shape"),
    (merge_call(metric=torch.randn(8, 3)), ValueError, r"metric must have shape \(B, N, D\) or keys"),
    (merge_call(metric=torch.randn(1, 2, 2, 8, 3)), ValueError, r"metric must have shape"),
    (merge_call(size=torch.ones(2, 8)), ValueError, r"size must have shape \(B, N, 1\)"),
    (merge_call(size=torch.ones(2, 8, 2)), ValueError, r"size must have shape \(B, N, 1\)"),
    # B or N disagreeing
    (merge_call(x=torch.randn(3, 8, 4)), ValueError, r"x must have shape .*B=2 and N=8"),
    (merge_call(x=torch.randn(2, 9, 4)), ValueError, r"x must have shape .*B=2 and N=8"),
    (merge_call(size=torch.ones(2, 7, 1)), ValueError, r"size must have shape .*B=2 and N=8"),
    (merge_call(metric=torch.randn(2, 3, 9, 4)), ValueError, r"x must have shape .*N=9"),
    (merge_call(metric=torch.randn(2, 0, 8, 4)), ValueError, r"metric given as keys .* H >= 1"),
    # r
    (merge_call(r=2.0), TypeError, r"r must be a Python int"),
    (merge_call(r="2"), TypeError, r"r must be a Python int"),
    (merge_call(r=True), TypeError, r"r must be a Python int"),
    (merge_call(r=torch.tensor(2)), TypeError, r"r must be a Python int"),
    (merge_call(r=-1), ValueError, r"r must be >= 0"),
    # dtypes
    (merge_call(x=X.long()), TypeError, r"x must be a floating-point tensor"),
    (merge_call(x=X.to(torch.complex64)), TypeError, r"x must be a floating-point tensor"),
    (merge_call(metric=METRIC.int()), TypeError, r"metric must be a floating-point tensor"),
    (merge_call(size=SIZE.long()), TypeError, r"size must be a floating-point tensor"),
    (merge_call(size=SIZE.bool()), TypeError, r"size must be a floating-point tensor"),
    # not tensors, bad flags
    (merge_call(x=X.tolist()), TypeError, r"x must be a torch.Tensor"),
    (merge_call(metric=None), TypeError, r"metric must be a torch.Tensor"),
    (lambda: bipartite_merge(X, METRIC, 2, class_token=1), TypeError, r"class_token must be a bool"),
    (lambda: bipartite_merge(X, METRIC, 2, distill_token="yes"), TypeError, r"distill_token must be a bool"),
    # backends
    (lambda: bipartite_merge(X, METRIC, 2, backend="nope"), ValueError, r"backend='nope' is not a backend"),
    (lambda: bipartite_merge(X, METRIC, 2, backend=None), TypeError, r"backend must be a str"),
    # bipartite_match
    (lambda: bipartite_match(METRIC.long(), 2), TypeError, r"metric must be a floating-point tensor"),
    (lambda: bipartite_match(METRIC, -3), ValueError, r"r must be >= 0"),
    (lambda: bipartite_match(METRIC, 1.5), TypeError, r"r must be a Python int"),
])
def test_bad_input_raises(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_tensors_on_different_devices():
    # A meta tensor stands in for a second device: the check must fire before any work.
    with pytest.raises(ValueError, match=r"x is on meta but the metric is on cpu"):
        bipartite_merge(X.to("meta"), METRIC, 2)
    with pytest.raises(ValueError, match=r"size is on meta but the metric is on cpu"):
        bipartite_merge(X, METRIC, 2, SIZE.to("meta"))


@pytest.fixture
def plan():
    return bipartite_match(METRIC, 2)


@pytest.mark.parametrize("method,args,error,pattern", [
    ("merge_wavg", (torch.randn(2, 7, 4),), ValueError, r"x must have shape \(B, 8, C\)"),
    ("merge_wavg", (X, torch.ones(2, 8)), ValueError, r"size must have shape"),
    ("merge_wavg", (X.int(),), TypeError, r"x must be a floating-point tensor"),
    ("merge", (X, "median"), ValueError, r"mode must be one of sum, mean, amax, amin"),
    ("merge", (torch.randn(3, 8, 4), "sum"), ValueError, r"x must have shape .*B=2"),
    ("unmerge", (X,), ValueError, r"y must have shape \(B, 6, C\)"),
    ("unmerge", (torch.randn(2, 6),), ValueError, r"y must have shape"),
])
def test_plan_bad_input(plan, method, args, error, pattern):
    with pytest.raises(error, match=pattern):
        getattr(plan, method)(*args)


def test_nothing_written_on_error():
    x = X.clone()
    with pytest.raises(ValueError):
        bipartite_merge(x, METRIC, 2, torch.ones(2, 8, 2))
    assert torch.equal(x, X)
