"""The methods' plans against naive oracles written from their definitions.

Each oracle is a plain Python loop over one batch row, written from the docstrings of
``tome_kernels.methods`` (and the papers they cite), not from ``partition.py``: it lists the
output rows of a row as groups of input tokens, in output order. Like ``oracle.py`` it shares
only the float32 cosine scores with the package (``normalized_metric`` then one matrix
product, what every method scores with), so both see bitwise the same scores, ties included;
everything else is float64 Python.
"""

import math

import pytest
import torch

from tests.helpers import assert_within_twice_reference_error, energy_float64
from tome_kernels import (
    grid_match,
    kth_bipartite_match,
    methods,
    pitome_match,
    random_bipartite_match,
    reference,
    window_match,
)
from tome_kernels.reference import energy as energy_module
from tome_kernels.reference import partition, roles

from .oracle import token_map_of

NAN = float("nan")


def scores_of(metric):
    m = reference.normalized_metric(metric).float()
    return m @ m.transpose(-1, -2)


def oracle_energy(scores_row, margin, alpha, form, protected=0):
    """PiToMe's energy of every unprotected token: the mean over the unprotected tokens j of
    f(cos), NaN left out (energies of protected tokens are None)."""
    n = scores_row.shape[0]
    energies = [None] * protected
    for i in range(protected, n):
        values = []
        for j in range(protected, n):
            s = float(scores_row[i, j])
            if math.isnan(s):
                continue
            if form == "gaussian":
                values.append(math.exp(-0.5 * ((1 - s) / (1 - margin)) ** 2))
            elif s >= margin:
                values.append(s - margin if form == "elu" else s)
            else:
                values.append(alpha * (math.exp(s - margin) - 1.0))
        energies.append(sum(values) / len(values) if values else -math.inf)
    return energies


def best_destination(scores_row, source, destinations):
    """(score, token) of the most similar destination: NaN never wins, ties to the lower
    index; a source whose scores are all NaN goes to the first destination at -inf."""
    top, arg = -math.inf, None
    for j in sorted(destinations):
        s = float(scores_row[source, j])
        if not math.isnan(s) and s > top:
            top, arg = s, j
    return top, (arg if arg is not None else min(destinations))


def groups_from(n, merged_into):
    """Output rows: every token not merged, in token order, with the sources merged into it."""
    kept = [t for t in range(n) if t not in merged_into]
    rows = {t: [t] for t in kept}
    for source, dst in sorted(merged_into.items()):
        rows[dst].append(source)
    return [sorted(rows[t]) for t in kept]


def merge_best(scores_row, n, sources, destinations_of, r):
    """Each source's best destination, then the r sources of highest score merge (ties to
    the lower index)."""
    best = {s: best_destination(scores_row, s, destinations_of(s)) for s in sources}
    chosen = sorted(sources, key=lambda s: (-best[s][0], s))[:r]
    return groups_from(n, {s: best[s][1] for s in chosen})


