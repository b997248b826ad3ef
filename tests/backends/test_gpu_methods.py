"""GPU checks of the methods beyond ToMe (TOME_TEST_DEVICE=cuda): the fused similarity
kernels (PiToMe's energy, each source's best destination) at full model shapes in every
dtype against the reference, CUDA graph capture and replay, and identical repeated runs.
Without a GPU these are skipped (reported as skipped, never as passed); test_methods.py
covers the same kernels at small shapes (Triton's in its interpreter here).
"""


import pytest
import torch

import tome_kernels
from tests.helpers import GPU_ONLY
from tome_kernels.backends import select_backend
from tome_kernels.reference import energy, partition, roles

pytestmark = GPU_ONLY
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_BACKENDS = ["triton", "cuda"]
# (name, metric shape): ViT-B/16 at 224 (keys, B = 256), a Stable Diffusion 64x64 latent.
SHAPES = [("vit_b16_keys", (256, 12, 197, 64)), ("sd_latent_64", (2, 4096, 320))]


def _metric(shape, dtype):
    torch.manual_seed(0)
    return torch.randn(*shape, device=CUDA).to(dtype)


def _near_optimal(metric, roles_, best, dst, tol):
    """Each source's destination scores within ``tol`` of the reference's best: at full size
    some scores tie to within float32 rounding, where either choice is right."""
    ref_best, _ = partition.assign(metric, roles_)
    assert torch.equal(dst >= 0, roles_.expand_as(dst) == partition.SOURCE)
    assert (best - ref_best).abs().nan_to_num(0).max() <= tol
    m = tome_kernels.reference.normalized_metric(metric).float()
    src = (dst >= 0).nonzero(as_tuple=True)
    chosen = (m[src[0], src[1]] * m[src[0], dst[src]]).sum(-1)
    assert (chosen >= ref_best[src] - tol).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape", SHAPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_energy_full_shapes(backend, name, shape, dtype):
    metric = _metric(shape, dtype)
    got = select_backend(backend, (metric,)).energy(metric, 0.45, 1.0, "elu")
    assert (got - energy.energy(metric, 0.45)).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape", SHAPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_assign_full_shapes(backend, name, shape, dtype):
    metric = _metric(shape, dtype)
    n = metric.shape[-2]
    if name.startswith("sd"):
        roles_, _ = roles.grid(64, 64, (2, 2), True, torch.Generator(CUDA).manual_seed(0), CUDA)
    else:
        e = energy.energy(metric[..., 1:, :], 0.45)  # the class token is protected
        roles_ = roles.pitome(e, 16, 1)
    best, dst = select_backend(backend, (metric,)).assign(metric, roles_, None)
    _near_optimal(metric, roles_, best, dst, 1e-5)
    assert n == dst.shape[1]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_methods_graph_capture_and_repeat(backend):
    """The whole PiToMe step (energy, roles, assign, layout, merge) has no host sync: it is
    captured in a CUDA graph, and replays give the eager result."""
    metric = _metric((64, 12, 197, 64), torch.float16)
    x = torch.randn(64, 197, 768, device=CUDA, dtype=torch.float16)

    def step():
        return tome_kernels.pitome_merge(x, metric, 16, class_token=True, backend=backend)

    eager = step()
    assert all(torch.equal(a, b) for a, b in zip(eager, step()))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on the side stream, as graph capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(eager, captured))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_grid_merge_unmerge_full_shape(backend):
    h = torch.randn(2, 4096, 320, device=CUDA, dtype=torch.float16)
    gen = torch.Generator(CUDA)
    plan = tome_kernels.grid_match(h, 2048, (64, 64), generator=gen.manual_seed(0), backend=backend)
    ref = tome_kernels.grid_match(h, 2048, (64, 64), generator=gen.manual_seed(0), backend="reference")
    restored = plan.unmerge(plan.merge(h, "mean"))
    assert restored.shape == h.shape
    # Same decisions give the same output; near-ties at this size may swap a few sources.
    same_rows = (plan.token_map == ref.token_map).all(1)
    if same_rows.any():
        want = ref.unmerge(ref.merge(h, "mean"))
        torch.testing.assert_close(restored[same_rows], want[same_rows], rtol=2e-3, atol=2e-3)
