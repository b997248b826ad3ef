"""The methods beyond ToMe (PiToMe, kth / random bipartite, tomesd's grid, DSM's windows) on
every backend: plans and merges against the "reference" backend, properties every backend
must keep, gradients, bad input, determinism, and the two Triton kernels they add
(``assign_kernel``, ``energy_kernel``) called directly.

The plans themselves are checked against naive oracles in ``test_methods_oracle.py``; here
the reference backend is the yardstick. In CI the Triton kernels run in Triton's interpreter
on CPU tensors (small shapes); with TOME_TEST_DEVICE=cuda the same tests run on the GPU.
"""


import pytest
import torch

from tests.helpers import (
    ON_GPU,
    assert_within_twice_reference_error,
    best_float64,
    energy_float64,
    poison_triton_buffers,
)
from tome_kernels import (
    MERGE_MODES,
    grid_match,
    kth_bipartite_match,
    methods,
    pitome_match,
    pitome_merge,
    random_bipartite_match,
    window_match,
)
from tome_kernels.backends import registry
from tome_kernels.backends.triton import launch
from tome_kernels.backends.triton import ops as triton_ops
from tome_kernels.reference import energy, partition

NAN = float("nan")
# The fixtures' cases (conftest.py): Triton on the path it chooses, since the methods' plans
# never take the one-pass path (test_fast_backends covers both).
BACKEND_CASES = ["triton", "cuda" if ON_GPU else "cpu"]
ANY_BACKEND_CASES = ["reference", *BACKEND_CASES]


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# name -> (tokens, metric kind, plan maker): every function and its options, each with a
# metric kind of its own: a (B, N, D) metric, keys (B, H, N, Dh), and D or Dh over 128 (the
# Triton kernels' chunked path). Generators are seeded per call: every backend draws alike.
CASES = {
    "pitome_cls": (23, (None, 8), lambda m, be: pitome_match(m, 7, class_token=True, backend=be)),
    "pitome_keys": (30, (2, 8), lambda m, be: pitome_match(
        m, 9, margin=0.3, alpha=0.5, energy_form="paper", class_token=True, distill_token=True, backend=be)),
    "pitome_wide": (19, (None, 200), lambda m, be: pitome_match(m, 100, margin=0.0, backend=be)),
    "pitome_bipartite": (25, (2, 8), lambda m, be: pitome_match(
        m, 8, margin=0.2, split="bipartite", class_token=True, backend=be)),
    "pitome_text": (24, (None, 8), lambda m, be: pitome_match(
        m, 6, margin=0.5, energy_form="gaussian", split="halves", class_token=True, backend=be)),
    "kth_2_cls": (23, (None, 8), lambda m, be: kth_bipartite_match(m, 2, class_token=True, backend=be)),
    "kth_3_keys_wide": (20, (2, 136), lambda m, be: kth_bipartite_match(
        m, 3, class_token=True, distill_token=True, backend=be)),
    "random": (21, (2, 8), lambda m, be: random_bipartite_match(
        m, 8, generator=seeded(), class_token=True, backend=be)),
    "grid_random": (35, (None, 8), lambda m, be: grid_match(m, 12, (5, 7), generator=seeded(), backend=be)),
    "grid_top_left_wide": (36, (None, 160), lambda m, be: grid_match(
        m, 20, (6, 6), stride=(2, 3), random_dst=False, backend=be)),
    "window_cls": (31, (None, 8), lambda m, be: window_match(m, 10, (5, 6), class_token=True, backend=be)),
    "window_keys": (26, (3, 4), lambda m, be: window_match(
        m, 100, (6, 4), window=(3, 2), class_token=True, distill_token=True, backend=be)),
}


def make(batch, tokens, kind, device, dtype=torch.float32, channels=6, seed=0):
    """(x, metric, size): random inputs, sizes small positive integers."""
    heads, dim = kind
    g = seeded(seed)
    metric_shape = (batch, tokens, dim) if heads is None else (batch, heads, tokens, dim)
    metric = torch.randn(metric_shape, generator=g).to(device, dtype)
    x = torch.randn(batch, tokens, channels, generator=g).to(device, dtype)
    size = torch.randint(1, 5, (batch, tokens, 1), generator=g).to(device, torch.float32)
    return x, metric, size


