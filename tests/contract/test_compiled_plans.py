"""Plans made inside torch.compile (inductor) while r changes from call to call: after the
first change dynamo makes r dynamic, and at r = 1 inductor (torch 2.13) miscompiled the
reference's in-place scalar scatter of the r selected sources (one token marked, not one per
row: an index error or a wrong plan on the reference, "every output row needs a member" on
`cpu`). Each compiled plan must equal the eager one."""

import pytest
import torch

import tome_kernels as tk
from tests.helpers import cpu_backend_cases

# The generator is made outside the compiled function and passed in, as a model would hold it.
METHODS = {
    "grid": lambda x, r, g, backend: tk.grid_match(x, r, (8, 6), random_dst=False, backend=backend),
    "random": lambda x, r, g, backend: tk.random_bipartite_match(x, r, generator=g, backend=backend),
    "pitome": lambda x, r, g, backend: tk.pitome_match(x, r, class_token=True, backend=backend),
}


@pytest.mark.parametrize("method", sorted(METHODS))
# Triton's interpreter under inductor would take minutes; the reference is where the bug was.
@pytest.mark.parametrize("backend", ["reference", *[case for case in cpu_backend_cases() if case.values[0] == "cpu"]])
def test_compiled_plans_follow_a_changing_r(method, backend):
    make = METHODS[method]
    x = torch.randn(2, 48, 8, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, r, g: make(x, r, g, backend).merge(x, "mean"))
    for r in (20, 1, 3):
        plan = make(x, r, torch.Generator().manual_seed(0), backend)
        assert plan.r == r
        assert torch.equal(compiled(x, r, torch.Generator().manual_seed(0)), plan.merge(x, "mean")), r
