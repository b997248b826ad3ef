"""tome_kernels.patch.timm on timm's VisionTransformer family (random weights: no download)."""

import copy
import re

import pytest
import torch

timm = pytest.importorskip("timm")

import tome_kernels.patch as tome_patch  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_within_twice_reference_error,  # noqa: E402
    cpu_backend_cases,
    logits,
    tokens_seen_by_blocks,
)
from tome_kernels.patch.schedule import r_per_block  # noqa: E402
from tome_kernels.reference import clamp_r  # noqa: E402

# Small members of each family: class token, distillation token, LayerScale, qk_norm, and a
# model without class token that averages its tokens.
VARIANTS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "layerscale": ("deit3_small_patch16_224", {"embed_dim": 192, "num_heads": 3}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "avg_pool": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
}


def make_model(variant="vit", depth=4, img_size=96, **extra):
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=depth, img_size=img_size, **kwargs, **extra)
    return model.eval()


def images(batch=2, img_size=96):
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))


def expected_counts(n, schedule, protected):
    counts = []
    for r in schedule:
        n -= clamp_r(r, n, protected >= 1, protected >= 2)
        counts.append(n)
    return counts


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("fused_attn", [True, False])
def test_r0_is_the_unpatched_model(variant, prop_attn, fused_attn):
    model = make_model(variant)
    for block in model.blocks:
        block.attn.fused_attn = fused_attn
    x = images()
    expected = logits(model, x)
    tome_patch.timm(model, 0, prop_attn=prop_attn)
    assert torch.equal(logits(model, x), expected)


@pytest.mark.parametrize("variant", ["vit", "deit_distilled", "avg_pool"])
@pytest.mark.parametrize("r", [3, [0, 10, 2], (6, 1.0), (6, -1.0), 1000])
def test_token_count_after_every_block(variant, r):
    model = make_model(variant)
    protected = {"vit": 1, "deit_distilled": 2, "avg_pool": 0}[variant]
    n0 = (96 // 16) ** 2 + protected
    tome_patch.timm(model, r)
    schedule = r_per_block(r, len(model.blocks))
    assert tokens_seen_by_blocks(model, images()) == expected_counts(n0, schedule, protected)


def test_schedules():
    assert r_per_block(5, 3) == [5, 5, 5]
    assert r_per_block([4, 2], 4) == [4, 2, 0, 0]
    # (r, inflection): lo = int(r (1 - inflection)), hi = 2 r - lo, linear over the blocks.
    assert r_per_block((8, 0), 4) == [8, 8, 8, 8]
    assert r_per_block((8, 1), 5) == [0, 4, 8, 12, 16]
    assert r_per_block((8, -1), 5) == [16, 12, 8, 4, 0]
    assert r_per_block((6, 0.5), 3) == [3, 6, 9]
    assert r_per_block((7, 1), 1) == [7]


@pytest.mark.parametrize(
    "r, error, words",
    [
        (-1, ValueError, "r must be >= 0"),
        (2.5, TypeError, "r must be a Python int"),
        (True, TypeError, "r must be"),
        ([1, 2, 3, 4, 5], ValueError, "5 per-block values but the model has 4 blocks"),
        ([1, -2], ValueError, "r[1]"),
        ((1, 2, 3), ValueError, "(r, inflection)"),
        ((4, "x"), TypeError, "inflection"),
        ((2, 4), ValueError, "inflection of r = (r, inflection) must be in [-1, 1], got 4"),
        ((2, float("nan")), ValueError, "must be in [-1, 1], got nan"),
        ((2, float("-inf")), ValueError, "must be in [-1, 1], got -inf"),
    ],
)
def test_bad_schedules_leave_the_model_alone(r, error, words):
    model = make_model()
    tome_patch.timm(model, 2)
    with pytest.raises(error, match=re.escape(words)):
        tome_patch.timm(model, r)
    # The earlier patch is still in force: nothing was half-done.
    assert tome_patch.get_state(model).r == [2, 2, 2, 2]


@pytest.mark.parametrize("flag, value", [("prop_attn", "False"), ("prop_attn", 0), ("trace_source", "False"),
                                         ("trace_source", 0), ("trace_source", None)])
def test_flags_must_be_bools(flag, value):
    """prop_attn="False" would be true: a flag that is not a bool is refused, model unchanged.
    (prop_attn=None is the method's default: on, or as a PiToMe preset says.)"""
    model = make_model()
    tome_patch.timm(model, 2)
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        tome_patch.timm(model, 3, **{flag: value})
    assert tome_patch.get_state(model).r == [2, 2, 2, 2]


def test_bad_models_and_arguments():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        tome_patch.timm(torch.nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="register tokens"):
        tome_patch.timm(make_model(reg_tokens=2), 4)
    from timm.models.vision_transformer import ResPostBlock

    with pytest.raises(ValueError, match=r"blocks\[0\] is a ResPostBlock"):
        tome_patch.timm(make_model(block_fn=ResPostBlock), 4)
    with pytest.raises(ValueError, match="'nope' is not a backend"):
        tome_patch.timm(make_model(), 4, backend="nope")
    with pytest.raises(TypeError, match="backend must be a str"):
        tome_patch.timm(make_model(), 4, backend=None)
    checkpointed = make_model()
    checkpointed.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        tome_patch.timm(checkpointed, 4)
    patched = tome_patch.timm(make_model(), 4)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        patched.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="takes no attn_mask"):
        patched.forward_features(images(), attn_mask=torch.zeros(1))
    with pytest.raises(ValueError, match="not patched"):
        tome_patch.get_state(make_model())


