"""Every fast backend against the reference: the Triton backend on both paths (one-pass and
multi-kernel), the "cpu" extension, and on a GPU the "cuda" extension. Every flag, dtypes,
odd and tiled shapes, non-contiguous inputs, NaN rows, gradients, the torch.library
registration, and outputs poisoned before the kernels run.

The ``backend`` fixture (conftest.py) gives each case its poisoned buffers. In CI the Triton
kernels run in Triton's interpreter on CPU tensors (tests/conftest.py) and the "cpu"
extension is built on first use; with TOME_TEST_DEVICE=cuda the same tests run on the GPU
for "triton" and "cuda".
"""


import pytest
import torch

import tome_kernels
from tests.helpers import assert_within_twice_reference_error
from tome_kernels import bipartite_match, bipartite_merge, reference
from tome_kernels.backends import registry
from tome_kernels.backends.triton import ops as triton_ops

NAN = float("nan")

# (N, heads or None, D): one tile and several; D in one block, below 16 and over 128
# (the chunked path); odd and even N; N = 2 and 3.
# The two largest take two thirds of this test's time in Triton's interpreter: "slow".
SHAPES = [(2, None, 4), (3, 2, 5), (9, None, 8), (16, 3, 16), (41, None, 300),
          pytest.param((197, 2, 24), marks=pytest.mark.slow), pytest.param((300, None, 8), marks=pytest.mark.slow)]

def make(shape, batch, dtype, device, seed=0):
    n, heads, d = shape
    g = torch.Generator().manual_seed(seed)
    metric_shape = (batch, n, d) if heads is None else (batch, heads, n, d)
    metric = torch.randn(metric_shape, generator=g).to(device, dtype)
    x = torch.randn(batch, n, 6, generator=g).to(device, dtype)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).to(device, torch.float32)
    return x, metric, size


def assert_same_plan(plan, expected):
    assert plan.r == expected.r
    for name in ("src_idx", "dst_idx", "unm_idx", "token_map"):
        assert torch.equal(getattr(plan, name), getattr(expected, name)), name


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("class_token,distill_token", [(False, False), (True, False), (True, True), (False, True)])
def test_float32_matches_reference(backend, device, shape, class_token, distill_token):
    x, metric, size = make(shape, 2, torch.float32, device)
    flags = dict(class_token=class_token, distill_token=distill_token)
    r = shape[0] // 3 + 1
    plan = bipartite_match(metric, r, **flags, backend=backend)
    expected = reference.match(metric, r, **flags)
    assert_same_plan(plan.match_result, expected)

    for with_size in (None, size):
        got = bipartite_merge(x, metric, r, with_size, **flags, backend=backend)
        want = reference.merge_wavg(expected, x, with_size)
        exact = reference.merge_wavg(expected, x.double(), None if with_size is None else with_size.double())
        assert_within_twice_reference_error(got, want, exact, msg="bipartite_merge")
        assert_within_twice_reference_error(plan.merge_wavg(x, with_size), want, exact, msg="merge_wavg")
    for mode in tome_kernels.MERGE_MODES:
        assert_within_twice_reference_error(plan.merge(x, mode), reference.merge(expected, x, mode),
                                            reference.merge(expected, x.double(), mode), msg=mode)
    y = torch.randn(2, shape[0] - plan.r, 5, device=device)
    assert torch.equal(plan.unmerge(y), reference.unmerge(expected, y))


@pytest.mark.parametrize("shape", [(9, None, 8), (41, 2, 40)], ids=str)
def test_float16_within_twice_the_reference_error(backend, device, shape):
    """Same decisions as the reference (which upcasts the same half inputs); merged values
    no further from a float64 computation than twice the reference's own error, plus one
    half-precision ulp at the output's scale for rounding the reference happened to dodge."""
    x, metric, size = make(shape, 3, torch.float16, device)
    r = shape[0] // 2
    plan = bipartite_match(metric, r, class_token=True, backend=backend)
    expected = reference.match(metric, r, class_token=True)
    assert_same_plan(plan.match_result, expected)
    got, got_size = bipartite_merge(x, metric, r, size, class_token=True, backend=backend)
    ref, _ = reference.merge_wavg(expected, x, size)
    exact, exact_size = reference.merge_wavg(expected, x.double(), size.double())
    assert_within_twice_reference_error(got, ref, exact, ulps=1)
    torch.testing.assert_close(got_size.double(), exact_size, rtol=0, atol=0)


