"""Benchmark providers: one way each of running the merge step on a shape's inputs.

``reference`` is the plain PyTorch contract (what users run today), ``reference_compiled``
the same under ``torch.compile``; every other backend registered in tome_kernels becomes a
provider of its own name, run through the public ``bipartite_merge``.
"""

import os
from typing import Callable, Dict, List, Tuple

import torch

import tome_kernels
from tome_kernels import reference
from tome_kernels.backends import cannot_run_reasons

from .shapes import Shape

Step = Callable[[], Tuple[torch.Tensor, ...]]

# Providers that force one path of the Triton backend: provider -> one_pass.
TRITON_PATHS = {"triton_one_pass": True, "triton_multi_kernel": False}


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random inputs (never zeros: they hide unwritten outputs and can time faster)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, n = shape.batch, shape.tokens
    return {
        "x": torch.randn(b, n, shape.channels, generator=g).to(device, dtype),
        "metric": torch.randn(shape.metric_shape, generator=g).to(device, dtype),
        # Sizes as a model carries them after a few merges: small positive integers.
        "size": torch.randint(1, 5, (b, n, 1), generator=g).to(device, torch.float32),
        "grad_x": torch.randn(b, n - shape.r, shape.channels, generator=g).to(device, dtype),
        "grad_size": torch.randn(b, n - shape.r, 1, generator=g).to(device, torch.float32),
    }


def _forward_fn(provider: str, shape: Shape) -> Callable:
    r, class_token = shape.r, shape.class_token

    def reference_step(x, metric, size):
        return reference.bipartite_merge(x, metric, r, size, class_token)

    if provider == "reference":
        return reference_step
    if provider == "reference_compiled":
        return torch.compile(reference_step, dynamic=False)
    if provider in TRITON_PATHS:
        from tome_kernels.triton_kernels import ops

        one_pass = TRITON_PATHS[provider]
        # The operator itself, to time one path whatever the crossover in launch.py says.
        return lambda x, metric, size: ops.bipartite_merge(x, metric, size, r, class_token, False, one_pass)[:2]
    return lambda x, metric, size: tome_kernels.bipartite_merge(
        x, metric, r, size, class_token=class_token, backend=provider
    )


def make_step(provider: str, shape: Shape, inputs: Dict[str, torch.Tensor], backward: bool) -> Step:
    """A closure running one merge step; with ``backward`` it also returns the gradients."""
    forward = _forward_fn(provider, shape)
    if not backward:
        return lambda: forward(inputs["x"], inputs["metric"], inputs["size"])
    x = inputs["x"].detach().requires_grad_()
    size = inputs["size"].detach().requires_grad_()

    def step():
        x_out, size_out = forward(x, inputs["metric"], size)
        grads = torch.autograd.grad((x_out, size_out), (x, size), (inputs["grad_x"], inputs["grad_size"]))
        return (x_out.detach(), size_out.detach()) + grads

    return step


def provider_names() -> List[str]:
    """Every provider, fastest-registered backends first, the references last. The Triton
    backend also gets one provider per path, to measure where one pass beats several."""
    names = []
    for name in tome_kernels.available_backends():
        if name != "reference":
            names += [name] + ([*TRITON_PATHS] if name == "triton" else [])
    return names + ["reference_compiled", "reference"]


def unavailable_reason(provider: str, inputs: Dict[str, torch.Tensor]):
    """Why a provider cannot run these inputs here, or None."""
    if provider in ("reference", "reference_compiled"):
        return None
    if provider.startswith("triton") and os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter runs the kernels on the CPU, ~1000x slower: correct, not timeable.
        return "Triton's interpreter is on (TRITON_INTERPRET=1), its timings would mean nothing"
    backend = "triton" if provider in TRITON_PATHS else provider
    return "; ".join(cannot_run_reasons(backend, list(inputs.values()))) or None
