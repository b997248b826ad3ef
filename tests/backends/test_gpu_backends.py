"""Checks of the GPU backends ("triton" and the "cuda" extension) that only a GPU can make
(TOME_TEST_DEVICE=cuda): the full benchmark shapes in every dtype, CUDA graph capture and
replay, torch.compile with inductor, and bitwise-identical repeated runs. Without a GPU
these are skipped (reported as skipped, never as passed); test_fast_backends.py covers the
same kernels at small shapes (Triton's in its interpreter here).
"""


import pytest
import torch

from benchmarks.providers import make_inputs
from benchmarks.shapes import GPU_SHAPES
from tests.helpers import GPU_ONLY
from tome_kernels import bipartite_match, bipartite_merge, reference

pytestmark = GPU_ONLY
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_BACKENDS = ["triton", "cuda"]


def assert_near_optimal(metric, plan, tol):
    """The plan's decisions are the contract's up to score differences below ``tol``:
    at full size some scores tie to within float32 rounding, where any order is right."""
    m = reference.normalized_metric(metric)
    scores = (m[:, ::2] @ m[:, 1::2].transpose(-1, -2)).float()
    scores = scores.nan_to_num(float("-inf"))
    if plan.match_result.distill_token:
        scores[..., 0] = float("-inf")
    best = scores.max(-1).values
    src, dst = plan.match_result.src_idx, plan.match_result.dst_idx
    chosen = scores.gather(1, src[..., None].expand(-1, -1, scores.shape[-1])).gather(2, dst[..., None])[..., 0]
    src_best = best.gather(1, src)
    assert (chosen >= src_best - tol).all(), "a source merged into a destination that is not its best"
    kept_best = best.gather(1, plan.match_result.unm_idx)
    if plan.match_result.class_token:
        kept_best = kept_best[:, 1:]
    if kept_best.shape[1] and src.shape[1]:
        assert (src_best.min(1).values >= kept_best.max(1).values - tol).all(), "a kept token outranks a source"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_full_shapes_against_reference(backend, shape, dtype):
    inputs = make_inputs(shape, CUDA, dtype)
    x, metric, size = inputs["x"], inputs["metric"], inputs["size"]
    plan = bipartite_match(metric, shape.r, class_token=shape.class_token, backend=backend)
    assert_near_optimal(metric, plan, tol=1e-5 if dtype == torch.float32 else 1e-3)
    # Given the same decisions, the merge is within twice the reference's own error.
    got = bipartite_merge(x, metric, shape.r, size, class_token=shape.class_token, backend=backend)
    same = plan.merge_wavg(x, size)
    exact = reference.merge_wavg(plan.match_result, x.double(), size.double())[0]
    ref_err = (reference.merge_wavg(plan.match_result, x, size)[0].double() - exact).abs().max()
    ulp = torch.finfo(dtype).eps * exact.abs().max()
    assert (same[0].double() - exact).abs().max() <= 2 * ref_err + ulp
    if torch.equal(plan.token_map, reference.match(metric, shape.r, shape.class_token).token_map):
        torch.testing.assert_close(got, same, rtol=0, atol=0)


@pytest.mark.parametrize("shape", GPU_SHAPES[:2] + GPU_SHAPES[-1:], ids=lambda s: s.name)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_repeated_runs_bitwise_identical(backend, shape):
    inputs = make_inputs(shape, CUDA, torch.float16)
    args = (inputs["x"], inputs["metric"], shape.r, inputs["size"])
    first = bipartite_merge(*args, class_token=shape.class_token, backend=backend)
    for _ in range(3):
        again = bipartite_merge(*args, class_token=shape.class_token, backend=backend)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    shape = GPU_SHAPES[0]
    static = make_inputs(shape, CUDA, torch.float16)

    def step():
        return bipartite_merge(static["x"], static["metric"], shape.r, static["size"], class_token=True,
                               backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and load the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    fresh = make_inputs(shape, CUDA, torch.float16, seed=1)
    for name in ("x", "metric", "size"):
        static[name].copy_(fresh[name])
    graph.replay()
    torch.cuda.synchronize()
    expected = bipartite_merge(fresh["x"], fresh["metric"], shape.r, fresh["size"], class_token=True, backend=backend)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inductor_compiles_forward_and_backward(backend):
    shape = GPU_SHAPES[0]
    inputs = make_inputs(shape, CUDA, torch.float16)

    def step(x, metric, size):
        x_out, size_out = bipartite_merge(x, metric, shape.r, size, class_token=True, backend=backend)
        return (x_out.float() * size_out).sum()

    compiled = torch.compile(step, fullgraph=True)
    grads = []
    for fn in (compiled, step):
        x = inputs["x"].clone().requires_grad_()
        loss = fn(x, inputs["metric"], inputs["size"])
        grads.append((loss.detach(), torch.autograd.grad(loss, x)[0]))
    torch.testing.assert_close(grads[0], grads[1])