def assert_same_results(plan, expected, x, size, modes=MERGE_MODES):
    """Same token map; merge_wavg and the merge modes within twice the expected plan's error
    against float64 (its merge of the upcast inputs); unmerge exactly as it gives."""
    assert plan.r == expected.r
    assert torch.equal(plan.token_map, expected.token_map)
    x64 = x.double()
    for s in (None, size):
        s64 = None if s is None else s.double()
        assert_within_twice_reference_error(plan.merge_wavg(x, s), expected.merge_wavg(x, s),
                                            expected.merge_wavg(x64, s64), msg="merge_wavg")
    for mode in modes:
        assert_within_twice_reference_error(plan.merge(x, mode), expected.merge(x, mode), expected.merge(x64, mode),
                                            msg=mode)
    y = torch.randn(x.shape[0], x.shape[1] - plan.r, 5, device=x.device).to(x.dtype)
    assert torch.equal(plan.unmerge(y), expected.unmerge(y))


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_reference(backend, device, case):
    tokens, kind, make_plan = CASES[case]
    x, metric, size = make(2, tokens, kind, device)
    plan = make_plan(metric, backend)
    expected = make_plan(metric, "reference")
    assert plan.backend == backend and expected.r > 0
    assert_same_results(plan, expected, x, size)


# (N, plan maker, expected r): the smallest rows, where most methods have nothing to merge.
TINY = [
    (1, lambda m, be: pitome_match(m, 3, class_token=True, backend=be), 0),
    (2, lambda m, be: pitome_match(m, 3, backend=be), 1),
    (3, lambda m, be: pitome_match(m, 3, class_token=True, backend=be), 1),
    (2, lambda m, be: kth_bipartite_match(m, 2, backend=be), 1),
    (3, lambda m, be: kth_bipartite_match(m, 3, class_token=True, backend=be), 0),
    (3, lambda m, be: random_bipartite_match(m, 5, generator=seeded(), backend=be), 1),
    (1, lambda m, be: grid_match(m, 1, (1, 1), backend=be), 0),
    (3, lambda m, be: grid_match(m, 5, (1, 3), stride=(1, 2), generator=seeded(), backend=be), 2),
    (2, lambda m, be: window_match(m, 5, (1, 1), class_token=True, window=(1, 1), backend=be), 0),
    (3, lambda m, be: window_match(m, 5, (1, 2), class_token=True, window=(1, 2), backend=be), 1),
]


def test_tiny_rows(backend, device):
    for tokens, make_plan, r in TINY:
        x, metric, size = make(3, tokens, (None, 4), device)
        plan, expected = make_plan(metric, backend), make_plan(metric, "reference")
        assert plan.r == r
        # The modes share one kernel, which the other tests cover: "amax" stands for them.
        assert_same_results(plan, expected, x, size, modes=("amax",))


def test_vit_sized_row(backend, device):
    """N = 197 (ViT-B/16 at 224): several token tiles in the kernels."""
    x, metric, size = make(1, 197, (2, 16), device, seed=1)
    plan = pitome_match(metric, 16, margin=0.1, class_token=True, backend=backend)
    expected = pitome_match(metric, 16, margin=0.1, class_token=True, backend="reference")
    assert_same_results(plan, expected, x, size, modes=())


def test_empty_batch(any_backend, device):
    makers = [CASES[name] for name in ("pitome_cls", "kth_2_cls", "random", "grid_random", "window_cls")]
    for tokens, kind, make_plan in makers:
        x, metric, size = make(0, tokens, kind, device)
        plan = make_plan(metric, any_backend)
        rows = tokens - make_plan(make(1, tokens, kind, device)[1], "reference").r
        assert plan.token_map.shape == (0, tokens)
        x_out, size_out = plan.merge_wavg(x, size)
        assert x_out.shape == (0, rows, 6) and size_out.shape == (0, rows, 1)
        assert plan.merge(x, "amax").shape == (0, rows, 6)
        assert plan.unmerge(x_out).shape == (0, tokens, 6)