@pytest.mark.parametrize("backend", cpu_backend_cases())
@pytest.mark.parametrize("variant", ["vit", "deit_distilled", "layerscale"])
def test_every_backend_gives_the_same_logits(variant, backend):
    model = make_model(variant, depth=3, img_size=64)
    x = images(2, 64)
    # The truth: the reference on a float64 copy, with the same merges (the same sizes).
    model64 = tome_patch.timm(copy.deepcopy(model).double(), 5, backend="reference")
    exact = logits(model64, x.double())
    results = {}
    for name in ("reference", backend):
        tome_patch.timm(model, 5, backend=name)
        results[name] = logits(model, x)
        protected = 2 if variant == "deit_distilled" else 1
        assert tome_patch.get_state(model).size.shape[1] == expected_counts(16 + protected, [5] * 3, protected)[-1]
        assert torch.equal(tome_patch.get_state(model).size, tome_patch.get_state(model64).size), name
    assert_within_twice_reference_error(results[backend], results["reference"], exact, msg=backend)


def test_remove_restores_the_model():
    model = make_model("qk_norm")
    x = images()
    expected = logits(model, x)
    keys = list(model.state_dict())
    classes = [type(model)] + [type(b) for b in model.blocks]
    tome_patch.timm(model, 8, trace_source=True)
    assert list(model.state_dict()) == keys, "patching must not rename parameters"
    assert not torch.equal(logits(model, x), expected)
    assert tome_patch.remove(model) is model
    assert [type(model)] + [type(b) for b in model.blocks] == classes
    assert not tome_patch.is_patched(model)
    assert all(not b.attn.k_norm._forward_hooks for b in model.blocks)
    assert not any(hasattr(m, "_tome_state") for m in model.modules())
    assert torch.equal(logits(model, x), expected)
    # Removing twice, or from a model never patched, changes nothing.
    assert tome_patch.remove(model) is model
    assert torch.equal(logits(model, x), expected)


def test_patching_again_replaces_the_settings():
    model = make_model()
    tome_patch.timm(model, 2)
    tome_patch.timm(model, 7, prop_attn=False)
    state = tome_patch.get_state(model)
    assert (state.r, state.prop_attn) == ([7] * 4, False)
    assert all(len(b.attn.k_norm._forward_hooks) == 1 for b in model.blocks)
    # The model and blocks are subclassed once, from their original classes, not twice.
    assert type(model)._tome_original_class is timm.models.vision_transformer.VisionTransformer
    assert type(model.blocks[0])._tome_original_class is timm.models.vision_transformer.Block


