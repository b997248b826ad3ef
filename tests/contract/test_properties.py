"""Properties of the contract over random shapes, and agreement with the naive oracle."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import assert_within_twice_reference_error, runs_cpu_tensors
from tome_kernels import MERGE_MODES, bipartite_match, bipartite_merge, reference

from .oracle import expected_r, merge_groups, oracle_groups, token_map_of


@st.composite
def cases(draw, max_n=24, x_dtype=torch.float64, ties="sign"):
    """Random inputs. ``ties``: how exact ties are made. "sign" quantises the metric to +-1,
    whose scores tie in exact arithmetic and are then decided by float32 rounding, which is
    the same only for backends sharing the reference's score code (the oracle does).
    "copies" builds every row from three signed unit axes, the same in every head: every score
    is exactly -1, 0 or 1 in any summation order, so its ties are ties in every backend."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, 6))
    keys = draw(st.booleans())
    class_token = draw(st.booleans())
    distill_token = draw(st.booleans())
    r = draw(st.integers(0, n + 2))
    with_size = draw(st.booleans())
    # Quantised metrics make exact ties common; NaN rows exercise the NaN policy.
    quantised = draw(st.booleans())
    nan_rows = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))

    g = torch.Generator().manual_seed(seed)
    shape = (b, draw(st.integers(1, 3)), n, draw(st.integers(1, 5))) if keys else (b, n, draw(st.integers(1, 5)))
    metric = torch.randn(shape, generator=g)
    if quantised and ties == "sign":
        metric = metric.sign()
    elif quantised:
        # Random rows repeated would not do: copies of two different rows score 1 against
        # themselves only up to rounding, which differs between backends.
        dim = shape[-1]
        axes = torch.zeros(3, dim)
        signs = torch.randint(0, 2, (3,), generator=g) * 2.0 - 1
        axes[torch.arange(3), torch.randint(0, dim, (3,), generator=g)] = signs
        metric = axes[torch.randint(0, 3, (n,), generator=g)].expand(shape).clone()
    if nan_rows and n > 0:
        rows = torch.rand(b, n, generator=g) < 0.25
        token_axis = metric[:, 0] if keys else metric
        token_axis[rows] = float("nan")
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64).to(x_dtype)
    size = torch.randint(1, 5, (b, n, 1), generator=g).to(x_dtype) if with_size else None
    return dict(x=x, metric=metric, r=r, size=size, class_token=class_token, distill_token=distill_token)


def flags(case):
    return dict(class_token=case["class_token"], distill_token=case["distill_token"])


