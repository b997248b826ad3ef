"""Edge values behave the same everywhere (docs/semantics.md, "Edge values").

- Degenerate shapes (N = 0 .. 3 with class / distillation tokens, C = 0, B = 0, D = 0,
  H = 0): for every method, every fast backend gives the reference's result, or the same
  ValueError, raised before any backend work.
- r is clamped as ToMe's contract says, never below 0, by every method.
- Sizes that are 0, negative, inf or NaN: refused on CPU tensors; where values are not read
  (GPU tensors, traced code), every backend computes the same formula.
- Number arguments: one rule per kind (counts, reals), for every public function and patch.
"""

import contextlib
import functools

import numpy as np
import pytest
import torch
from torch import nn

import tome_kernels
import tome_kernels.patch as tome_patch
from tests.helpers import assert_within_twice_reference_error, cpu_backend_cases
from tome_kernels import checks
from tome_kernels import plan as plan_module
from tome_kernels.backends import registry
from tome_kernels.patch.schedule import dsm_r_per_block, keep_ratio_r, r_per_block

NAN, INF = float("nan"), float("inf")

# Every method of a backend that does work: none may run when a check refuses the input.
BACKEND_WORK = ("match", "assign", "partition", "energy", "merge_wavg", "merge", "unmerge", "bipartite_merge")


@contextlib.contextmanager
def no_backend_work(monkeypatch, name):
    """Any backend work by ``name`` (or by the reference a plan falls back to) fails the test."""
    with monkeypatch.context() as patcher:
        for backend in (registry._REGISTRY[name], plan_module._REFERENCE):
            for method in BACKEND_WORK:
                def launched(*args, _method=method, **kwargs):
                    raise AssertionError(f"backend work ({_method}) before the input was refused")
                patcher.setattr(backend, method, launched)
        yield


def generator():
    return torch.Generator().manual_seed(7)


def plan_outputs(plan, x, size):
    """Everything a plan gives: its r and token map, and each way of applying it."""
    merged, merged_size = plan.merge_wavg(x, size)
    out = {"r": plan.r, "token_map": plan.token_map, "x": merged, "size": merged_size}
    for mode in ("sum", "mean", "amax", "amin"):
        out[mode] = plan.merge(x, mode)
    out["unmerge"] = plan.unmerge(out["mean"])
    return out


def window_grid(tokens):
    # (1, N - protected) when that is a grid; else (1, 1), which the check refuses.
    return (1, tokens) if tokens > 0 else (1, 1)


# Each method as one call: (metric, x, size, class_token, distill_token, backend) -> outputs.
METHODS = {
    "bipartite_merge": lambda m, x, s, ct, dt, be: dict(zip(
        ("x", "size"), tome_kernels.bipartite_merge(x, m, 3, s, class_token=ct, distill_token=dt, backend=be))),
    "bipartite_match": lambda m, x, s, ct, dt, be: plan_outputs(
        tome_kernels.bipartite_match(m, 3, class_token=ct, distill_token=dt, backend=be), x, s),
    "pitome_merge": lambda m, x, s, ct, dt, be: dict(zip(
        ("x", "size"), tome_kernels.pitome_merge(x, m, 3, s, class_token=ct, distill_token=dt, backend=be))),
    "pitome_match": lambda m, x, s, ct, dt, be: plan_outputs(
        tome_kernels.pitome_match(m, 3, margin=0.2, class_token=ct, distill_token=dt, backend=be), x, s),
    "pitome_match bipartite": lambda m, x, s, ct, dt, be: plan_outputs(tome_kernels.pitome_match(
        m, 3, margin=0.2, split="bipartite", class_token=ct, distill_token=dt, backend=be), x, s),
    "pitome_match text": lambda m, x, s, ct, dt, be: plan_outputs(tome_kernels.pitome_match(
        m, 3, margin=0.6, energy_form="gaussian", split="halves", class_token=ct, distill_token=dt, backend=be), x, s),
    "kth_bipartite_match": lambda m, x, s, ct, dt, be: plan_outputs(
        tome_kernels.kth_bipartite_match(m, 2, class_token=ct, distill_token=dt, backend=be), x, s),
    "random_bipartite_match": lambda m, x, s, ct, dt, be: plan_outputs(tome_kernels.random_bipartite_match(
        m, 3, generator=generator(), class_token=ct, distill_token=dt, backend=be), x, s),
    "window_match": lambda m, x, s, ct, dt, be: plan_outputs(tome_kernels.window_match(
        m, 3, window_grid(m.shape[-2] - ct - dt), window=(1, 2), class_token=ct, distill_token=dt, backend=be), x, s),
    "grid_match": lambda m, x, s, ct, dt, be: plan_outputs(tome_kernels.grid_match(
        m, 3, (1, max(m.shape[-2], 1)), stride=(1, 2), generator=generator(), backend=be), x, s),
}