def test_non_contiguous_inputs(backend, device):
    x, metric, size = make((13, 2, 8), 3, torch.float32, device)
    # Keys as attention produces them: a head-major view of a (B, N, H, Dh) tensor.
    keys = metric.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)
    size_t = torch.cat([size, size], dim=-1)[..., :1]
    assert not (keys.is_contiguous() or x_t.is_contiguous() or size_t.is_contiguous())
    got = bipartite_merge(x_t, keys, 5, size_t, class_token=True, backend=backend)
    expected = reference.match(metric, 5, class_token=True)
    assert_within_twice_reference_error(got, reference.merge_wavg(expected, x, size),
                                        reference.merge_wavg(expected, x.double(), size.double()))


def test_nan_rows_and_clamped_r(backend, device):
    x, metric, size = make((11, None, 4), 2, torch.float32, device)
    metric[0, 3] = NAN
    metric[1, ::2] = NAN  # every A token's row: all scores NaN
    got = bipartite_match(metric, 100, distill_token=True, backend=backend)
    expected = reference.match(metric, 100, distill_token=True)
    assert got.r == expected.r == 5
    assert_same_plan(got.match_result, expected)


def test_no_merge_and_empty_batch(backend, device):
    x, metric, size = make((7, None, 4), 2, torch.float32, device)
    x_out, size_out = bipartite_merge(x, metric, 0, backend=backend)
    assert x_out is x and torch.equal(size_out, torch.ones(2, 7, 1, device=device))
    x0, m0, s0 = x[:0], metric[:0], size[:0]
    x_out, size_out = bipartite_merge(x0, m0, 3, s0, backend=backend)
    assert x_out.shape == (0, 4, 6) and size_out.shape == (0, 4, 1)
    assert bipartite_match(m0, 3, backend=backend).token_map.shape == (0, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weighted_merge_gradients(backend, device, dtype):
    x, metric, size = make((15, 2, 8), 2, dtype, device)
    r = 6
    grads = []
    for name in (backend, "reference"):
        xs, ss = x.clone().requires_grad_(), size.clone().requires_grad_()
        x_out, size_out = bipartite_merge(xs, metric, r, ss, class_token=True, backend=name)
        weights = torch.linspace(-1, 1, x_out.numel(), device=device).view_as(x_out).to(dtype)
        loss = (x_out * weights).float().sum() + (size_out * size_out).sum()
        grads.append(torch.autograd.grad(loss, (xs, ss)))
    # The same loss in float64 on the reference's plan (the same weights, as rounded to dtype).
    xs, ss = x.double().requires_grad_(), size.double().requires_grad_()
    x_out, size_out = reference.merge_wavg(reference.match(metric, r, class_token=True), xs, ss)
    loss = (x_out * weights.double()).sum() + (size_out * size_out).sum()
    assert_within_twice_reference_error(grads[0], grads[1], torch.autograd.grad(loss, (xs, ss)))


def test_double_backward_matches_the_reference(backend, device):
    """create_graph=True (a gradient penalty): the backward is itself differentiated, never
    silently treated as a constant."""
    x, metric, size = make((13, 2, 8), 2, torch.float32, device)
    results = []
    for name in (backend, "reference", "float64"):
        if name == "float64":  # the truth: the reference's plan, float64 inputs
            xs, ss = x.double().requires_grad_(), size.double().requires_grad_()
            plan = bipartite_match(metric, 5, class_token=True, backend="reference")
            x_out, size_out = plan.merge_wavg(xs, ss)
        else:
            xs, ss = x.clone().requires_grad_(), size.clone().requires_grad_()
            x_out, size_out = bipartite_merge(xs, metric, 5, ss, class_token=True, backend=name)
            plan = bipartite_match(metric, 5, class_token=True, backend=name)
        loss = (x_out ** 2).sum() + (size_out ** 2).sum() + (plan.merge(xs, "amax") ** 2).sum()
        gx, gs = torch.autograd.grad(loss, (xs, ss), create_graph=True)
        results.append(torch.autograd.grad((gx ** 2).sum() + (gs ** 2).sum(), (xs, ss)))
    assert all(got.abs().max() > 0 for got in results[0])
    assert_within_twice_reference_error(*results)


def test_modes_and_unmerge_gradients(backend, device):
    x, metric, _ = make((15, None, 8), 2, torch.float32, device)
    x = x.round()  # repeated values: amax / amin must share the gradient between ties
    plan = bipartite_match(metric, 7, backend=backend)
    for mode in tome_kernels.MERGE_MODES:
        xs, xr, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
        got = torch.autograd.grad((plan.merge(xs, mode) ** 2).sum(), xs)[0]
        want = torch.autograd.grad((reference.merge(plan.match_result, xr, mode) ** 2).sum(), xr)[0]
        exact = torch.autograd.grad((reference.merge(plan.match_result, x64, mode) ** 2).sum(), x64)[0]
        assert_within_twice_reference_error(got, want, exact, msg=mode)
    y = torch.randn(2, 8, 3, device=device, requires_grad=True)
    y64 = y.detach().double().requires_grad_()
    got = torch.autograd.grad((plan.unmerge(y) ** 3).sum(), y)[0]
    want = torch.autograd.grad((reference.unmerge(plan.match_result, y) ** 3).sum(), y)[0]
    exact = torch.autograd.grad((reference.unmerge(plan.match_result, y64) ** 3).sum(), y64)[0]
    assert_within_twice_reference_error(got, want, exact, msg="unmerge")


def test_plan_from_the_reference_and_float64(backend, device):
    """A backend can apply a plan it did not make (groups from the token map); float64
    tensors run in the reference when the backend does not compute float64 (Triton)."""
    x, metric, size = make((12, None, 4), 2, torch.float32, device)
    expected = reference.match(metric, 5, class_token=True)
    chosen = registry._REGISTRY[backend]
    assert_within_twice_reference_error(chosen.merge_wavg(expected, x, size), reference.merge_wavg(expected, x, size),
                                        reference.merge_wavg(expected, x.double(), size.double()))
    plan = bipartite_match(metric, 5, class_token=True, backend=backend)
    x64 = x.double()
    assert plan.merge_wavg(x64)[0].dtype == torch.float64
    torch.testing.assert_close(plan.merge_wavg(x64), reference.merge_wavg(expected, x64))


def op_samples(backend, device):
    """(operator, arguments) for torch.library.opcheck: every operator of the backend."""
    x, metric, size = make((9, 2, 8), 2, torch.float32, device)
    if backend == "triton":
        ops, path = triton_ops, (False,)
    else:
        ops, path = torch.ops.tome_native, ()
    src, dst, unm, token_map, members, row_start = ops.match(metric, 3, True, False, *path)
    grad_out = torch.randn(2, 6, 6, device=device)
    # The differentiable ops get inputs that require grad, so opcheck tests their autograd.
    xg, sizeg = x.clone().requires_grad_(), size.clone().requires_grad_()
    return [
        (ops.match, (metric, 3, True, False, *path)),
        (ops.bipartite_merge, (xg, metric, sizeg, 3, True, False, *path)),
        (ops.merge_wavg, (xg, sizeg, members, row_start)),
        (ops.merge_wavg, (xg, None, members, row_start)),
        (ops.merge_wavg_backward, (grad_out, grad_out[..., :1], x, size, members, row_start, True)),
        (ops.merge, (xg, members, row_start, "amax")),
        (ops.merge_backward, (grad_out, x, ops.merge(x, members, row_start, "amax"), members, row_start, "amax")),
        (ops.unmerge, (grad_out.clone().requires_grad_(), token_map, members, row_start)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(backend, device, case):
    op, args = op_samples(backend, device)[case]
    if backend != "triton":
        op = op.default
    torch.library.opcheck(op, args)


def test_compiles_without_graph_breaks(backend, device):
    x, metric, size = make((17, 2, 8), 2, torch.float32, device)

    def step(x, metric, size):
        x_out, size_out = bipartite_merge(x, metric, 5, size, class_token=True, backend=backend)
        return x_out * size_out

    # aot_eager traces the graph and the backward exactly as inductor would see them,
    # without compiling C++ here; fullgraph=True makes any graph break an error.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xs = x.clone().requires_grad_()
    got = compiled(xs, metric, size)
    want = step(x.clone().requires_grad_(), metric, size)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert xs.grad is not None and xs.grad.shape == x.shape