@pytest.mark.parametrize("variant", ["vit", "deit_distilled"])
def test_source_tracing(variant):
    model = make_model(variant)
    x = images()
    tome_patch.timm(model, 6)
    untraced = logits(model, x)
    tome_patch.timm(model, 6, trace_source=True)
    assert torch.equal(logits(model, x), untraced), "tracing must not change the result"
    state = tome_patch.get_state(model)
    n_out = state.size.shape[1]
    assert state.token_map.shape == (2, x.shape[-1] ** 2 // 256 + 1 + (variant == "deit_distilled"))
    assert state.token_map.dtype == torch.int64
    # Each final token stands for exactly the input tokens that map to it.
    for b in range(2):
        counts = torch.bincount(state.token_map[b], minlength=n_out)
        assert torch.equal(counts.float(), state.size[b, :, 0])
    assert (state.token_map[:, 0] == 0).all(), "the class token stays at row 0"
    if variant == "deit_distilled":
        assert (state.token_map[:, 1] == 1).all()
    dense = state.source_matrix()
    assert dense.shape == (2, n_out, state.token_map.shape[1])
    assert torch.equal(dense.sum(dim=1), torch.ones_like(dense.sum(dim=1)))
    assert torch.equal(dense.sum(dim=2, keepdim=True), state.size)


def test_source_matrix_needs_tracing():
    model = make_model()
    tome_patch.timm(model, 4)
    logits(model, images())
    with pytest.raises(ValueError, match="trace_source=True"):
        tome_patch.get_state(model).source_matrix()


def test_proportional_attention_counts_a_token_as_its_size():
    """Attention with log(size) added equals attention over the keys repeated size times."""
    torch.manual_seed(0)
    model = make_model()
    attn = model.blocks[0].attn
    state = tome_patch.ToMeState([0], class_token=True, distill_token=False, prop_attn=True,
                                 trace_source=False, backend="auto")
    tokens = torch.randn(1, 5, 192)
    sizes = torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0])
    state.size, state.merged = sizes.view(1, 5, 1), True
    repeated = tokens.repeat_interleave(sizes.long(), dim=1)
    first_copy = torch.cumsum(sizes.long(), 0) - sizes.long()
    attn64 = copy.deepcopy(attn).double()
    with torch.no_grad():
        for fused in (True, False):
            attn.fused_attn = attn64.fused_attn = fused
            weighted = attn(tokens, attn_mask=state.attention_bias(tokens.dtype))
            plain = attn(repeated)[:, first_copy]
            # The repeated keys are the reference path; in float64, the truth.
            exact = attn64(repeated.double())[:, first_copy]
            assert_within_twice_reference_error(weighted, plain, exact, msg=f"fused_attn={fused}")


def test_proportional_attention_switch():
    model = make_model()
    x = images()
    # The truth: a float64 copy, with the same merges (the same sizes). The unfused attention
    # under test is not the fused (SDPA) one it is compared with: the unpatched model's error
    # along the unfused attention may set the budget.
    model64 = copy.deepcopy(model).double()
    for block in model64.blocks:
        block.attn.fused_attn = False
    unfused = copy.deepcopy(model)
    for block in unfused.blocks:
        block.attn.fused_attn = False
    unpatched = (logits(unfused, x), logits(model64, x.double()))
    tome_patch.timm(model64, 8, prop_attn=True)
    exact = logits(model64, x.double())
    tome_patch.timm(model, 8, prop_attn=True)
    with_prop = logits(model, x)
    assert torch.equal(tome_patch.get_state(model).size, tome_patch.get_state(model64).size)
    for block in model.blocks:
        block.attn.fused_attn = False
    assert_within_twice_reference_error(logits(model, x), with_prop, exact, also=[unpatched])
    tome_patch.timm(model, 8, prop_attn=False)
    assert not torch.allclose(logits(model, x), with_prop, rtol=1e-3, atol=1e-4)


def test_average_pooling_is_weighted_by_size():
    model = make_model("avg_pool")
    tome_patch.timm(model, 8)
    with torch.no_grad():
        features = model.forward_features(images())
        pooled = model.pool(features)
    size = tome_patch.get_state(model).size
    torch.testing.assert_close(pooled, (features * size).sum(1) / size.sum(1))


