"""The native kernels of the methods beyond ToMe: ``torch.ops.tome_native.assign`` and
``.energy`` (every form of PiToMe's f) on the "cpu" extension against their references
(``partition.assign``, ``energy.energy``), in float32 and, for float64 metrics, in float64;
their argument checks and torch.library registration, and the public methods giving the
same plans on backend="cpu" as on backend="reference".

The CUDA kernels of the same operators are compiled in test_cuda_compile.py; on a GPU they
run through the same public functions.
"""

import numpy as np
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
FORMS = energy_ref.FORMS


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
    """The operator's dst equal the reference's, and its best within the tolerance rule, in
    the reference's scoring dtype (float32 for a float32 metric, float64 for float64)."""
    best, dst = OPS.assign(metric, roles, window)
    want_best, want_dst = partition.assign(metric, roles, window)
    assert best.dtype == want_best.dtype and dst.dtype == torch.int64
    assert torch.equal(dst, want_dst)
    assert_within_twice_reference_error(best, want_best, best_truth(metric, want_best, want_dst), msg="best")
    return best, dst


def assert_energy_equal(metric, margin, alpha, form):
    """The operator's energy within the tolerance rule, in the reference's scoring dtype."""
    got = OPS.energy(metric, margin, alpha, FORMS.index(form))
    want = energy_ref.energy(metric, margin, alpha, form)
    assert got.dtype == want.dtype
    assert_within_twice_reference_error(got, want, energy_truth(metric, margin, alpha, form), msg=form)
    return got


# The float64 paths' truth: the float64 reference is the path they are measured against, so
# their truth is computed in NumPy's long double (64 bits of mantissa on x86-64, 113 on
# aarch64), then rounded to float64.
EXTENDED = np.finfo(np.longdouble).eps < np.finfo(np.float64).eps
needs_extended = pytest.mark.skipif(not EXTENDED, reason="NumPy's long double is no wider than float64 here, "
                                    "so there is no truth finer than the float64 reference")


def unit_rows_extended(metric):
    """``reference.normalized_metric`` in long double: head mean, rows divided by
    max(norm, 1e-12)."""
    m = metric.detach().to(torch.float64).numpy().astype(np.longdouble)
    if m.ndim == 4:
        m = m.sum(axis=1) / m.shape[1]
    return m / np.maximum(np.sqrt((m * m).sum(axis=-1, keepdims=True)), np.longdouble(1e-12))


def energy_extended(metric, margin, alpha, form):
    """energy.energy_of_similarity's formula in long double, NaN similarities left out of the
    mean (-inf where none is left), rounded to float64 at the end."""
    u = unit_rows_extended(metric)
    sim = u @ np.swapaxes(u, -1, -2)
    margin, alpha = np.longdouble(margin), np.longdouble(alpha)
    with np.errstate(invalid="ignore"):
        if form == "gaussian":
            f = np.exp(-0.5 * ((1 - sim) / (1 - margin)) ** 2)
        else:
            f = np.where(sim >= margin, sim - margin if form == "elu" else sim, alpha * np.expm1(sim - margin))
    valid = ~np.isnan(sim)
    count = valid.sum(axis=-1)
    total = np.where(valid, f, 0).sum(axis=-1)
    mean = np.where(count > 0, total / np.maximum(count, 1), -np.inf)
    return torch.from_numpy(mean.astype(np.float64))


def best_extended(metric, best, dst):
    """best_float64 in long double: the cosine of each source with its given destination,
    -inf where best is -inf."""
    u = unit_rows_extended(metric)
    chosen = np.take_along_axis(u, dst.clamp_min(0).numpy()[..., None], axis=1)
    cosine = torch.from_numpy((u * chosen).sum(axis=-1).astype(np.float64))
    return torch.where(best.isfinite(), cosine, best.to(torch.float64))


def energy_truth(metric, margin, alpha, form):
    """The truth of the energy of a metric: float64 for a metric scored in float32, long
    double for a float64 one."""
    if metric.dtype == torch.float64:
        return energy_extended(metric, margin, alpha, form)
    return energy_float64(metric, margin, alpha, form)


def best_truth(metric, best, dst):
    """The truth of assign's best, as energy_truth."""
    if metric.dtype == torch.float64:
        return best_extended(metric, best, dst)
    return best_float64(metric, best, dst)


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
@pytest.mark.parametrize("form", FORMS)
def test_energy_matches_the_reference(shape, form):
    batch, n, heads, d = shape
    for contiguous in (True, False):
        metric = make_metric(batch, n, heads, d, contiguous=contiguous)
        # A margin inside the range of the similarities, so both branches of the paper and
        # ELU forms are taken (the Gaussian's sigma is then 0.9 and 1.2).
        for margin, alpha in ((0.1, 1.0), (-0.2, 2.5)):
            assert assert_energy_equal(metric, margin, alpha, form).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_score_as_the_reference(dtype):
    metric = make_metric(2, 57, 2, 16, dtype)
    roles, window = make_roles(2, 57, False, False)
    assert_assign_equal(metric, roles, window)
    for form in FORMS:
        assert assert_energy_equal(metric, 0.05, 1.0, form).dtype == torch.float32