def test_non_contiguous_inputs(any_backend, device):
    x, metric, size = make(2, 30, (2, 8), device)
    # Keys as attention produces them (a head-major view of (B, N, H, Dh)), x and size views.
    keys = metric.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)
    size_t = torch.cat([size, size], dim=-1)[..., :1]
    # A (B, N, D) metric that is every other column of a wider one.
    wide = torch.stack([metric.mean(1), torch.randn_like(metric.mean(1))], dim=-1).flatten(-2)[..., ::2]
    assert not any(t.is_contiguous() for t in (keys, x_t, size_t, wide))
    tokens, _, make_plan = CASES["pitome_keys"]
    plan = make_plan(keys, any_backend)
    assert_same_results(plan, make_plan(metric, "reference"), x_t, size_t)
    expected = grid_match(wide.contiguous(), 12, (5, 6), generator=seeded(), backend="reference")
    got = grid_match(wide, 12, (5, 6), generator=seeded(), backend=any_backend)
    assert_same_results(got, expected, x_t, size_t)
    assert_within_twice_reference_error(got.merge_wavg(x_t, size_t), expected.merge_wavg(x, size),
                                        expected.merge_wavg(x.double(), size.double()))


@pytest.mark.parametrize("dtype,case", [
    (torch.float16, "pitome_keys"), (torch.bfloat16, "pitome_keys"), (torch.float16, "grid_random"),
    (torch.bfloat16, "window_cls"),
], ids=str)
def test_half_precision(backend, device, dtype, case):
    """Same decisions as the reference on the same half inputs (both score in float32);
    merged values no further from float64 than twice the reference's own error, plus one
    ulp of the dtype at the output's scale for a rounding the reference happened to dodge."""
    tokens, kind, make_plan = CASES[case]
    x, metric, size = make(3, tokens, kind, device, dtype)
    plan, expected = make_plan(metric, backend), make_plan(metric, "reference")
    assert torch.equal(plan.token_map, expected.token_map)
    exact, exact_size = expected.merge_wavg(x.double(), size.double())
    ref, _ = expected.merge_wavg(x, size)
    got, got_size = plan.merge_wavg(x, size)
    assert got.dtype == dtype
    assert_within_twice_reference_error(got, ref, exact, ulps=1)
    torch.testing.assert_close(got_size.double(), exact_size, rtol=0, atol=0)
    for mode in MERGE_MODES:
        assert_within_twice_reference_error(plan.merge(x, mode), expected.merge(x, mode),
                                            expected.merge(x.double(), mode), ulps=1, msg=mode)


def group_sizes(plan):
    return partition.group_sizes(plan.token_map, plan.num_tokens - plan.r)


@pytest.mark.parametrize("case", ["pitome_keys", "kth_3_keys_wide", "random", "grid_random", "window_keys"])
def test_sizes_preserved_and_single_rows_copied(any_backend, device, case):
    """The sizes' sum is preserved; a row with a single member (a protected or kept token, a
    destination nothing merged into) is that token's row bitwise, with its size unchanged;
    the class and distill tokens keep rows 0 and 1, alone."""
    tokens, kind, make_plan = CASES[case]
    x, metric, size = make(2, tokens, kind, device)
    plan = make_plan(metric, any_backend)
    x_out, size_out = plan.merge_wavg(x, size)
    assert torch.equal(size_out.sum(1), size.sum(1))
    counts = group_sizes(plan)
    assert torch.equal(plan.merge_wavg(x)[1][..., 0], counts.float())
    first = torch.full_like(counts, tokens).scatter_reduce(
        1, plan.token_map, torch.arange(tokens, device=device).expand_as(plan.token_map), "amin")
    single = counts == 1
    assert single.any() and (~single).any()
    gathered = x.gather(1, first[..., None].expand(-1, -1, x.shape[-1]))
    assert torch.equal(x_out[single], gathered[single])
    assert torch.equal(size_out[single], size.gather(1, first[..., None])[single])
    for mode in MERGE_MODES:
        assert torch.equal(plan.merge(x, mode)[single], gathered[single]), mode
    protected = 2 if case in ("pitome_keys", "kth_3_keys_wide", "window_keys") else 1
    if case != "grid_random":
        assert torch.equal(plan.token_map[:, :protected], torch.arange(protected, device=device).expand(2, -1))
        assert bool(single[:, :protected].all())


