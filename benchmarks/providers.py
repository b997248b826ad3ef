"""Benchmark providers: one way each of running the merge step on a shape's inputs.

``reference`` is the plain PyTorch contract (what users run today), ``reference_compiled``
the same under ``torch.compile``; every other backend registered in tome_kernels becomes a
provider of its own name, run through the public ``bipartite_merge``.

A shape of another method (``Shape.method``) runs that method's public functions instead,
with ``backend=`` the provider: ``reference`` (the plain PyTorch plan and merge) or a
backend's name. The ToMe-only providers (``reference_compiled`` and the two Triton paths)
do not apply to them.
"""

import os
import types
from typing import Callable, Dict, List, Tuple

import torch

import tome_kernels
from tome_kernels import reference
from tome_kernels.backends import cannot_run_reasons, select_backend
from tome_kernels.backends.base import Backend
from tome_kernels.plan import MergePlan

from .measure import rel_err
from .shapes import METHODS, Shape

Step = Callable[[], Tuple[torch.Tensor, ...]]

# Providers that run under torch.compile: each row must compile exactly one graph (run.py).
COMPILED = ("reference_compiled",)
# Providers that force one path of the Triton backend: provider -> one_pass.
TRITON_PATHS = {"triton_one_pass": True, "triton_multi_kernel": False}
# kth bipartite merging keeps every k-th token as a destination: k = 2 removes half.
KTH_K = 2


def clustered_metric(shape: Shape, g: torch.Generator, clusters: int = 32, spread: float = 0.5) -> torch.Tensor:
    """A metric whose rows lie around a few centres of uneven popularity, as image tokens
    do (sky, one object...); keys share each token's centre across heads. The methods other
    than ToMe get it: PiToMe's energies of i.i.d. Gaussian rows all lie within float32
    rounding of each other at N = 4096, so which tokens merge would be decided by each
    backend's summation order rather than by the data."""
    b, n, d = shape.batch, shape.tokens, shape.feature_dim
    lead = (b,) if shape.heads is None else (b, shape.heads)
    centres = torch.randn(*lead, clusters, d, generator=g)
    popularity = 1.0 / torch.arange(1, clusters + 1, dtype=torch.float32)
    labels = torch.multinomial(popularity.expand(b, clusters), n, replacement=True, generator=g)
    if shape.heads is not None:
        labels = labels[:, None].expand(b, shape.heads, n)
    rows = centres.gather(-2, labels[..., None].expand(*labels.shape, d))
    return rows + spread * torch.randn(*lead, n, d, generator=g)


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random inputs (never zeros: they hide unwritten outputs and can time faster)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, n = shape.batch, shape.tokens
    x = torch.randn(b, n, shape.channels, generator=g).to(device, dtype)
    metric = torch.randn(shape.metric_shape, generator=g) if shape.method == "tome" else clustered_metric(shape, g)
    return {
        "x": x,
        "metric": metric.to(device, dtype),
        # Sizes as a model carries them after a few merges: small positive integers.
        "size": torch.randint(1, 5, (b, n, 1), generator=g).to(device, torch.float32),
        "grad_x": torch.randn(b, n - shape.r, shape.channels, generator=g).to(device, dtype),
        "grad_size": torch.randn(b, n - shape.r, 1, generator=g).to(device, torch.float32),
    }


def _seeded(device: torch.device) -> torch.Generator:
    """A fresh generator per call: every provider and repetition draws the same plan."""
    return torch.Generator(device=device).manual_seed(0)


def method_plan(provider: str, shape: Shape, metric: torch.Tensor) -> MergePlan:
    """The matching half of a method's step on backend ``provider`` (the same plan at every
    call: the generators are seeded)."""
    r, class_token = shape.r, shape.class_token
    if shape.method == "pitome":
        return tome_kernels.pitome_match(metric, r, class_token=class_token, backend=provider)
    if shape.method == "kth":
        return tome_kernels.kth_bipartite_match(metric, KTH_K, class_token=class_token, backend=provider)
    if shape.method == "random":
        return tome_kernels.random_bipartite_match(
            metric, r, generator=_seeded(metric.device), class_token=class_token, backend=provider)
    if shape.method == "grid":
        return tome_kernels.grid_match(metric, r, shape.grid_size, generator=_seeded(metric.device), backend=provider)
    raise ValueError(f"shape {shape.name}: unknown method {shape.method!r} (known: {', '.join(METHODS)})")