@needs_extended
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float64_metrics_score_in_float64(shape):
    """A float64 metric is scored in float64 as the reference scores it: best and energy are
    float64, dst equal, and both within the rule against a long-double truth (twice the float64
    reference's own error plus a few float64 ulps)."""
    batch, n, heads, d = shape
    roles, window = make_roles(batch, n, False, True)
    for contiguous in (True, False):
        metric = make_metric(batch, n, heads, d, torch.float64, contiguous=contiguous)
        for w in (None, window):
            best, _ = assert_assign_equal(metric, roles, w)
            assert best.dtype == torch.float64
        for form in FORMS:
            for margin, alpha in ((0.1, 1.0), (-0.2, 2.5)):
                assert assert_energy_equal(metric, margin, alpha, form).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float64, marks=needs_extended)])
def test_nan_rows(dtype):
    """A NaN metric row makes all its similarities NaN: a NaN destination still beats no
    destination (best -inf, dst the first allowed NaN one); NaN terms leave the energy's mean."""
    metric = make_metric(2, 12, None, 6, dtype)
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
    for form in FORMS:
        energy = assert_energy_equal(metric, 0.1, 1.0, form)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_inputs(dtype):
    for batch, n in ((0, 5), (3, 0), (0, 0)):
        metric = torch.randn(batch, n, 4, dtype=dtype)
        best, dst = OPS.assign(metric, torch.zeros(1, n, dtype=torch.int8), None)
        assert best.shape == dst.shape == (batch, n) and best.dtype == dtype and dst.dtype == torch.int64
        for code in range(len(FORMS)):
            energy = OPS.energy(metric, 0.5, 1.0, code)
            assert energy.shape == (batch, n) and energy.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_bits_for_any_thread_count(dtype):
    metric = make_metric(3, 300, 2, 16, dtype)
    roles, window = make_roles(3, 300, False, True)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            energies = [OPS.energy(metric, 0.1, 1.0, code) for code in range(len(FORMS))]
            results.append((*OPS.assign(metric, roles, window), *energies))
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
    for code in range(len(FORMS)):
        torch.library.opcheck(OPS.energy.default, (metric, 0.3, 1.0, code))
    # float64 metrics: float64 best and energy, which the fakes must say.
    torch.library.opcheck(OPS.assign.default, (metric.double(), roles, window))
    torch.library.opcheck(OPS.energy.default, (metric.double(), 0.3, 1.0, FORMS.index("gaussian")))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m, r, w: OPS.assign(m, r.long(), None), TypeError, r"roles must be Char"),
        (lambda m, r, w: OPS.assign(m, r, w.long()), TypeError, r"window must be Int"),
        (lambda m, r, w: OPS.assign(m, r[:, :5], None), ValueError, r"roles must be \(B, N\) or \(1, N\)"),
        (lambda m, r, w: OPS.assign(m, r, w.expand(3, -1)), ValueError, r"window must be \(B, N\) or \(1, N\)"),
        (lambda m, r, w: OPS.assign(m[0, 0], r, None), ValueError, r"metric must be \(B, N, D\)"),
        (lambda m, r, w: OPS.energy(m.int(), 0.5, 1.0, 1), TypeError, r"metric must be float16"),
        (lambda m, r, w: OPS.energy(m[:, :0], 0.5, 1.0, 1), ValueError, r"at least one head"),
        (lambda m, r, w: OPS.energy(m, 0.5, 1.0, 3), ValueError, r"form must be 0 \(paper\), 1 \(elu\) or 2 "
         r"\(gaussian\), got 3"),
        (lambda m, r, w: OPS.energy(m, 0.5, 1.0, -1), ValueError, r"form must be .*, got -1"),
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
        "pitome_paper": tome_kernels.pitome_match(keys, 5, margin=0.0, alpha=2.0, energy_form="paper",
                                                   backend=backend),
        "pitome_text": tome_kernels.pitome_match(keys, 6, margin=0.5, energy_form="gaussian", split="halves",
                                                 class_token=True, backend=backend),
        "pitome_bipartite": tome_kernels.pitome_match(keys, 8, margin=0.2, split="bipartite", class_token=True,
                                                      backend=backend),
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
