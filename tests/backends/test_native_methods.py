"""The native kernels of the methods beyond ToMe: ``torch.ops.tome_native.assign`` and
``.energy`` on the "cpu" extension against their references (``partition.assign``,
``energy.energy``), their argument checks and torch.library registration, and the public
methods giving the same plans on backend="cpu" as on backend="reference".

The CUDA kernels of the same operators are compiled in test_cuda_compile.py; on a GPU they
run through the same public functions.
"""

import pytest
import torch

import tome_kernels
from tests.helpers import assert_within_twice_reference_error, best_float64, energy_float64
from tome_kernels.reference import energy as energy_ref
from tome_kernels.reference import partition
from tome_kernels.reference.partition import DEST, KEEP, SOURCE

# The "cpu" extension must load (conftest.py): a build failure fails these tests.
pytestmark = pytest.mark.usefixtures("cpu_extension")

OPS = torch.ops.tome_native
NAN = float("nan")


def make_metric(batch, n, heads, d, dtype=torch.float32, contiguous=True, seed=0):
    """(B, N, D) features, or keys (B, H, N, D) when heads is given; non-contiguous ones have
    their features strided (stored as (B, [H,] D, N))."""
    g = torch.Generator().manual_seed(seed)
    lead = (batch,) if heads is None else (batch, heads)
    if contiguous:
        return torch.randn(*lead, n, d, generator=g).to(dtype)
    return torch.randn(*lead, d, n, generator=g).to(dtype).transpose(-1, -2)


def make_roles(batch, n, shared, windowed, seed=0):
    """roles int8 and window ids int32, (1, N) when shared by the batch, else (B, N) stored
    transposed (non-contiguous); window None unless windowed."""
    g = torch.Generator().manual_seed(seed + 1)
    rows = 1 if shared else batch
    roles = torch.randint(0, 3, (n, rows), generator=g).to(torch.int8).t()
    window = torch.randint(0, 4, (n, rows), generator=g).to(torch.int32).t() if windowed else None
    return roles, window


def assert_assign_equal(metric, roles, window):
    best, dst = OPS.assign(metric, roles, window)
    want_best, want_dst = partition.assign(metric, roles, window)
    assert best.dtype == torch.float32 and dst.dtype == torch.int64
    assert torch.equal(dst, want_dst)
    assert_within_twice_reference_error(best, want_best, best_float64(metric, want_best, want_dst), msg="best")
    return best, dst


# (B, N, heads or None, D): odd N, N = 1, an empty batch, keys, D over 128, and N above the
# 128-row tile (more than one tile of sources).
SHAPES = [(2, 9, None, 8), (3, 1, None, 5), (0, 7, None, 4), (2, 33, 3, 16), (1, 41, None, 300), (2, 400, 2, 24)]