@pytest.mark.parametrize("case", ["pitome_cls", "grid_random", "window_keys"])
def test_unmerge_of_the_mean_gives_each_token_its_group_mean(any_backend, device, case):
    tokens, kind, make_plan = CASES[case]
    x, metric, _ = make(2, tokens, kind, device)
    plan = make_plan(metric, any_backend)
    restored = plan.unmerge(plan.merge(x, "mean"))
    assert restored.shape == x.shape
    index = plan.token_map[..., None].expand_as(x)

    def group_means(dtype):
        sums = torch.zeros(2, tokens - plan.r, x.shape[-1], dtype=dtype, device=device)
        sums.scatter_add_(1, index, x.to(dtype))
        return (sums / group_sizes(plan)[..., None]).gather(1, index)

    # This test's own sums, in float32 as the reference path (independent of every backend).
    assert_within_twice_reference_error(restored, group_means(torch.float32), group_means(torch.float64))


# Triton's interpreter computes with NumPy, which warns about the NaN arithmetic these
# tests are about.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_rows_never_win_and_rank_last(any_backend, device):
    """Grid with top-left destinations 0, 2, 8, 10 of a 4x4 grid: a NaN destination
    receives no source with a finite score elsewhere, and a NaN source ranks last. PiToMe:
    a NaN row has energy -inf, so it is kept while enough finite tokens remain."""
    x, metric, size = make(2, 16, (None, 8), device)
    metric[:, 2] = NAN
    metric[0, 5] = NAN
    plan = grid_match(metric, 11, (4, 4), random_dst=False, backend=any_backend)
    assert torch.equal(plan.token_map, grid_match(metric, 11, (4, 4), random_dst=False, backend="reference").token_map)
    row_of_2 = plan.token_map[:, 2:3]
    assert ((plan.token_map == row_of_2).sum(1) == 1).all()
    # Row 0: 12 sources, 11 merge: the NaN source 5 is the one left; row 1: source 5 merges.
    assert (plan.token_map[0] == plan.token_map[0, 5]).sum() == 1
    assert (plan.token_map[1] == plan.token_map[1, 5]).sum() > 1

    x, metric, size = make(2, 20, (None, 8), device)
    metric[:, [3, 11]] = NAN
    plan = pitome_match(metric, 9, margin=0.0, backend=any_backend)
    expected = pitome_match(metric, 9, margin=0.0, backend="reference")
    assert torch.equal(plan.token_map, expected.token_map)
    assert (group_sizes(plan).gather(1, plan.token_map[:, [3, 11]]) == 1).all()
    assert_same_results(plan, expected, x, size)


def test_exact_ties_go_to_the_lowest_index(any_backend, device):
    """Copies of one row score bitwise alike in every backend: a source tied between two
    destinations in different token tiles (0 and 88 of a 10x10 grid) takes 0, and of the
    sources tied at the top score the lowest merge first."""
    x, metric, size = make(1, 100, (None, 8), device)
    metric[0, [88, 1, 21, 43, 65]] = metric[0, 0].clone()
    for r in (2, 3):
        plan = grid_match(metric, r, (10, 10), random_dst=False, backend=any_backend)
        merged = [t for t in (1, 21, 43, 65) if plan.token_map[0, t] == plan.token_map[0, 0]]
        assert merged == [1, 21, 43][:r]
        assert plan.token_map[0, 88] != plan.token_map[0, 0]
        expected = grid_match(metric, r, (10, 10), random_dst=False, backend="reference")
        assert torch.equal(plan.token_map, expected.token_map)