@pytest.mark.parametrize("backend", cpu_backend_cases(torch.bfloat16))
def test_bfloat16_patched_model_on_every_backend(backend):
    model = make_model(depth=2, img_size=64)
    # Seed 198: every merge here wins by >= 0.026 in float64, ten times bfloat16's error on
    # the scores, so every backend and CPU merges alike (images()' seed has a near-tie).
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(198))
    # The truth: the reference on a float64 copy, with the same merges (the same sizes).
    model64 = tome_patch.timm(copy.deepcopy(model).double(), 4, backend="reference")
    exact = logits(model64, x.double())
    results = {}
    for name in ("reference", backend):
        tome_patch.timm(model, 4, backend=name)
        results[name] = logits(model.to(torch.bfloat16), x.to(torch.bfloat16))
        assert torch.isfinite(results[name]).all()
        assert torch.equal(tome_patch.get_state(model).size, tome_patch.get_state(model64).size), name
    assert_within_twice_reference_error(results[backend], results["reference"], exact, msg=backend)


def test_torch_compile_of_a_patched_model():
    model = make_model(depth=2, img_size=64)
    x = images(2, 64)
    # The truth: the eager model on a float64 copy, with the same merges.
    model64 = tome_patch.timm(copy.deepcopy(model).double(), 5, trace_source=True)
    exact = logits(model64, x.double())
    tome_patch.timm(model, 5, trace_source=True)
    eager = logits(model, x)
    eager_map = tome_patch.get_state(model).token_map.clone()
    assert torch.equal(tome_patch.get_state(model64).token_map, eager_map)
    compiled = torch.compile(model, fullgraph=True)
    assert_within_twice_reference_error(logits(compiled, x), eager, exact)
    assert torch.equal(tome_patch.get_state(model).token_map, eager_map)


def test_gradients_flow_through_a_patched_model():
    model = make_model(depth=2, img_size=64).train()
    tome_patch.timm(model, 5)
    loss = model(images(2, 64)).square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


class _OwnForwardBlock(timm.models.vision_transformer.Block):
    """The issue's example: a Block subclass whose forward the patch would replace."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal) * 0.5 + 1.0


class _SubclassedBlock(timm.models.vision_transformer.Block):
    """A subclass that keeps Block's forward: patchable."""


class _OwnForwardAttention(timm.layers.Attention):
    def forward(self, x, attn_mask=None, is_causal=False):
        return super().forward(x, attn_mask=None) * 2.0


def _with_attention(model, attention_class):
    for block in model.blocks:
        block.attn.__class__ = attention_class
    return model


@pytest.mark.parametrize("build, words", [
    (lambda: make_model(depth=2, img_size=64, block_fn=_OwnForwardBlock),
     r"blocks\[0\] is a _OwnForwardBlock, a Block subclass with its own forward"),
    (lambda: make_model(depth=2, img_size=64, block_fn=timm.models.vision_transformer.ParallelThingsBlock),
     r"blocks\[0\] is a ParallelThingsBlock, not a timm Block"),
    (lambda: make_model(depth=2, img_size=64, block_fn=timm.models.vision_transformer.ParallelScalingBlock),
     r"blocks\[0\] is a ParallelScalingBlock, not a timm Block"),
    (lambda: _with_attention(make_model(depth=2, img_size=64), _OwnForwardAttention),
     r"blocks\[0\] has attention _OwnForwardAttention, an Attention subclass with its own forward"),
])
@pytest.mark.parametrize("r", [0, 4])
def test_blocks_the_patch_cannot_reproduce_are_refused(build, words, r):
    """Refused at any r (at r = 0 the replaced forward used to change the output), before
    anything changes."""
    model = build()
    x = images(2, 64)
    expected = logits(model, x)
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=words):
        tome_patch.timm(model, r)
    assert [type(m) for m in model.modules()] == classes and not tome_patch.is_patched(model)
    assert torch.equal(logits(model, x), expected)


def test_a_block_subclass_keeping_blocks_forward_is_patched():
    model = make_model(depth=2, img_size=64, block_fn=_SubclassedBlock)
    x = images(2, 64)
    expected = logits(model, x)
    tome_patch.timm(model, 0)
    assert torch.equal(logits(model, x), expected)
    tome_patch.timm(model, 5)
    assert tokens_seen_by_blocks(model, x) == expected_counts(17, [5, 5], 1)
    assert isinstance(model.blocks[0], _SubclassedBlock)


def _intermediates(model, x, **kwargs):
    with torch.no_grad():
        return model.forward_intermediates(x, **kwargs)