# (B, N, C, D, heads or None for a (B, N, D) metric, class_token, distill_token)
FLAGS = [(False, False), (True, False), (False, True), (True, True)]
SHAPES = (
    [(2, n, 3, 4, None, ct, dt) for n in range(4) for ct, dt in FLAGS]
    + [(2, n, 3, 4, 2, True, True) for n in (0, 1, 3)]  # keys
    + [
        (2, 6, 0, 4, None, True, False),  # C = 0
        (0, 6, 3, 4, None, True, False),  # B = 0
        (0, 6, 3, 4, 2, False, False),  # B = 0, keys
        (0, 0, 0, 4, None, False, False),  # B = N = C = 0
        (2, 6, 3, 0, None, False, False),  # D = 0: refused
        (2, 6, 3, 0, 2, True, False),  # Dh = 0: refused
        (0, 0, 0, 0, None, False, False),  # D = 0 with nothing else either: refused
        (2, 6, 3, 4, 0, False, False),  # H = 0: refused
    ]
)


def inputs(shape, dtype=torch.float32):
    batch, tokens, channels, features, heads, _, _ = shape
    g = torch.Generator().manual_seed(tokens * 31 + channels * 7 + features)
    metric_shape = (batch, tokens, features) if heads is None else (batch, heads, tokens, features)
    metric = torch.randn(metric_shape, generator=g, dtype=dtype)
    x = torch.randn(batch, tokens, channels, generator=g, dtype=dtype)
    size = torch.rand(batch, tokens, 1, generator=g, dtype=dtype) + 0.5
    return metric, x, size


def run(method, shape, backend, dtype=torch.float32):
    """The method's outputs, or the exception it raised."""
    metric, x, size = inputs(shape, dtype)
    try:
        return METHODS[method](metric, x, size, shape[5], shape[6], backend)
    except (ValueError, TypeError) as exc:
        return exc