@pytest.mark.parametrize("backend_name", ["reference"] + ([] if ON_GPU else ["cpu"]))
def test_gradcheck_partition_plan(backend_name):
    x = torch.randn(2, 13, 3, dtype=torch.float64, requires_grad=True)
    size = (torch.rand(2, 13, 1, dtype=torch.float64) + 0.5).requires_grad_()
    keys = torch.randn(2, 2, 13, 4, dtype=torch.float64)
    plan = pitome_match(keys, 4, margin=0.2, class_token=True, backend=backend_name)
    assert plan.backend == backend_name and plan.r == 4
    assert torch.autograd.gradcheck(plan.merge_wavg, (x, size))
    window = window_match(torch.randn(2, 13, 4, dtype=torch.float64), 5, (3, 4), class_token=True, backend=backend_name)
    assert torch.autograd.gradcheck(window.merge_wavg, (x, size))
    for mode in MERGE_MODES:
        assert torch.autograd.gradcheck(lambda t: window.merge(t, mode), (x,))
    assert torch.autograd.gradcheck(window.unmerge, (x[:, : 13 - window.r].detach().requires_grad_(),))


def test_gradients_match_reference(backend, device):
    tokens, kind, make_plan = CASES["pitome_keys"]
    x, metric, size = make(2, tokens, kind, device)
    plan, expected = make_plan(metric, backend), make_plan(metric, "reference")
    grads = []
    # The plan, the reference's, and the reference's on float64 inputs: the truth.
    for p, dtype in ((plan, torch.float32), (expected, torch.float32), (expected, torch.float64)):
        xs, ss = x.to(dtype).requires_grad_(), size.to(dtype).requires_grad_()
        x_out, size_out = p.merge_wavg(xs, ss)
        weights = torch.linspace(-1, 1, x_out.numel(), device=device).view_as(x_out).to(dtype)
        mean_restored = p.unmerge(p.merge(xs, "mean"))
        loss = (x_out * weights).sum() + (size_out ** 2).sum() + (mean_restored ** 2).sum() + p.merge(xs, "amax").sum()
        grads.append(torch.autograd.grad(loss, (xs, ss)))
    assert all(want.abs().max() > 0 for want in grads[1])
    assert_within_twice_reference_error(*grads)


def test_repeated_runs_are_identical(backend, device):
    for name in ("pitome_keys", "grid_random"):
        tokens, kind, make_plan = CASES[name]
        x, metric, size = make(2, tokens, kind, device)
        first, second = make_plan(metric, backend), make_plan(metric, backend)
        assert torch.equal(first.token_map, second.token_map)
        for a, b in zip(first.merge_wavg(x, size), second.merge_wavg(x, size)):
            assert torch.equal(a, b)


def test_pitome_merge_is_match_then_merge(any_backend, device):
    x, metric, size = make(2, 23, (None, 8), device)
    got = pitome_merge(x, metric, 7, size, class_token=True, margin=0.4, backend=any_backend)
    plan = pitome_match(metric, 7, class_token=True, margin=0.4, backend=any_backend)
    assert torch.equal(got[0], plan.merge_wavg(x, size)[0]) and torch.equal(got[1], plan.merge_wavg(x, size)[1])
    assert pitome_merge(x, metric, 0)[0] is x


M = torch.randn(2, 16, 4, generator=seeded(1))
X = torch.randn(2, 16, 3, generator=seeded(2))


def _forbid_work(monkeypatch):
    """Every step that computes or draws anything records itself and fails if it runs;
    returns the record."""
    work = []

    def recorder(name):
        def record(*args, **kwargs):
            work.append(name)
            raise AssertionError(f"{name} ran before the bad input was reported")
        return record

    for module, names in ((methods.roles, ("pitome", "kth", "random", "grid", "windows")),
                          (partition, ("assign", "partition")), (energy, ("energy",)), (launch, ("assign", "energy"))):
        for name in names:
            monkeypatch.setattr(module, name, recorder(f"{module.__name__}.{name}"))
    return work