def test_every_forward_path_at_r0_is_the_unpatched_models():
    model = make_model(depth=3, img_size=64)
    x = images(2, 64)
    mask = torch.zeros(17, 17)
    mask[:, 3] = float("-inf")
    paths = {
        "forward": lambda m: m(x),
        "forward_features": lambda m: m.forward_features(x),
        "forward_head": lambda m: m.forward_head(m.forward_features(x)),
        "pre_logits": lambda m: m.forward_head(m.forward_features(x), pre_logits=True),
        "blocks": lambda m: m.blocks(m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))),
        "attn_mask": lambda m: m(x, attn_mask=mask),
        "is_causal": lambda m: m.forward_features(x, is_causal=True),
        "intermediates_nchw": lambda m: m.forward_intermediates(x)[1][-1],
        "intermediates_nlc": lambda m: m.forward_intermediates(x, output_fmt="NLC")[1][-1],
        "get_intermediate_layers": lambda m: m.get_intermediate_layers(x, n=2, reshape=True)[0],
    }
    with torch.no_grad():
        expected = {name: path(model) for name, path in paths.items()}
        tome_patch.timm(model, 0)
        for name, path in paths.items():
            assert torch.equal(path(model), expected[name]), name


def test_every_forward_path_merges_or_refuses():
    """While r > 0, each public forward path of the model merges, or raises a ValueError
    saying why before any block runs."""
    model = make_model(depth=3, img_size=64)
    x = images(2, 64)
    tome_patch.timm(model, 4)
    counts = expected_counts(17, [4, 4, 4], 1)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1] == counts[-1]
        assert torch.equal(model.forward_head(features), model(x))
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre.shape == (2, 192)
        # The bare block stack also merges.
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        assert model.blocks(tokens).shape[1] == counts[-1]
        # timm splits the class token off the intermediates.
        final, intermediates = model.forward_intermediates(x, output_fmt="NLC")
        assert [y.shape[1] + 1 for y in intermediates] == counts and final.shape[1] == counts[-1]
        layers = model.get_intermediate_layers(x, n=2)
        assert [y.shape[1] + 1 for y in layers] == counts[1:]
    refused = {
        "forward attn_mask": lambda: model(x, attn_mask=torch.zeros(17, 17)),
        "forward_features is_causal": lambda: model.forward_features(x, is_causal=True),
        "intermediates NCHW": lambda: model.forward_intermediates(x),
        "intermediates attn_mask": lambda: model.forward_intermediates(x, output_fmt="NLC",
                                                                       attn_mask=torch.zeros(17, 17)),
        "get_intermediate_layers reshape": lambda: model.get_intermediate_layers(x, n=2, reshape=True),
        "block attn_mask": lambda: model.blocks[0](tokens, attn_mask=torch.zeros(17, 17)),
    }
    for name, path in refused.items():
        with pytest.raises(ValueError, match="no attn_mask|no patch grid"):
            path()


def test_average_pooling_refuses_features_of_another_pass():
    model = tome_patch.timm(make_model("avg_pool", depth=2, img_size=64), 4)
    with torch.no_grad():
        features = model.forward_features(images(2, 64))
        model.forward_features(images(3, 64))
        with pytest.raises(ValueError, match="pool the features of that pass"):
            model.forward_head(features)


def test_forwards_replaced_on_the_instance_are_refused():
    """A forward set on a block, its attention or its k_norm instance would be skipped by
    the patched forward, or skip the key hook: refused at patch time, model unchanged."""
    for where in ("block", "attn", "k_norm"):
        model = make_model(depth=2, img_size=64)
        target = {"block": model.blocks[1], "attn": model.blocks[1].attn, "k_norm": model.blocks[1].attn.k_norm}[where]
        target.forward = target.forward  # a bound method set on the instance, as monkeypatching does
        with pytest.raises(ValueError, match=r"blocks\[1\] .*set on the instance"):
            tome_patch.timm(model, 4)
        assert not tome_patch.is_patched(model)


def test_keys_missing_at_merge_time_name_the_block():
    model = tome_patch.timm(make_model(depth=2, img_size=64), 4)
    model.blocks[1].attn.k_norm._forward_hooks.clear()  # the key hook lost after patching
    with pytest.raises(RuntimeError, match="block 1's attention did not hand its keys"):
        logits(model, images(2, 64))


def test_gradient_checkpointing_message():
    model = make_model(depth=2, img_size=64)
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="^model has gradient checkpointing on: gradient checkpointing recomputes"):
        tome_patch.timm(model, 4)
