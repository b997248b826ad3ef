"""Small cases whose expected outputs were worked out by hand from the contract.

Metric rows are chosen so that every cosine score is exact in float32 (unit axes, or vectors
with equal components), which makes the intended ties real ties.
"""

import pytest
import torch

from tome_kernels import bipartite_match, bipartite_merge

NAN = float("nan")


def tokens(n, device):
    """x_k = [k, k^2]: every token distinguishable, every merge checkable by hand."""
    k = torch.arange(n, dtype=torch.float32, device=device)
    return torch.stack([k, k * k], dim=-1)[None]


def check(result, x_expected, size_expected):
    x_out, size_out = result
    torch.testing.assert_close(x_out, torch.tensor([x_expected], dtype=x_out.dtype, device=x_out.device))
    expected = torch.tensor([size_expected], dtype=torch.float32, device=x_out.device)[..., None]
    torch.testing.assert_close(size_out, expected)


# N = 7, D = 3. B tokens: t1 = e1, t3 = e2, t5 = e3.
# A tokens: t0 = e1 (score 1 with t1), t2 = (1,1,0) (ties t1/t3 at 0.7071 -> t1),
# t4 = (0,3,1) (best t3, 0.9487), t6 = e3 (score 1 with t5).
METRIC_7 = [[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 3, 1], [0, 0, 1], [0, 0, 1]]


def test_class_token_keeps_index_order(device):
    metric = torch.tensor([METRIC_7], dtype=torch.float32, device=device)
    x = tokens(7, device)
    # Class token excluded; ranking t6 (1.0) > t4 (0.9487) > t2 (0.7071): t6 merges into t5.
    check(
        bipartite_merge(x, metric, 1, class_token=True),
        [[0, 0], [2, 4], [4, 16], [1, 1], [3, 9], [5.5, 30.5]],
        [1, 1, 1, 1, 1, 2],
    )
    plan = bipartite_match(metric, 1, class_token=True)
    assert plan.token_map.tolist() == [[0, 3, 1, 4, 2, 5, 5]]


def test_without_class_token_rank_order_and_tied_best(device):
    metric = torch.tensor([METRIC_7], dtype=torch.float32, device=device)
    x = tokens(7, device)
    # t0 and t6 both score exactly 1: the lower index (t0) ranks first and merges into t1.
    # Kept A tokens come in rank order: t6, t4, t2.
    check(
        bipartite_merge(x, metric, 1),
        [[6, 36], [4, 16], [2, 4], [0.5, 0.5], [3, 9], [5, 25]],
        [1, 1, 1, 2, 1, 1],
    )
    assert bipartite_match(metric, 1).token_map.tolist() == [[3, 3, 2, 4, 1, 5, 0]]


def test_class_token_two_merges_with_sizes(device):
    metric = torch.tensor([METRIC_7], dtype=torch.float32, device=device)
    x = tokens(7, device)
    size = torch.tensor([[1, 1, 1, 2, 3, 1, 2]], dtype=torch.float32, device=device)[..., None]
    # t6 -> t5 and t4 -> t3; kept: t0, t2.
    # t3 group: (2*[3,9] + 3*[4,16]) / 5 = [18/5, 66/5];  t5 group: ([5,25] + 2*[6,36]) / 3.
    check(
        bipartite_merge(x, metric, 2, size, class_token=True),
        [[0, 0], [2, 4], [1, 1], [18 / 5, 66 / 5], [17 / 3, 97 / 3]],
        [1, 1, 1, 5, 3],
    )


# N = 6, class + distill. B: t1 = e1 (distill), t3 = e2, t5 = e3.
# t2 = e1: only matches the distill token, which is masked, so its best is 0 (t3 and t5
# tie, t3 wins); t4 = (0,1,2): best t5 at 0.894.
METRIC_6 = [[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 2], [0, 0, 1]]
SIZE_6 = [1, 1, 2, 1, 3, 1]


def test_class_and_distill_layout(device):
    metric = torch.tensor([METRIC_6], dtype=torch.float32, device=device)
    size = torch.tensor([SIZE_6], dtype=torch.float32, device=device)[..., None]
    x = tokens(6, device)
    # r = 5 clamps to (6 - 2) // 2 = 2: t4 -> t5, t2 -> t3.
    # t3 group: ([3,9] + 2*[2,4]) / 3;  t5 group: ([5,25] + 3*[4,16]) / 4.
    check(
        bipartite_merge(x, metric, 5, size, class_token=True, distill_token=True),
        [[0, 0], [1, 1], [7 / 3, 17 / 3], [17 / 4, 73 / 4]],
        [1, 1, 3, 4],
    )
    plan = bipartite_match(metric, 5, class_token=True, distill_token=True)
    assert plan.r == 2
    assert plan.token_map.tolist() == [[0, 1, 2, 2, 3, 3]]


def test_distill_unmerge_puts_rows_back(device):
    metric = torch.tensor([METRIC_6], dtype=torch.float32, device=device)
    plan = bipartite_match(metric, 1, class_token=True, distill_token=True)
    # Only t4 merges (into t5). Output: [t0, t1 (distill), t2, t3, t5+t4].
    assert plan.token_map.tolist() == [[0, 1, 2, 3, 4, 4]]
    y = torch.tensor([[[10.0], [11.0], [12.0], [13.0], [14.0]]], device=device)
    assert plan.unmerge(y).flatten().tolist() == [10, 11, 12, 13, 14, 14]