def apply_plan(plan: MergePlan, shape: Shape, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The merging half: the size-weighted merge, or for "grid" tomesd's merge ("mean") and
    unmerge (in a diffusion block attention runs between the two; here the identity)."""
    if shape.method == "grid":
        merged = plan.merge(x, "mean")
        return merged, plan.unmerge(merged)
    return plan.merge_wavg(x, size)


def _method_fn(provider: str, shape: Shape) -> Callable:
    """One step of a method other than ToMe on backend ``provider``."""
    if shape.method == "pitome":
        r, class_token = shape.r, shape.class_token
        return lambda x, metric, size: tome_kernels.pitome_merge(
            x, metric, r, size, class_token=class_token, backend=provider)
    return lambda x, metric, size: apply_plan(method_plan(provider, shape, metric), shape, x, size)


def same_group(token_map: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: whether each token's group (the tokens sharing its output row) is the
    same set in both plans. Row numbers are not compared: one decision that differs shifts
    the rows of every later token."""
    batch, tokens = token_map.shape
    offset = torch.arange(batch, device=token_map.device)[:, None] * tokens

    def group_sizes(ids):
        _, inverse, counts = torch.unique(ids.flatten(), return_inverse=True, return_counts=True)
        return counts[inverse].view(batch, tokens)

    # A token's group is the same set in both iff it has as many members in each plan as
    # tokens that share both its rows.
    both = group_sizes((offset + token_map) * tokens + other)
    return (group_sizes(offset + token_map) == both) & (group_sizes(offset + other) == both)


def method_agreement(provider: str, shape: Shape, inputs: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """How a provider of a method agrees with the "reference" backend.

    Its decisions may part from the reference's where two scores lie within float32
    rounding of each other, which happens for PiToMe's energies at N = 4096 even on
    clustered data (each backend sums them in its own order). So the agreement comes in
    parts: ``plan_agreement``, the share of tokens in the same group as in the reference
    plan; ``rel_err_same_plan``, the error of the provider's outputs against the reference
    merge of the provider's own plan; and for PiToMe ``energy_rel_err``, the error of the
    backend's energies against the reference's.
    """
    metric = inputs["metric"]
    plan = method_plan(provider, shape, metric)
    reference_plan = method_plan("reference", shape, metric)
    merged_by_reference = apply_plan(MergePlan(plan.match_result, Backend()), shape, inputs["x"], inputs["size"])
    result = {
        "plan_agreement": same_group(plan.token_map, reference_plan.token_map).double().mean().item(),
        "rel_err_same_plan": rel_err(apply_plan(plan, shape, inputs["x"], inputs["size"]), merged_by_reference),
    }
    if shape.method == "pitome":
        margin = tome_kernels.methods.PITOME_MARGIN
        energies = select_backend(provider, (metric,)).energy(metric, margin, 1.0, "elu")
        result["energy_rel_err"] = rel_err((energies,), (Backend().energy(metric, margin, 1.0, "elu"),))
    return result


def applies(provider: str, shape: Shape) -> bool:
    """Whether ``provider`` times ``shape``'s step: every provider times ToMe's; the other
    methods run on the backends by name ("reference" included)."""
    return shape.method == "tome" or provider in tome_kernels.available_backends()


def compiled_alone(fn: Callable) -> Callable:
    """``fn`` under ``torch.compile``, with a compile cache of its own, as one graph.

    Dynamo keeps what it compiled on the function's code object, which every closure made by
    the same ``def`` shares: over the table's shapes and passes (each a new specialization)
    the reference step passed dynamo's recompile limit (8), and the last rows (diffusion)
    silently ran eagerly under the label "reference_compiled". A copy of the code object
    gives each step its own cache. ``fullgraph=True`` turns what would still run eagerly (a
    graph break, the limit reached anyway) into an error; ``run.py`` also counts the graphs
    each row compiles (``dynamo_graphs``).
    """
    fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(fresh, dynamic=False, fullgraph=True)


def dynamo_graphs() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters  # imported here: the other providers never need dynamo

    return counters["stats"]["unique_graphs"]


def inductor_cache_hits() -> int:
    """How many graphs inductor has taken from its on-disk cache in this process so far: on the
    2-core VM a row's compile that hit it took 0.2 - 0.3 s, a cold one 5 - 26 s."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"]


def _forward_fn(provider: str, shape: Shape) -> Callable:
    if shape.method != "tome":
        if not applies(provider, shape):
            raise ValueError(f"provider {provider!r} times ToMe's bipartite merge only, not {shape.method}")
        return _method_fn(provider, shape)
    r, class_token = shape.r, shape.class_token

    def reference_step(x, metric, size):
        return reference.bipartite_merge(x, metric, r, size, class_token)

    if provider == "reference":
        return reference_step
    if provider == "reference_compiled":
        return compiled_alone(reference_step)
    if provider in TRITON_PATHS:
        from tome_kernels.backends.triton import ops

        one_pass = TRITON_PATHS[provider]
        # The operator itself, to time one path whatever the crossover in launch.py says.
        return lambda x, metric, size: ops.bipartite_merge(x, metric, size, r, class_token, False, one_pass)[:2]
    return lambda x, metric, size: tome_kernels.bipartite_merge(
        x, metric, r, size, class_token=class_token, backend=provider
    )


def make_step(provider: str, shape: Shape, inputs: Dict[str, torch.Tensor], backward: bool) -> Step:
    """A closure running one merge step; with ``backward`` it also returns the gradients."""
    if backward and "fwd+bwd" not in shape.passes:
        raise ValueError(f"shape {shape.name} is timed forward only ({shape.method})")
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