@pytest.mark.parametrize("call,error,pattern", [
    # wrong rank, wrong kind of tensor
    (lambda: pitome_match(torch.randn(16, 4), 2), ValueError, r"metric must have shape \(B, N, D\) or keys"),
    (lambda: pitome_match(M.long(), 2), TypeError, r"metric must be a floating-point tensor"),
    (lambda: pitome_merge(torch.randn(16, 3), M, 2), ValueError, r"x must have shape \(B, N, C\)"),
    (lambda: pitome_merge(torch.randn(2, 15, 3), M, 2), ValueError, r"x must have shape .*N=16"),
    (lambda: pitome_merge(X, M, 2, torch.ones(2, 16)), ValueError, r"size must have shape \(B, N, 1\)"),
    (lambda: kth_bipartite_match(torch.randn(1, 1, 2, 16, 4), 2), ValueError, r"metric must have shape"),
    (lambda: random_bipartite_match([[1.0]], 2), TypeError, r"metric must be a torch.Tensor"),
    (lambda: grid_match(torch.randn(16, 4), 2, (4, 4)), ValueError, r"metric must have shape"),
    (lambda: window_match(torch.randn(2, 16), 2, (4, 4)), ValueError, r"metric must have shape"),
    # r and k
    (lambda: pitome_match(M, -1), ValueError, r"r must be >= 0"),
    (lambda: pitome_match(M, 2.0), TypeError, r"r must be a Python int"),
    (lambda: pitome_merge(X, M, True), TypeError, r"r must be a Python int"),
    (lambda: random_bipartite_match(M, -2), ValueError, r"r must be >= 0"),
    (lambda: grid_match(M, 1.5, (4, 4)), TypeError, r"r must be a Python int"),
    (lambda: window_match(M, -1, (4, 4)), ValueError, r"r must be >= 0"),
    (lambda: kth_bipartite_match(M, -1), ValueError, r"k must be >= 0"),
    (lambda: kth_bipartite_match(M, 2.0), TypeError, r"k must be a Python int"),
    (lambda: kth_bipartite_match(M, True), TypeError, r"k must be a Python int"),
    # PiToMe's options
    (lambda: pitome_match(M, 2, margin=float("nan")), ValueError, r"margin must be finite"),
    (lambda: pitome_match(M, 2, margin="0.9"), TypeError, r"margin must be a real number"),
    (lambda: pitome_match(M, 2, alpha=float("inf")), ValueError, r"alpha must be finite"),
    (lambda: pitome_match(M, 2, energy_form=1), TypeError, r"energy_form must be a str"),
    (lambda: pitome_match(M, 2, split="pairs"), ValueError, r"split must be one of alternate, halves, bipartite"),
    (lambda: pitome_merge(X, M, 2, class_token=1), TypeError, r"class_token must be a bool"),
    (lambda: kth_bipartite_match(M, 2, distill_token="yes"), TypeError, r"distill_token must be a bool"),
    # grids, strides, windows, generators
    (lambda: grid_match(M, 2, (4, 5)), ValueError, r"grid_size 4x5 must have N=16"),
    (lambda: grid_match(M, 2, (4,)), TypeError, r"grid_size must be an int or a pair"),
    (lambda: grid_match(M, 2, (0, 16)), ValueError, r"grid_size must be positive"),
    (lambda: grid_match(M, 2, (4, 4), stride=(0, 2)), ValueError, r"stride must be positive"),
    (lambda: grid_match(M, 2, (4, 4), stride=(2, 2, 2)), TypeError, r"stride must be an int or a pair"),
    (lambda: grid_match(M, 2, (4, 4), stride=2.0), TypeError, r"stride must be an int or a pair"),
    (lambda: grid_match(M, 2, (4, 4), random_dst="no"), TypeError, r"random_dst must be a bool"),
    (lambda: grid_match(M, 2, (4, 4), generator=0), TypeError, r"generator must be a torch.Generator"),
    (lambda: random_bipartite_match(M, 2, generator="seed"), TypeError, r"generator must be a torch.Generator"),
    (lambda: window_match(M, 2, (4, 4), class_token=True), ValueError,
     r"grid_size 4x4 plus 1 protected tokens must make N=16"),
    (lambda: window_match(M, 2, 4, window=(2, -1)), ValueError, r"window must be positive"),
    (lambda: window_match(M, 2, 4, window="2x2"), TypeError, r"window must be an int or a pair"),
    # backends
    (lambda: pitome_match(M, 2, backend="nope"), ValueError, r"backend='nope' is not a backend"),
    (lambda: kth_bipartite_match(M, 2, backend=None), TypeError, r"backend must be a str"),
    (lambda: random_bipartite_match(M, 2, generator=seeded(), backend="nope"), ValueError, r"backend='nope'"),
    (lambda: grid_match(M, 2, (4, 4), generator=seeded(), backend="nope"), ValueError, r"backend='nope'"),
    (lambda: window_match(M, 2, (4, 4), backend="nope"), ValueError, r"backend='nope'"),
], ids=lambda v: None if callable(v) or isinstance(v, type) else v[:40])
def test_bad_input_raises_before_any_work(monkeypatch, call, error, pattern):
    """The error names the argument, and comes before any role is drawn (which would use up
    the generator) or any energy or assignment is computed."""
    work = _forbid_work(monkeypatch)
    with pytest.raises(error, match=pattern):
        call()
    assert work == []