def expected_r(method, tokens, protected, distill_only):
    """r after clamping, for the methods whose bound is ToMe's (r = 3 asked)."""
    r = max(min(3, (tokens - protected) // 2), 0)
    if method.startswith("bipartite") and distill_only and tokens == 3:
        return 0  # the only odd token is the distill token: nowhere to merge (semantics.md)
    return r


def shape_id(shape):
    batch, tokens, channels, features, heads, ct, dt = shape
    metric = f"D{features}" if heads is None else f"H{heads}Dh{features}"
    return f"B{batch}-N{tokens}-C{channels}-{metric}" + "-cls" * ct + "-dist" * dt


@pytest.mark.parametrize("backend", cpu_backend_cases())
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_degenerate_shapes_same_on_every_backend(shape, backend, monkeypatch):
    """Each method on a degenerate shape: the backend's outputs are the reference's (indices
    exactly, values by the tolerance rule against float64), or the reference's ValueError,
    with the same message, raised before the backend does any work."""
    for method in METHODS:
        expected = run(method, shape, "reference")
        if isinstance(expected, Exception):
            assert isinstance(expected, ValueError), f"{method}: {expected!r}"
            with no_backend_work(monkeypatch, backend):
                got = run(method, shape, backend)
            assert type(got) is type(expected) and str(got) == str(expected), f"{method}: {got!r} != {expected!r}"
            continue
        got = run(method, shape, backend)
        assert not isinstance(got, Exception), f"{method}: {backend} raised {got!r}, the reference did not"
        truth = run(method, shape, "reference", torch.float64)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            where = f"{method} {key}"
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(value)), where
            elif key == "size":
                assert torch.equal(got[key], value), where  # sums of float32 sizes in float32: exact here
            else:
                assert_within_twice_reference_error(got[key], value, truth[key], msg=where)
        if "r" in expected and method in ("bipartite_match", "pitome_match", "random_bipartite_match"):
            protected = shape[5] + shape[6]
            assert expected["r"] == expected_r(method, shape[1], protected, shape[6] and not shape[5]), method


def test_zero_width_metrics_are_refused():
    """D = 0 (or Dh = 0) measures nothing: refused with the argument named, not merged by
    index ties (the reference) or failed inside the CPU extension, as before."""
    with pytest.raises(ValueError, match=r"metric must have D >= 1 features"):
        tome_kernels.bipartite_merge(torch.randn(2, 6, 3), torch.randn(2, 6, 0), 2)
    with pytest.raises(ValueError, match=r"metric must have Dh >= 1 features per head"):
        tome_kernels.bipartite_match(torch.randn(2, 2, 6, 0), 2)


# ------------------------------------------------------------------------------ r clamping

@pytest.mark.parametrize("backend", ["reference", *cpu_backend_cases()])
def test_issue_examples_clamp_r_at_zero(backend):
    """N = 1 with a class and a distillation token: fewer tokens than protected ones. PiToMe
    made a plan with r = -1 (a size-0 row, or a failure in the CPU extension) and random
    bipartite failed on a negative dimension; every method now merges nothing."""
    metric, x = torch.randn(2, 1, 4), torch.randn(2, 1, 3)
    flags = dict(class_token=True, distill_token=True, backend=backend)
    plans = [
        tome_kernels.pitome_match(metric, 5, **flags),
        tome_kernels.random_bipartite_match(metric, 5, **flags),
        tome_kernels.kth_bipartite_match(metric, 2, **flags),
        tome_kernels.bipartite_match(metric, 5, **flags),
    ]
    for plan in plans:
        assert plan.r == 0
        merged, size = plan.merge_wavg(x)
        assert torch.equal(merged, x) and torch.equal(size, torch.ones(2, 1, 1))
    merged, size = tome_kernels.pitome_merge(x, metric, 5, **flags)
    assert merged.shape == (2, 1, 3) and size.shape == (2, 1, 1)


@pytest.mark.parametrize("tokens", range(7))
@pytest.mark.parametrize("class_token, distill_token", FLAGS)
def test_r_clamp_rule_of_each_method(tokens, class_token, distill_token):
    """Each method's own bound, never below 0: ToMe's (N - protected) // 2 for bipartite,
    PiToMe and random; the number of sources for kth, windows and the diffusion grid."""
    metric = torch.randn(2, tokens, 4)
    flags = dict(class_token=class_token, distill_token=distill_token, backend="reference")
    protected = class_token + distill_token
    free = max(tokens - protected, 0)
    for r in (0, 1, 2, 100):
        tome = max(min(r, (tokens - protected) // 2), 0)
        assert tome_kernels.pitome_match(metric, r, **flags).r == tome
        assert tome_kernels.random_bipartite_match(metric, r, **flags).r == tome
        if not (distill_token and not class_token and tokens == 3):
            assert tome_kernels.bipartite_match(metric, r, **flags).r == tome
        if free:
            # (1, free) grid in (1, 2) windows: free // 2 windows, one source each.
            assert tome_kernels.window_match(metric, r, (1, free), window=(1, 2), **flags).r == min(r, free // 2)
    for k in (0, 1, 2, 3):
        sources = free - free // k if k > 1 and free >= k else 0
        assert tome_kernels.kth_bipartite_match(metric, k, **flags).r == sources
    if tokens and not protected:
        # Every token but one per (1, 2) stride window is a source (the odd last one too);
        # without a whole window there is no destination and nothing merges.
        sources = tokens - tokens // 2 if tokens >= 2 else 0
        for r in (0, 2, 100):
            plan = tome_kernels.grid_match(metric, r, (1, tokens), stride=(1, 2), backend="reference")
            assert plan.r == min(r, sources)


def test_random_draws_nothing_when_nothing_merges():
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    tome_kernels.random_bipartite_match(torch.randn(2, 1, 4), 3, generator=g, class_token=True, distill_token=True)
    tome_kernels.random_bipartite_match(torch.randn(2, 6, 4), 0, generator=g)
    assert torch.equal(g.get_state(), before)


# ----------------------------------------------------------------------------------- sizes

BAD_SIZES = [0.0, -1.0, NAN, INF, -INF]


def size_calls(metric, backend):
    """Every public path that takes sizes, as name -> call(x, size). Plans are made here:
    making one is work done before the sizes are given."""
    bipartite = tome_kernels.bipartite_match(metric, 2, class_token=True, backend=backend)
    kth = tome_kernels.kth_bipartite_match(metric, 3, backend=backend)
    return {
        "bipartite_merge": lambda x, s: tome_kernels.bipartite_merge(x, metric, 2, s, class_token=True,
                                                                     backend=backend),
        "bipartite_match.merge_wavg": bipartite.merge_wavg,
        "pitome_merge": lambda x, s: tome_kernels.pitome_merge(x, metric, 2, s, class_token=True, backend=backend),
        "kth.merge_wavg": kth.merge_wavg,
    }


@pytest.mark.parametrize("backend", ["reference", *cpu_backend_cases()])
@pytest.mark.parametrize("bad", BAD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bad_sizes_refused_on_cpu_tensors(bad, dtype, backend, monkeypatch):
    """A size that is not positive and finite is refused, naming size, the value and where it
    is, before the matching or any merge runs (CPU tensors: the values are at hand)."""
    x, metric = torch.randn(2, 8, 3, dtype=dtype), torch.randn(2, 8, 4, dtype=dtype)
    size = torch.ones(2, 8, 1, dtype=dtype)
    size[1, 5, 0] = bad
    for name, call in size_calls(metric, backend).items():
        with no_backend_work(monkeypatch, backend):
            with pytest.raises(ValueError, match=r"size must be positive and finite .* at index \(1, 5, 0\)"):
                call(x, size)


@pytest.mark.slow  # dynamo's first use: about 10 s
def test_size_values_are_not_read_while_tracing():
    """Under torch.compile the values are unknown: the check steps aside (no data-dependent
    branch in the graph), as it does for GPU tensors."""
    size = torch.ones(1, 4, 1)
    size[0, 1] = 0.0

    @torch.compile(backend="eager", fullgraph=True)
    def checked(s):
        checks.check_size(s, 1, 4, s.device)
        return s + 1

    assert torch.equal(checked(size), size + 1)
    with pytest.raises(ValueError, match="size must be positive"):
        checks.check_size(size, 1, 4, size.device)


# The interpreter's NumPy warns about the NaN arithmetic this test asks for.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", cpu_backend_cases())
def test_unchecked_bad_sizes_give_the_same_rows_on_every_backend(backend, monkeypatch):
    """Where sizes are not read (GPU tensors), 0 / negative / inf / NaN sizes go through the
    weighted mean's formula on every backend alike: the same NaN rows in the same places and
    the same values elsewhere. Checked here by turning the check off for CPU tensors."""
    monkeypatch.setattr(checks, "_size_values_readable", lambda size: False)
    g = torch.Generator().manual_seed(5)
    x, metric = torch.randn(2, 12, 5, generator=g), torch.randn(2, 12, 4, generator=g)
    size = torch.rand(2, 12, 1, generator=g) + 0.5
    size[0, :, 0] = torch.tensor([1, 0, 0, 0, -1, 1, NAN, 2, INF, 1, -3, 0.5])
    size[1, :, 0] = 0.0  # every group sums to 0: NaN everywhere merged, copies elsewhere
    calls, refs, truths = (size_calls(m, be) for m, be in ((metric, backend), (metric, "reference"),
                                                              (metric.double(), "reference")))
    for name, call in calls.items():
        got = call(x, size)
        ref = refs[name](x, size)
        truth = truths[name](x.double(), size.double())
        assert not bool(ref[0].isfinite().all()), f"{name}: the case should make non-finite rows"
        for part, (g_, r_) in enumerate(zip(got, ref)):
            assert torch.equal(g_.isnan(), r_.isnan()), f"{name} [part {part}]: NaN rows differ"
        assert_within_twice_reference_error(got, ref, truth, msg=name)


# -------------------------------------------------------------------------- number arguments

METRIC = torch.randn(2, 17, 4)
X = torch.randn(2, 17, 3)


@functools.lru_cache(maxsize=None)
def make_vit():
    """One tiny ViT for every call: patching a patched model first restores it."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=16)


@functools.lru_cache(maxsize=None)
def make_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=8, max_position_embeddings=16)
    return transformers.BertModel(cfg)


def diffusion(**kwargs):
    # The arguments are checked before the model: a Linear gets past them only to be refused
    # for having no transformer block, which tells an accepted argument from a refused one.
    try:
        tome_patch.diffusion(nn.Linear(2, 2), **kwargs)
    except ValueError as exc:
        if "contains no diffusers transformer block" not in str(exc):
            raise


# Every count argument of the public functions and patches: name -> (call(value), a valid value).
COUNTS = {
    "bipartite_merge r": (lambda v: tome_kernels.bipartite_merge(X, METRIC, v), 2),
    "bipartite_match r": (lambda v: tome_kernels.bipartite_match(METRIC, v), 2),
    "pitome_match r": (lambda v: tome_kernels.pitome_match(METRIC, v), 2),
    "pitome_merge r": (lambda v: tome_kernels.pitome_merge(X, METRIC, v), 2),
    "kth_bipartite_match k": (lambda v: tome_kernels.kth_bipartite_match(METRIC, v), 2),
    "random_bipartite_match r": (lambda v: tome_kernels.random_bipartite_match(METRIC, v), 2),
    "grid_match r": (lambda v: tome_kernels.grid_match(METRIC[:, 1:], v, (4, 4)), 2),
    "grid_match grid_size": (lambda v: tome_kernels.grid_match(METRIC[:, 1:], 2, (v, 4)), 4),
    "grid_match stride": (lambda v: tome_kernels.grid_match(METRIC[:, 1:], 2, (4, 4), stride=(2, v)), 2),
    "window_match r": (lambda v: tome_kernels.window_match(METRIC, v, (4, 4), class_token=True), 2),
    "window_match grid_size": (lambda v: tome_kernels.window_match(METRIC, 2, (4, v), class_token=True), 4),
    "window_match window": (lambda v: tome_kernels.window_match(METRIC, 2, (4, 4), window=v, class_token=True), 2),
    "r_per_block r": (lambda v: r_per_block(v, 4), 2),
    "r_per_block r[i]": (lambda v: r_per_block([1, v], 4), 2),
    "r_per_block (r, inflection)": (lambda v: r_per_block((v, 0.5), 4), 2),
    "r_per_block num_blocks": (lambda v: r_per_block(2, v), 4),
    "dsm_r_per_block delay": (lambda v: dsm_r_per_block(2, 4, v), 1),
    "keep_ratio_r tokens": (lambda v: keep_ratio_r(0.9, v, 4), 17),
    "keep_ratio_r num_blocks": (lambda v: keep_ratio_r(0.9, 17, v), 4),
    "keep_ratio_r protected": (lambda v: keep_ratio_r(0.9, 17, 4, v), 1),
    "patch.timm r": (lambda v: tome_patch.timm(make_vit(), v), 2),
    "patch.timm delay": (lambda v: tome_patch.timm(make_vit(), 2, method="dsm", delay=v), 1),
    "patch.timm window": (lambda v: tome_patch.timm(make_vit(), 2, method="dsm", window=(v, 2)), 2),
    "patch.bert r": (lambda v: tome_patch.bert(make_bert(), v), 2),
    "patch.diffusion sx": (lambda v: diffusion(sx=v), 2),
    "patch.diffusion max_downsample": (lambda v: diffusion(max_downsample=v), 2),
    "patch.diffusion seed": (lambda v: diffusion(seed=v), 2),
    "patch.diffusion latent_size": (lambda v: diffusion(latent_size=(v, 4)), 4),
}


@pytest.mark.parametrize("name", COUNTS)
def test_count_arguments_one_rule(name):
    """A count is an int, Python or NumPy; a bool, a float, a str or a tensor (even one
    holding an int) is a TypeError; a negative count a ValueError."""
    call, valid = COUNTS[name]
    call(valid)
    call(np.int64(valid))
    call(np.int32(valid))
    for bad in (True, float(valid), str(valid), torch.tensor(valid)):
        with pytest.raises(TypeError, match=r"must be (a Python int|an int)"):
            call(bad)
    with pytest.raises(ValueError, match=r"must be (>= \d|positive|in \[)"):
        call(-1)


# Every real argument: name -> (call(value), a valid value, an out-of-range value).
REALS = {
    "pitome_match margin": (lambda v: tome_kernels.pitome_match(METRIC, 2, margin=v), 0.5, 1.5),
    "pitome_match alpha": (lambda v: tome_kernels.pitome_match(METRIC, 2, alpha=v), 0.5, 0.0),
    "pitome_merge margin": (lambda v: tome_kernels.pitome_merge(X, METRIC, 2, margin=v), -0.5, -1.01),
    "r_per_block inflection": (lambda v: r_per_block((2, v), 4), 0.5, 2.0),
    "keep_ratio_r ratio": (lambda v: keep_ratio_r(v, 17, 4), 0.5, 0.0),
    "pitome_match margin (gaussian)": (lambda v: tome_kernels.pitome_match(METRIC, 2, margin=v, energy_form="gaussian"),
                                       0.5, 1.0),
    "patch.timm margin": (lambda v: tome_patch.timm(make_vit(), 2, method="pitome", margin=v), 0.5, 4.0),
    "patch.timm alpha": (lambda v: tome_patch.timm(make_vit(), 2, method="pitome", alpha=v), 2.0, -1.0),
    "patch.bert margin": (lambda v: tome_patch.bert(make_bert(), 2, method="pitome", margin=v), 0.5, -2.0),
    "patch.diffusion ratio": (lambda v: diffusion(ratio=v), 0.5, 1.5),
}


@pytest.mark.parametrize("name", REALS)
def test_real_arguments_one_rule(name):
    """A real is an int or a float, Python or NumPy; a bool, a str or a tensor is a
    TypeError; NaN, an infinity or a value outside the argument's range a ValueError."""
    call, valid, outside = REALS[name]
    call(valid)
    call(np.float32(valid))
    call(np.float64(valid))
    for bad in (True, str(valid), torch.tensor(valid)):
        with pytest.raises(TypeError, match=r"must be a real number"):
            call(bad)
    for bad in (NAN, INF, -INF, outside, np.float32(NAN)):
        with pytest.raises(ValueError, match=r"must be (finite|in |> |>= )"):
            call(bad)


def test_pitome_ranges_are_the_same_in_the_patches():
    """What pitome_match refuses, the patches refuse at patch time (not at the first block)."""
    for options in (dict(margin=1.5), dict(alpha=0.0), dict(margin=NAN)):
        with pytest.raises(ValueError) as direct:
            tome_kernels.pitome_match(METRIC, 2, **options)
        with pytest.raises(ValueError) as patched:
            tome_patch.timm(make_vit(), 2, method="pitome", **options)
        assert str(direct.value) == str(patched.value)


# Every choice argument: name -> call(value), and a valid value.
CHOICES = {
    "energy_form": (lambda v: tome_kernels.pitome_match(METRIC, 2, energy_form=v), "paper"),
    "split": (lambda v: tome_kernels.pitome_match(METRIC, 2, split=v), "halves"),
    "preset": (lambda v: tome_patch.timm(make_vit(), 2, method="pitome", preset=v), "authors_mae"),
}


@pytest.mark.parametrize("name", CHOICES)
def test_choice_arguments_one_rule(name):
    """A choice is one of the listed str: another type is a TypeError, another name a
    ValueError listing the choices."""
    call, valid = CHOICES[name]
    call(valid)
    for bad in (1, [valid], b"paper"):
        with pytest.raises(TypeError, match=f"{name} must be a str, one of"):
            call(bad)
    with pytest.raises(ValueError, match=f"{name} must be one of .*{valid}"):
        call(valid.upper())


def test_mode_must_be_a_str():
    plan = tome_kernels.bipartite_match(METRIC, 2)
    with pytest.raises(TypeError, match="mode must be a str"):
        plan.merge(X, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        plan.merge(X, "max")


def test_plan_shape_errors_name_the_argument_and_the_plan():
    """MergePlan's messages say B and N come from the plan (there may be no metric at hand),
    and for unmerge that the rows are N - r."""
    plan = tome_kernels.bipartite_match(METRIC, 2)
    with pytest.raises(ValueError, match=r"^x must have shape \(B, 17, C\) with B=2 and N=17 \(from the plan\)"):
        plan.merge_wavg(torch.randn(2, 16, 3))
    with pytest.raises(ValueError, match=r"^size must have shape \(B, N, 1\) with B=2 and N=17 \(from the plan\)"):
        plan.merge_wavg(X, torch.ones(2, 16, 1))
    with pytest.raises(ValueError, match=r"^size must have shape \(B, N, 1\), got \(2, 17, 2\)"):
        plan.merge_wavg(X, torch.ones(2, 17, 2))
    with pytest.raises(TypeError, match=r"^size must be a floating-point tensor"):
        plan.merge_wavg(X, torch.ones(2, 17, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^y must have shape \(B, 15, C\) with B=2 and N - r=15 "
                                         r"\(from the plan: N=17, r=2\)"):
        plan.unmerge(torch.randn(2, 17, 3))


def test_flags_are_python_or_numpy_bools():
    """Flags follow the counts' rule: NumPy's kind of the type is accepted, an int is not."""
    metric = torch.randn(1, 8, 4)
    assert tome_kernels.bipartite_match(metric, 2, class_token=np.True_).r == 2
    assert torch.equal(tome_kernels.bipartite_match(metric, 2, class_token=np.True_).token_map,
                       tome_kernels.bipartite_match(metric, 2, class_token=True).token_map)
    with pytest.raises(TypeError, match=r"class_token must be a bool \(Python or NumPy\), got int: 1"):
        tome_kernels.bipartite_match(metric, 2, class_token=1)
    with pytest.raises(TypeError, match=r"got numpy\.random\._generator\.Generator"):
        tome_kernels.random_bipartite_match(metric, 2, generator=np.random.default_rng(0))


def test_a_margin_made_symbolic_by_torch_compile_is_traced():
    """With dynamic floats (the second call's margin), the check compares the value as
    dynamo can trace, instead of math.isfinite, which broke the graph."""
    keys = torch.randn(2, 4, 17, 16, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    def plan(k, margin):
        return tome_kernels.pitome_match(k, 3, margin=margin, class_token=True).token_map

    compiled = torch.compile(plan, fullgraph=True, backend="eager")
    for margin in (0.9, 0.8, -0.5):
        expected = tome_kernels.pitome_match(keys, 3, margin=margin, class_token=True).token_map
        assert torch.equal(compiled(keys, margin), expected), margin