def check_against_oracle(case, backend):
    x, metric, size = case["x"], case["metric"], case["size"]
    r, groups = oracle_groups(metric, case["r"], **flags(case))
    plan = bipartite_match(metric, case["r"], **flags(case), backend=backend)
    assert plan.r == r
    assert torch.equal(plan.token_map, token_map_of(groups, x.shape[1]))

    x_out, size_out = bipartite_merge(x, metric, case["r"], size, **flags(case), backend=backend)
    x_exp, size_exp = merge_groups(groups, x.double(), None if size is None else size.double())
    expected = reference.match(metric, case["r"], **flags(case))

    def check_values(got, ref, exact, msg=""):
        if x.dtype == torch.float64:
            # The reference itself (float64 x), as precise as the oracle: the default float64
            # tolerance (1e-7) is orders above any reordering of float64 sums, on any CPU.
            torch.testing.assert_close(got, exact.to(x.dtype))
        else:
            # A fast backend in float32: within twice the reference's error against the oracle.
            assert_within_twice_reference_error(got, ref, exact, msg=msg)

    check_values(x_out, reference.merge_wavg(expected, x, size)[0], x_exp)
    # Sizes are float32 unless they were given in float64.
    assert size_out.dtype == (torch.float64 if size is not None and size.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(size_out, size_exp, check_dtype=False)
    for mode in MERGE_MODES:
        exact = merge_groups(groups, x.double(), None, mode)[0]
        check_values(plan.merge(x, mode), reference.merge(expected, x, mode), exact, msg=mode)


@given(cases())
def test_agrees_with_oracle(case):
    """Decisions (ties, NaN, layout) and merged values as the naive statement gives them."""
    check_against_oracle(case, "reference")


# The interpreter runs a Triton case in about a second: fewer examples than the reference's.
@runs_cpu_tensors("triton")
@settings(max_examples=max(10, settings().max_examples // 3))
@given(cases(x_dtype=torch.float32, ties="copies"))
def test_triton_agrees_with_oracle(case):
    """The Triton kernels (under the interpreter in CI) against the same naive statement."""
    check_against_oracle(case, "triton")


@runs_cpu_tensors("triton")
@settings(max_examples=max(10, settings().max_examples // 3))
@given(cases(x_dtype=torch.float32, ties="copies"))
def test_triton_repeated_runs_identical_and_inputs_untouched(case):
    before = {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor)}
    first = bipartite_merge(**case, backend="triton")
    second = bipartite_merge(**case, backend="triton")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for k, v in before.items():
        torch.testing.assert_close(case[k], v, rtol=0, atol=0, equal_nan=True)


@given(cases())
def test_conservation_and_layout(case):
    x, metric, size = case["x"], case["metric"], case["size"]
    b, n, c = x.shape
    r = expected_r(case["r"], n, **flags(case))
    s = torch.ones(b, n, 1, dtype=torch.float64) if size is None else size
    x_out, size_out = bipartite_merge(x, metric, case["r"], size, **flags(case))

    assert x_out.shape == (b, n - r, c) and size_out.shape == (b, n - r, 1)
    torch.testing.assert_close(size_out.sum(1), s.sum(1), rtol=0, atol=0, check_dtype=False)
    torch.testing.assert_close((x_out * size_out).sum(1), (x * s).sum(1), check_dtype=False)
    if case["class_token"] and n >= 1:
        assert torch.equal(x_out[:, 0], x[:, 0]) and torch.equal(size_out[:, 0].double(), s[:, 0])
    if case["distill_token"] and r > 0:
        # Nothing merged into the distill token: it keeps row 1, its size and its value.
        plan = bipartite_match(metric, case["r"], **flags(case))
        assert (plan.token_map[:, 1] == 1).all() and ((plan.token_map == 1).sum(1) == 1).all()
        torch.testing.assert_close(x_out[:, 1], x[:, 1])
        assert torch.equal(size_out[:, 1].double(), s[:, 1])


@given(cases())
def test_unmerge_and_token_map(case):
    x, metric = case["x"], case["metric"]
    plan = bipartite_match(metric, case["r"], **flags(case))
    b, n, _ = x.shape
    assert plan.token_map.shape == (b, n) and plan.token_map.dtype == torch.int64
    # Every output row is used by at least one input token.
    for row in plan.token_map:
        assert sorted(set(row.tolist())) == list(range(n - plan.r))

    y = torch.randn(b, n - plan.r, 3, dtype=torch.float64)
    restored = plan.unmerge(y)
    assert restored.shape == (b, n, 3)
    for bi in range(b):
        for k in range(n):
            assert torch.equal(restored[bi, k], y[bi, plan.token_map[bi, k]])

    # Each input token's token_map row holds the weighted average of its group.
    x_out, _ = plan.merge_wavg(x, case["size"])
    s = torch.ones(b, n, 1, dtype=torch.float64) if case["size"] is None else case["size"]
    for bi in range(b):
        for o in range(n - plan.r):
            members = (plan.token_map[bi] == o).nonzero().flatten()
            group = (x[bi, members] * s[bi, members]).sum(0) / s[bi, members].sum()
            torch.testing.assert_close(x_out[bi, o], group)


@given(cases())
def test_repeated_runs_identical(case):
    first = bipartite_merge(**case)
    second = bipartite_merge(**case)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@given(cases())
def test_inputs_not_modified(case):
    before = {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor)}
    bipartite_merge(**case)
    for k, v in before.items():
        torch.testing.assert_close(case[k], v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n,class_token,distill_token,r,expected", [
    (10, False, False, 100, 5),
    (11, False, False, 100, 5),
    (11, True, False, 100, 5),
    (10, True, False, 100, 4),
    (10, True, True, 100, 4),
    (9, True, True, 100, 3),
    (3, False, True, 1, 0),  # the only B token is the distill token
    (4, False, True, 5, 1),
    (2, True, False, 1, 0),
    (1, False, False, 1, 0),
    (8, False, False, 3, 3),
])
def test_r_clamp(n, class_token, distill_token, r, expected):
    plan = bipartite_match(torch.randn(2, n, 4), r, class_token=class_token, distill_token=distill_token)
    assert plan.r == expected
    flags = dict(class_token=class_token, distill_token=distill_token)
    x_out, _ = bipartite_merge(torch.randn(2, n, 3), torch.randn(2, n, 4), r, **flags)
    assert x_out.shape[1] == n - expected