@pytest.mark.parametrize("call", [
    lambda m, x: pitome_match(m, 2, backend="triton"),
    lambda m, x: pitome_merge(x, m, 2, backend="triton"),
    lambda m, x: kth_bipartite_match(m, 2, backend="triton"),
    lambda m, x: random_bipartite_match(m, 2, generator=seeded(), backend="triton"),
    lambda m, x: grid_match(m, 2, (4, 4), generator=seeded(), backend="triton"),
    lambda m, x: window_match(m, 2, (4, 4), backend="triton"),
])
def test_float64_on_triton_is_refused(monkeypatch, device, call):
    work = _forbid_work(monkeypatch)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs: .*not float64"):
        call(M.to(device, torch.float64), X.to(device, torch.float64))
    assert work == []


def test_bad_plan_input():
    plan = grid_match(M, 5, (4, 4), generator=seeded())
    with pytest.raises(ValueError, match=r"mode must be one of sum, mean, amax, amin"):
        plan.merge(X, "median")
    with pytest.raises(ValueError, match=r"x must have shape \(B, 16, C\)"):
        plan.merge_wavg(X[:, :15])
    with pytest.raises(ValueError, match=r"y must have shape \(B, 11, C\)"):
        plan.unmerge(X)


# The kernels themselves: best destination and energy against partition.assign and
# energy.energy, for a (1, N) roles tensor shared by the batch, windows, NaN rows, keys,
# D over 128 and rows of several token tiles.
def _roles_and_window(batch, tokens, device, per_row):
    g = seeded(7)
    roles = torch.randint(0, 3, (batch if per_row else 1, tokens), generator=g).to(device, torch.int8)
    window = torch.randint(0, 3, (1, tokens), generator=g).to(device, torch.int32)
    return roles, window


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("tokens,kind,per_row", [
    (9, (None, 8), True), (70, (2, 6), False), (21, (None, 140), True),
], ids=str)
def test_assign_and_energy_kernels(monkeypatch, device, tokens, kind, per_row):
    poison_triton_buffers(monkeypatch)
    triton = registry._REGISTRY["triton"]
    _, metric, _ = make(2, tokens, kind, device)
    rows = metric[:, 0] if metric.dim() == 4 else metric
    rows[1, 3] = NAN  # a NaN row: NaN scores never win, and are left out of the energy
    roles, window = _roles_and_window(2, tokens, device, per_row)
    for w in (None, window):
        best, dst = triton.assign(metric, roles, w)
        want_best, want_dst = partition.assign(metric, roles, w)
        assert torch.equal(dst, want_dst)
        assert_within_twice_reference_error(best, want_best, best_float64(metric, want_best, want_dst), msg="best")
        assert (dst >= 0).any() and (dst < 0).any()
    # Every form of f, each with a margin above most similarities (the paper's default) and
    # one inside their range (both branches of the paper and ELU forms).
    for form in energy.FORMS:
        for margin, alpha in ((0.9, 1.0), (0.1, 0.5)):
            got = triton.energy(metric, margin, alpha, form)
            assert_within_twice_reference_error(got, energy.energy(metric, margin, alpha, form),
                                                energy_float64(metric, margin, alpha, form), msg=f"energy {form}")
            assert got[1, 3] == float("-inf") and got.isfinite().sum() == 2 * tokens - 1