def pitome_oracle(scores_row, r, protected, margin, alpha, form):
    n = scores_row.shape[0]
    r = max(0, min(r, (n - protected) // 2))
    if r == 0:
        return [[t] for t in range(n)]
    energy = oracle_energy(scores_row, margin, alpha, form, protected)
    ranked = sorted(range(protected, n), key=lambda t: (-energy[t], t))[: 2 * r]
    a, b = ranked[0::2], ranked[1::2]
    return merge_best(scores_row, n, a, lambda s: b, r)


def kth_oracle(scores_row, k, protected):
    n = scores_row.shape[0]
    free = list(range(protected, n))
    if k <= 1 or len(free) < k:
        return [[t] for t in range(n)]
    dst = [t for p, t in enumerate(free) if p % k == k - 1]
    src = [t for t in free if t not in dst]
    return merge_best(scores_row, n, src, lambda s: dst, len(src))


def grid_destinations(height, width, stride, generator):
    """One destination per whole stride window: a random offset drawn as tomesd draws it
    (``randint(sy * sx)`` per window, row-major), or the top-left token without a generator."""
    sy, sx = stride
    rows, cols = height // sy, width // sx
    if generator is None:
        offsets = [[0] * cols for _ in range(rows)]
    else:
        offsets = torch.randint(sy * sx, (rows, cols, 1), generator=generator).squeeze(-1).tolist()
    return [
        (wy * sy + offsets[wy][wx] // sx) * width + wx * sx + offsets[wy][wx] % sx
        for wy in range(rows) for wx in range(cols)
    ]


def grid_oracle(scores_row, r, height, width, stride, generator):
    n = height * width
    dst = grid_destinations(height, width, stride, generator)
    if not dst:
        return [[t] for t in range(n)]
    src = [t for t in range(n) if t not in dst]
    return merge_best(scores_row, n, src, lambda s: dst, min(r, len(src)))


def window_oracle(scores_row, r, protected, height, width, window):
    wy, wx = window
    rows, cols = height // wy, width // wx
    n = protected + height * width
    top_left, src = {}, []
    for y in range(rows * wy):
        for x in range(cols * wx):
            token = protected + y * width + x
            if y % wy == 0 and x % wx == 0:
                top_left[(y // wy, x // wx)] = token
            else:
                src.append(token)

    def own_window(s):
        y, x = divmod(s - protected, width)
        return [top_left[(y // wy, x // wx)]]

    return merge_best(scores_row, n, src, own_window, min(r, len(src)))


def assert_plan(plan, groups_per_row, n):
    assert plan.r == n - len(groups_per_row[0])
    assert torch.equal(plan.token_map, token_map_of(groups_per_row, n))


def random_metric(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def min_gap(values):
    """The smallest distance between two finite values: energies closer than float32
    rounding could rank differently here and in the package (which sums in float32)."""
    finite = sorted(v for v in values if v is not None and v != -math.inf)
    return min((b - a for a, b in zip(finite, finite[1:])), default=math.inf)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shape,r,flags,options", [
    ((2, 14, 6), 4, {}, {}),
    ((2, 15, 6), 5, dict(class_token=True), dict(margin=0.2, alpha=0.5)),
    ((1, 2, 13, 5), 6, dict(class_token=True, distill_token=True), dict(margin=0.1, energy_form="paper")),
    ((3, 9, 4), 100, dict(class_token=True), dict(margin=-0.3, alpha=2.0, energy_form="paper")),
    ((2, 16, 7), 5, dict(class_token=True), dict(margin=0.4, energy_form="gaussian")),
], ids=str)
def test_pitome_matches_its_oracle(backend, shape, r, flags, options):
    metric = random_metric(shape, seed=sum(shape) + r)
    f = dict(margin=options.get("margin", 0.9), alpha=options.get("alpha", 1.0), form=options.get("energy_form", "elu"))
    protected = len(flags)
    scores = scores_of(metric)
    plan = pitome_match(metric, r, **flags, **options, backend=backend)
    unprotected = metric[..., protected:, :]
    expected = []
    for b in range(shape[0]):
        energy = oracle_energy(scores[b], f["margin"], f["alpha"], f["form"], protected)
        assert min_gap(energy) > 1e-5, "the test metric has a near-tie in energy; choose another seed"
        # The oracle's exact mean of the same float32 scores, rounded once, is the reference
        # path; the truth is the energy of the metric in float64 throughout.
        assert_within_twice_reference_error(energy_module.energy(unprotected, **f)[b],
                                            torch.tensor(energy[protected:], dtype=torch.float32),
                                            energy_float64(unprotected, **f)[b])
        expected.append(pitome_oracle(scores[b], r, protected, f["margin"], f["alpha"], f["form"]))
    assert_plan(plan, expected, metric.shape[-2])


def test_pitome_energy_ties_and_nan_rows():
    """A duplicated row ties in energy (the lower index ranks first); a NaN row has energy
    -inf, ranks last and is left out of the other tokens' means."""
    metric = random_metric((1, 12, 5), seed=3)
    metric[0, 7] = metric[0, 2]
    metric[0, 4] = NAN
    scores = scores_of(metric)
    energy = oracle_energy(scores[0], 0.5, 1.0, "elu")
    assert energy[4] == -math.inf and energy[2] == energy[7]
    for r in (2, 3, 5, 6):
        plan = pitome_match(metric, r, margin=0.5, backend="reference")
        assert_plan(plan, [pitome_oracle(scores[0], r, 0, 0.5, 1.0, "elu")], 12)
    # r = 6 makes all 12 tokens mergeable: the NaN row ranks last, is a destination, and
    # no source prefers it.
    plan = pitome_match(metric, 6, margin=0.5, backend="reference")
    assert (plan.token_map[0] == plan.token_map[0, 4]).sum() == 1


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_exact_ties_go_to_the_lower_index(backend):
    """Copies of a row score bitwise alike: a source tied between two destinations takes
    the lower one, and sources tied in score merge in token order."""
    metric = random_metric((1, 16, 4), seed=1)
    metric[0, 2] = metric[0, 0]  # destinations 0 and 2 (top-left of their 2x2 windows) tie
    metric[0, [5, 6, 7, 13]] = metric[0, 0].clone()  # four sources tied at the top score
    scores = scores_of(metric)
    for r in (1, 2, 3, 6):
        plan = grid_match(metric, r, (4, 4), random_dst=False, backend=backend)
        assert_plan(plan, [grid_oracle(scores[0], r, 4, 4, (2, 2), None)], 16)
        merged = [t for t in (5, 6, 7, 13) if plan.token_map[0, t] == plan.token_map[0, 0]]
        assert merged == [5, 6, 7, 13][:r]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("n,k,flags", [
    (13, 2, {}), (14, 3, dict(class_token=True)), (12, 4, dict(class_token=True, distill_token=True)),
    (5, 1, {}), (4, 5, {}), (7, 7, dict(class_token=True)),
], ids=str)
def test_kth_matches_its_oracle(backend, n, k, flags):
    metric = random_metric((2, n, 4), seed=n + k)
    scores = scores_of(metric)
    plan = kth_bipartite_match(metric, k, **flags, backend=backend)
    assert_plan(plan, [kth_oracle(scores[b], k, len(flags)) for b in range(2)], n)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("grid,r,stride,random_dst", [
    ((6, 6), 10, (2, 2), True), ((5, 7), 14, (2, 2), True), ((4, 6), 100, (2, 3), False), ((7, 5), 9, (3, 2), True),
    ((3, 3), 4, (1, 1), True), ((1, 5), 3, (2, 2), True),
], ids=str)
def test_grid_matches_its_oracle(backend, grid, r, stride, random_dst):
    n = grid[0] * grid[1]
    metric = random_metric((2, n, 4), seed=n + r)
    scores = scores_of(metric)
    plan = grid_match(metric, r, grid, stride=stride, random_dst=random_dst,
                      generator=torch.Generator().manual_seed(r), backend=backend)
    # One draw for the whole batch, from a generator seeded alike.
    expected = [grid_oracle(scores[b], r, *grid, stride, torch.Generator().manual_seed(r) if random_dst else None)
                for b in range(2)]
    assert_plan(plan, expected, n)


def test_grid_random_offsets_cover_the_window():
    """Over a few seeds every offset of a 2x2 window is drawn, and the plan follows the
    generator's draw each time."""
    metric = random_metric((1, 16, 4), seed=0)
    scores = scores_of(metric)
    seen = set()
    for seed in range(24):
        seen.add(grid_destinations(4, 4, (2, 2), torch.Generator().manual_seed(seed))[0])
        plan = grid_match(metric, 7, (4, 4), generator=torch.Generator().manual_seed(seed), backend="reference")
        assert_plan(plan, [grid_oracle(scores[0], 7, 4, 4, (2, 2), torch.Generator().manual_seed(seed))], 16)
    assert seen == {0, 1, 4, 5}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("grid,r,window,flags", [
    ((4, 4), 5, (2, 2), dict(class_token=True)), ((5, 7), 100, (2, 3), {}),
    ((6, 4), 7, (3, 2), dict(class_token=True, distill_token=True)), ((1, 4), 2, (2, 2), {}),
], ids=str)
def test_window_matches_its_oracle(backend, grid, r, window, flags):
    n = len(flags) + grid[0] * grid[1]
    metric = random_metric((2, n, 4), seed=n + r)
    metric[1, len(flags) + 1] = NAN  # a source with no finite score merges last, at -inf
    scores = scores_of(metric)
    plan = window_match(metric, r, grid, window=window, **flags, backend=backend)
    assert_plan(plan, [window_oracle(scores[b], r, len(flags), *grid, window) for b in range(2)], n)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("n,r,flags", [
    (12, 4, {}), (13, 6, dict(class_token=True)), (9, 100, dict(class_token=True, distill_token=True)),
], ids=str)
def test_random_matches_its_oracle(monkeypatch, backend, n, r, flags):
    """The draw itself is random; what is checked: the sources are exactly r unprotected
    tokens per batch row, every other unprotected token is a destination, and each source
    merges into its most similar destination."""
    drawn, draw = [], roles.random

    def spy(*args, **kwargs):
        drawn.append(draw(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(methods.roles, "random", spy)
    metric = random_metric((3, n, 4), seed=n)
    scores = scores_of(metric)
    protected = len(flags)
    plan = random_bipartite_match(metric, r, **flags, generator=torch.Generator().manual_seed(5), backend=backend)
    (role,) = drawn
    r = min(r, (n - protected) // 2)
    expected = []
    for b in range(3):
        src = [t for t in range(n) if role[b, t] == partition.SOURCE]
        dst = [t for t in range(n) if role[b, t] == partition.DEST]
        assert len(src) == r and min(src) >= protected
        assert sorted(src + dst) == list(range(protected, n))
        expected.append(merge_best(scores[b], n, src, lambda s: dst, r))
    assert_plan(plan, expected, n)
    # Per batch row draws (the rows differ), repeatable from the generator's seed.
    assert len({tuple(role[b].tolist()) for b in range(3)}) > 1
    again = random_bipartite_match(metric, r, **flags, generator=torch.Generator().manual_seed(5), backend=backend)
    assert torch.equal(again.token_map, plan.token_map)