def test_keys_are_averaged_over_heads(device):
    # Head mean of the keys is METRIC_7; each head alone would match differently.
    mean = torch.tensor([METRIC_7], dtype=torch.float32, device=device)
    offset = torch.tensor([[5.0, -3.0, 2.0]], device=device).expand(7, 3)[None]
    keys = torch.stack([mean + offset, mean - offset], dim=1)  # (1, 2, 7, 3)
    assert torch.equal(keys.mean(1), mean)
    x = tokens(7, device)
    by_keys = bipartite_merge(x, keys, 2, class_token=True)
    torch.testing.assert_close(by_keys, bipartite_merge(x, mean, 2, class_token=True))
    assert bipartite_match(keys, 1).token_map.tolist() == [[3, 3, 2, 4, 1, 5, 0]]


def test_all_equal_scores_break_ties_by_index(device):
    # Identical rows (1,1,1,1) normalise to exactly 0.5 each: every score is exactly 1.
    metric = torch.ones(1, 8, 4, device=device)
    x = tokens(8, device)
    # Every A token picks t1 (lowest j); sources are the lowest-index A tokens t0, t2, t4.
    # Output: [t6, t1+t0+t2+t4, t3, t5, t7].
    check(bipartite_merge(x, metric, 3), [[6, 36], [7 / 4, 21 / 4], [3, 9], [5, 25], [7, 49]], [1, 4, 1, 1, 1])


def test_nan_row_never_wins_and_goes_to_column_zero(device):
    # N = 4: A = t0 (NaN), t2; B = t1, t3. t0's scores are all NaN: best -inf, dst t1.
    metric = torch.tensor([[[NAN, 1], [1, 0], [0, 1], [0, 1]]], device=device)
    x = tokens(4, device)
    # r = 1: t2 (best 1 with t3) merges first. Kept: t0. Output [t0, t1, t3+t2].
    check(bipartite_merge(x, metric, 1), [[0, 0], [1, 1], [2.5, 6.5]], [1, 1, 2])
    # r = 2: t0 merges too, into t1 (column 0). Output [t1+t0, t3+t2].
    check(bipartite_merge(x, metric, 2), [[0.5, 0.5], [2.5, 6.5]], [2, 2])


def test_nan_row_with_class_token_never_displaces_it(device):
    # N = 5 with class token: t2 is all NaN, t4 is finite. r clamps to 2: both non-class A
    # tokens merge, the class token (also ranked -inf by the mask) stays.
    metric = torch.tensor([[[1, 0], [1, 0], [NAN, NAN], [0, 1], [0, 1]]], device=device)
    plan = bipartite_match(metric, 2, class_token=True)
    # t4 -> t3 (score 1), t2 -> t1 (column 0). Output [t0, t1+t2, t3+t4].
    assert plan.token_map.tolist() == [[0, 1, 1, 2, 2]]


def test_zero_metric_row_scores_zero_not_nan(device):
    # t0's metric is zero: it stays zero after normalisation and scores 0, not NaN.
    metric = torch.tensor([[[0, 0], [1, 0], [1, 0], [0, 1]]], dtype=torch.float32, device=device)
    plan = bipartite_match(metric, 1)
    # t2 (score 1 with t1) beats t0 (score 0). Output [t0, t1+t2, t3].
    assert plan.token_map.tolist() == [[0, 1, 1, 2]]


@pytest.mark.parametrize("mode,expected", [
    ("sum", [[6, 36], [7, 21], [3, 9], [5, 25], [7, 49]]),
    ("mean", [[6, 36], [1.75, 5.25], [3, 9], [5, 25], [7, 49]]),
    ("amax", [[6, 36], [4, 16], [3, 9], [5, 25], [7, 49]]),
    ("amin", [[6, 36], [0, 0], [3, 9], [5, 25], [7, 49]]),
])
def test_merge_modes(device, mode, expected):
    # Same plan as test_all_equal_scores_break_ties_by_index: group of t1 is {t1, t0, t2, t4}.
    plan = bipartite_match(torch.ones(1, 8, 4, device=device), 3)
    out = plan.merge(tokens(8, device), mode)
    assert out.tolist() == [expected]


def test_r_zero_returns_inputs(device):
    x = tokens(5, device)
    size = torch.full((1, 5, 1), 2.0, device=device)
    x_out, size_out = bipartite_merge(x, torch.randn(1, 5, 3, device=device), 0, size)
    assert x_out is x and torch.equal(size_out, size)


def test_score_magnitudes_are_cosines(device):
    # Scale of a metric row does not matter, only its direction.
    metric = torch.tensor([[[3, 4], [6, 8], [1, 0], [0, 1]]], dtype=torch.float32, device=device)
    scaled = metric * torch.tensor([[[100.0], [0.01], [7.0], [3.0]]], device=device)
    # t0 matches t1 exactly (score 1); t2 = e1 scores 0.6 with t1: t0 merges.
    assert bipartite_match(metric, 1).token_map.tolist() == [[1, 1, 0, 2]]
    assert bipartite_match(scaled, 1).token_map.tolist() == [[1, 1, 0, 2]]