@pytest.mark.parametrize("which", ["assign", "assign_window", "energy"])
def test_opcheck_new_operators(device, which):
    _, metric, _ = make(2, 9, (2, 8), device)
    roles, window = _roles_and_window(2, 9, device, per_row=True)
    if which == "energy":
        for code in range(len(energy.FORMS)):
            torch.library.opcheck(triton_ops.energy, (metric, 0.5, 1.0, code))
    else:
        torch.library.opcheck(triton_ops.assign, (metric, roles, window if which == "assign_window" else None))


def test_energy_operator_refuses_an_unknown_form(device):
    """The kernel would read an unknown code as the paper's f: the operator refuses it."""
    _, metric, _ = make(2, 9, (None, 8), device)
    for code in (-1, len(energy.FORMS)):
        with pytest.raises(ValueError, match=rf"form must be the code of one of .*, got {code}"):
            triton_ops.energy(metric, 0.5, 1.0, code)


def test_pitome_real_mask_is_checked():
    metric = torch.randn(2, 9, 4)
    with pytest.raises(TypeError, match="real"):
        pitome_match(metric, 2, real=torch.ones(2, 9))
    with pytest.raises(ValueError, match="real"):
        pitome_match(metric, 2, real=torch.ones(2, 8, dtype=torch.bool))
    # All tokens real: the same plan as without the mask.
    plain = pitome_match(metric, 2, backend="reference")
    masked = pitome_match(metric, 2, real=torch.ones(2, 9, dtype=torch.bool), backend="reference")
    assert torch.equal(plain.token_map, masked.token_map)


# NumPy, running Triton's interpreter, warns when a NaN row is normalised: expected here.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("split", ["alternate", "halves", "bipartite"])
def test_pitome_real_mask_ranks_padding_last(any_backend, device, split):
    """Padding whose metric rows are not NaN (one pad vector), or a real token whose row is
    NaN next to NaN padding, must not take a rank among a row's real pairs: that left the
    row without a destination (token_map -1 on reference and cpu, wrong sizes on Triton).
    Every plan is a valid grouping: the class token kept, r fewer rows, each merged by size."""
    nan = float("nan")
    rows = [
        (torch.tensor([[1., 0], [0, 1], [1, 1], [-1, 0], [-1, 0]]), [True, True, True, False, False], True),
        (torch.tensor([[nan, nan], [1., 0], [nan, nan]]), [False, True, True], False),
    ]
    g = seeded(4)
    pad = torch.randn(2, generator=g)
    random_rows = torch.randn(4, 12, 2, generator=g)
    random_rows[:, 8:] = pad  # four padding tokens, one pad vector
    rows += [(random_rows[b], [True] * 8 + [False] * 4, True) for b in range(4)]
    for metric, real, class_token in rows:
        metric, real = metric[None].to(device), torch.tensor([real], device=device)
        plan = pitome_match(metric, 1, real=real, class_token=class_token, split=split, backend=any_backend)
        n = metric.shape[1]
        assert plan.r == 1 and sorted(set(plan.token_map[0].tolist())) == list(range(n - 1)), plan.token_map
        if class_token:
            assert (plan.token_map[0] == plan.token_map[0, 0]).sum() == 1  # the class token alone
        x = torch.randn(1, n, 3, generator=g).to(device)
        _, size = plan.merge_wavg(x, None)
        assert size.sum().item() == n and size.shape[1] == n - 1