@pytest.mark.parametrize("windowed", [False, True], ids=["no_window", "window"])
@pytest.mark.parametrize("shared", [False, True], ids=["roles_BN", "roles_1N"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_assign_matches_the_reference(shape, shared, windowed):
    batch, n, heads, d = shape
    roles, window = make_roles(batch, n, shared, windowed)
    for contiguous in (True, False):
        assert_assign_equal(make_metric(batch, n, heads, d, contiguous=contiguous), roles, window)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("shifted", [False, True])
def test_energy_matches_the_reference(shape, shifted):
    batch, n, heads, d = shape
    for contiguous in (True, False):
        metric = make_metric(batch, n, heads, d, contiguous=contiguous)
        # A margin inside the range of the similarities, so both branches of f are taken.
        for margin, alpha in ((0.1, 1.0), (-0.2, 2.5)):
            got = OPS.energy(metric, margin, alpha, shifted)
            assert got.dtype == torch.float32
            assert_within_twice_reference_error(got, energy_ref.energy(metric, margin, alpha, shifted),
                                                energy_float64(metric, margin, alpha, shifted))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_score_as_the_reference(dtype):
    metric = make_metric(2, 57, 2, 16, dtype)
    roles, window = make_roles(2, 57, False, False)
    assert_assign_equal(metric, roles, window)
    assert_within_twice_reference_error(OPS.energy(metric, 0.05, 1.0, False),
                                        energy_ref.energy(metric, 0.05, 1.0, False),
                                        energy_float64(metric, 0.05, 1.0, False))


def test_nan_rows():
    """A NaN metric row makes all its similarities NaN: a NaN destination still beats no
    destination (best -inf, dst the first allowed NaN one); NaN terms leave the energy's mean."""
    metric = make_metric(2, 12, None, 6)
    metric[0, [3, 9]] = NAN  # destinations
    metric[0, 7] = NAN  # a source
    metric[1, :] = NAN  # a whole batch row
    roles = torch.tensor([[SOURCE, DEST, SOURCE, DEST, SOURCE, KEEP, DEST, SOURCE, SOURCE, DEST, KEEP, SOURCE]],
                         dtype=torch.int8)
    # Window 1 holds the NaN destination 3 and the real one 6, window 2 only the NaN
    # destination 9, windows 0 and 3 none.
    window = torch.tensor([[1, 5, 0, 1, 5, 0, 1, 1, 2, 2, 0, 3]], dtype=torch.int32)
    best, dst = assert_assign_equal(metric, roles, None)
    assert dst[0, 7] == 1 and best[0, 7] == float("-inf")  # a NaN source: the first destination
    assert (dst[1, roles[0] == SOURCE] == 1).all() and (best[1] == float("-inf")).all()
    best, dst = assert_assign_equal(metric, roles, window)
    assert dst[0, 0] == 6 and best[0, 0] > -1.5  # a real score beats the NaN destination 3
    assert dst[0, 8] == 9 and best[0, 8] == float("-inf")  # only a NaN destination allowed
    assert dst[0, 7] == 3  # all allowed scores NaN: the first allowed destination
    assert dst[0, 2] == -1 and dst[0, 11] == -1  # no destination in the window
    energy = OPS.energy(metric, 0.1, 1.0, False)
    assert_within_twice_reference_error(energy, energy_ref.energy(metric, 0.1, 1.0, False),
                                        energy_float64(metric, 0.1, 1.0, False))
    assert (energy[0, [3, 7, 9]] == float("-inf")).all() and (energy[1] == float("-inf")).all()
    assert torch.isfinite(energy[0, [0, 1, 2, 4, 5, 6, 8, 10, 11]]).all()


def test_exact_ties_go_to_the_lowest_index():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 8, generator=g)
    # Destinations 2, 5 and 9 are the same row, so every source scores them equally; with
    # windows, 2 is in another window than the sources.
    metric = base[[0, 1, 2, 3, 0, 2, 1, 3, 0, 2]][None]
    roles = torch.tensor([[SOURCE, SOURCE, DEST, SOURCE, SOURCE, DEST, SOURCE, SOURCE, SOURCE, DEST]], dtype=torch.int8)
    window = torch.tensor([[0, 0, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    _, dst = assert_assign_equal(metric, roles, None)
    assert (dst[0, roles[0] == SOURCE] == 2).all()
    _, dst = assert_assign_equal(metric, roles, window)
    assert (dst[0, roles[0] == SOURCE] == 5).all()


def test_empty_inputs():
    for batch, n in ((0, 5), (3, 0), (0, 0)):
        metric = torch.randn(batch, n, 4)
        best, dst = OPS.assign(metric, torch.zeros(1, n, dtype=torch.int8), None)
        assert best.shape == dst.shape == (batch, n) and best.dtype == torch.float32 and dst.dtype == torch.int64
        assert OPS.energy(metric, 0.5, 1.0, True).shape == (batch, n)


def test_same_bits_for_any_thread_count():
    metric = make_metric(3, 300, 2, 16)
    roles, window = make_roles(3, 300, False, True)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((*OPS.assign(metric, roles, window), OPS.energy(metric, 0.1, 1.0, False)))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_opcheck():
    metric = make_metric(2, 13, 2, 8)
    roles, window = make_roles(2, 13, False, True)
    shared, _ = make_roles(2, 13, True, False)
    torch.library.opcheck(OPS.assign.default, (metric, roles, window))
    torch.library.opcheck(OPS.assign.default, (metric[:, 0], shared, None))
    torch.library.opcheck(OPS.energy.default, (metric, 0.3, 1.0, True))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m, r, w: OPS.assign(m, r.long(), None), TypeError, r"roles must be Char"),
        (lambda m, r, w: OPS.assign(m, r, w.long()), TypeError, r"window must be Int"),
        (lambda m, r, w: OPS.assign(m, r[:, :5], None), ValueError, r"roles must be \(B, N\) or \(1, N\)"),
        (lambda m, r, w: OPS.assign(m, r, w.expand(3, -1)), ValueError, r"window must be \(B, N\) or \(1, N\)"),
        (lambda m, r, w: OPS.assign(m[0, 0], r, None), ValueError, r"metric must be \(B, N, D\)"),
        (lambda m, r, w: OPS.energy(m.int(), 0.5, 1.0, False), TypeError, r"metric must be float16"),
        (lambda m, r, w: OPS.energy(m[:, :0], 0.5, 1.0, False), ValueError, r"at least one head"),
    ],
)
def test_operators_check_their_arguments(call, error, message):
    metric = make_metric(2, 9, 2, 4)
    roles, window = make_roles(2, 9, True, True)
    with pytest.raises(error, match=message):
        call(metric, roles, window)


def _plans(backend):
    """The token map of every public method on the same inputs."""
    keys = make_metric(2, 1 + 36, 3, 16, seed=5)
    features = make_metric(2, 64, None, 12, seed=6)
    return {
        "pitome": tome_kernels.pitome_match(keys, 9, margin=0.1, class_token=True, backend=backend),
        "pitome_shifted": tome_kernels.pitome_match(keys, 5, margin=0.0, alpha=2.0, shifted=True, backend=backend),
        "kth": tome_kernels.kth_bipartite_match(keys, 3, class_token=True, backend=backend),
        "random": tome_kernels.random_bipartite_match(
            keys, 11, generator=torch.Generator().manual_seed(1), class_token=True, backend=backend
        ),
        "grid": tome_kernels.grid_match(features, 20, (8, 8), generator=torch.Generator().manual_seed(2),
                                        backend=backend),
        "window": tome_kernels.window_match(keys, 7, (6, 6), window=(2, 3), class_token=True, backend=backend),
    }


def test_public_methods_make_the_reference_plans(monkeypatch):
    expected = {name: plan.token_map for name, plan in _plans("reference").items()}
    # The cpu backend must use its own kernels, not the inherited plain-torch ones.
    def unreachable(*args, **kwargs):
        raise AssertionError("the cpu backend called the plain-torch reference")

    monkeypatch.setattr(partition, "assign", unreachable)
    monkeypatch.setattr(energy_ref, "energy", unreachable)
    for name, plan in _plans("cpu").items():
        assert plan.backend == "cpu", name
        assert torch.equal(plan.token_map, expected[name]), name
