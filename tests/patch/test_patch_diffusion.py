"""tome_kernels.patch.diffusion on diffusers' BasicTransformerBlock (tiny random models)."""

import pytest
import torch
from torch import nn

import tome_kernels.patch as tome_patch
from tests.helpers import assert_within_twice_reference_error, cpu_backend_cases
from tests.patch.diffusers_models import (
    CONTEXT_DIM,
    DIM,
    NO_UNEXPECTED_NO_OPS,
    BasicTransformerBlock,
    NoMergeWarning,
    Transformer2DModel,
    context,
    dit,
    dit_inputs,
    make_block,
    make_unet,
    one_thread,  # noqa: F401 (a fixture, used by every test through the mark below)
    record_tokens,
    run,
    tokens,
    unet_inputs,
)
from tome_kernels import grid_match
from tome_kernels.patch.diffusion import _merged_forward

pytestmark = [NO_UNEXPECTED_NO_OPS, pytest.mark.usefixtures("one_thread")]


def adaln_single_input(batch):
    """PixArt's timestep input to a block: the six (B, C) modulations, flattened."""
    return torch.randn(batch, 6 * DIM, generator=torch.Generator().manual_seed(3))


# Extra forward arguments each supported norm type needs.
NORM_CASES = {
    "layer_norm": ({}, lambda b: {}),
    "ada_norm_zero": ({"num_embeds_ada_norm": 10},
                      lambda b: {"timestep": torch.tensor([1, 7][:b]), "class_labels": torch.tensor([3, 0][:b])}),
    "ada_norm_single": ({}, lambda b: {"timestep": adaln_single_input(b)}),
}


def norm_block(norm_type, **kwargs):
    block_kwargs, forward_kwargs = NORM_CASES[norm_type]
    return make_block(norm_type=norm_type, **block_kwargs, **kwargs), forward_kwargs(2)


def hand_merged(block, x, encoder, plan, attn=True, cross=False, mlp=False):
    """Stable Diffusion's block written out with the plan's merge and unmerge."""

    def merged(t, on):
        return plan.merge(t, "mean") if on else t

    def unmerged(t, on):
        return plan.unmerge(t) if on else t

    with torch.no_grad():
        x = unmerged(block.attn1(merged(block.norm1(x), attn)), attn) + x
        x = unmerged(block.attn2(merged(block.norm2(x), cross), encoder_hidden_states=encoder), cross) + x
        return unmerged(block.ff(merged(block.norm3(x), mlp)), mlp) + x


@pytest.mark.parametrize("norm_type", sorted(NORM_CASES))
@pytest.mark.parametrize("variant", [{}, {"only_cross_attention": True}, {"double_self_attention": True}, "chunked"])
def test_merged_forward_is_diffusers_forward(norm_type, variant):
    """The rewritten forward with a plan that merges nothing is diffusers' forward, exactly."""
    chunked = variant == "chunked"
    block, extra = norm_block(norm_type, **({} if chunked else variant))
    if chunked:
        block.set_chunk_feed_forward(16, dim=1)
    # With double_self_attention, the second attention is a self-attention too.
    x, encoder = tokens(), None if variant == {"double_self_attention": True} else context()
    expected = run(block, x, encoder_hidden_states=encoder, **extra)
    identity = grid_match(x, 0, (8, 8), backend="reference")
    with torch.no_grad():
        out = _merged_forward(block, identity, x, None, encoder, None, extra.get("timestep"), None,
                              extra.get("class_labels"), merge_attn=True, merge_crossattn=True, merge_mlp=True)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("norm_type", sorted(NORM_CASES))
def test_ratio_0_is_bit_identical(norm_type):
    block, extra = norm_block(norm_type)
    x, encoder = tokens(), context()
    expected = run(block, x, encoder_hidden_states=encoder, **extra)
    tome_patch.diffusion(block, 0.0, merge_crossattn=True, merge_mlp=True)
    assert torch.equal(run(block, x, encoder_hidden_states=encoder, **extra), expected)


@pytest.mark.parametrize("norm_type", sorted(NORM_CASES))
@pytest.mark.parametrize("parts", [(True, False, False), (False, True, True), (True, True, True)])
def test_merged_parts_see_n_minus_r_tokens(norm_type, parts):
    block, extra = norm_block(norm_type)
    x, encoder = tokens(), context()
    unpatched = run(block, x, encoder_hidden_states=encoder, **extra)
    seen = {part: record_tokens(block, part) for part in ("attn1", "attn2", "ff")}
    tome_patch.diffusion(block, 0.4, merge_attn=parts[0], merge_crossattn=parts[1], merge_mlp=parts[2])
    out = run(block, x, encoder_hidden_states=encoder, **extra)
    assert out.shape == x.shape
    assert not torch.allclose(out, unpatched, atol=1e-4)
    r = int(64 * 0.4)
    for part, on in zip(("attn1", "attn2", "ff"), parts):
        assert seen[part][""] == (64 - r if on else 64), part


@pytest.mark.parametrize("random_dst", [True, False])
@pytest.mark.parametrize("parts", [(True, False, False), (True, True, True)])
def test_equals_a_hand_merged_block(random_dst, parts):
    block, x, encoder = make_block(), tokens(), context()
    tome_patch.diffusion(block, 0.5, random_dst=random_dst, seed=5, merge_attn=parts[0], merge_crossattn=parts[1],
                         merge_mlp=parts[2], backend="reference")
    plan = grid_match(x, 32, (8, 8), random_dst=random_dst, generator=torch.Generator().manual_seed(5),
                      backend="reference")
    expected = hand_merged(make_block(), x, encoder, plan, *parts)
    # A bare block is re-seeded at each call, so both calls make the same plan.
    assert torch.equal(run(block, x, encoder_hidden_states=encoder), expected)
    assert torch.equal(run(block, x, encoder_hidden_states=encoder), expected)


def test_seed_decides_the_random_destinations():
    x, encoder = tokens(), context()
    outputs = {}
    for seed in (0, 1):
        outputs[seed] = run(tome_patch.diffusion(make_block(), 0.5, seed=seed), x, encoder_hidden_states=encoder)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)
    fixed = [run(tome_patch.diffusion(make_block(), 0.5, seed=s, random_dst=False), x, encoder_hidden_states=encoder)
             for s in (0, 1)]
    assert torch.equal(fixed[0], fixed[1])
    assert not torch.allclose(fixed[0], outputs[0], atol=1e-4)


def test_unet_is_reseeded_every_forward():
    sample, timestep, encoder = unet_inputs()
    unet = tome_patch.diffusion(make_unet(), 0.5, seed=3)
    first = run(unet, sample, timestep, encoder)
    assert torch.equal(run(unet, sample, timestep, encoder), first)
    tome_patch.diffusion(unet, 0.5, seed=4)
    assert not torch.allclose(run(unet, sample, timestep, encoder), first, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backend_cases())
def test_backends_agree_with_the_reference(backend):
    x, encoder = tokens(), context()
    outputs = {}
    for name in ("reference", backend):
        block = tome_patch.diffusion(make_block(), 0.5, merge_crossattn=True, merge_mlp=True, backend=name)
        seen = record_tokens(block)
        outputs[name] = run(block, x, encoder_hidden_states=encoder)
        assert seen[""] == 32
    # The truth: the reference on a float64 copy, with the same merges (the block's plan is
    # grid_match on its input, random destinations from the default seed 0).
    plans = [grid_match(t, 32, (8, 8), generator=torch.Generator().manual_seed(0), backend="reference")
             for t in (x, x.double())]
    assert torch.equal(plans[0].token_map, plans[1].token_map), "float64 merges differently: choose other inputs"
    block64 = tome_patch.diffusion(make_block().double(), 0.5, merge_crossattn=True, merge_mlp=True,
                                   backend="reference")
    exact = run(block64, x.double(), encoder_hidden_states=encoder.double())
    assert_within_twice_reference_error(outputs[backend], outputs["reference"], exact)


def test_max_downsample_skips_deeper_blocks():
    unet = make_unet()
    sample, timestep, encoder = unet_inputs()
    seen = record_tokens(unet)
    run(unet, sample, timestep, encoder)
    full = dict(seen)
    assert set(full.values()) == {16 * 12, 8 * 6}
    for max_downsample, merged_levels in [(1, {16 * 12}), (2, {16 * 12, 8 * 6})]:
        tome_patch.diffusion(unet, 0.5, max_downsample=max_downsample)
        run(unet, sample, timestep, encoder)
        for name, n in full.items():
            assert seen[name] == (n - n // 2 if n in merged_levels else n), (max_downsample, name)
    assert tome_patch.get_state(unet).recorded_size == (16, 12)


def test_unet_ratio_0_and_remove_are_bit_identical():
    unet = make_unet()
    sample, timestep, encoder = unet_inputs()
    expected = run(unet, sample, timestep, encoder)
    tome_patch.diffusion(unet, 0.0, max_downsample=8)
    assert torch.equal(run(unet, sample, timestep, encoder), expected)
    tome_patch.diffusion(unet, 0.5, max_downsample=8, merge_mlp=True)
    assert not torch.allclose(run(unet, sample, timestep, encoder), expected, atol=1e-5)
    tome_patch.remove(unet)
    assert torch.equal(run(unet, sample, timestep, encoder), expected)
    assert not tome_patch.is_patched(unet) and not unet._forward_pre_hooks and not unet._forward_hooks
    assert all(type(m) is BasicTransformerBlock for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    assert not any(hasattr(m, "_tome_diffusion") for m in unet.modules())


def test_patching_twice_replaces_the_settings():
    block, x, encoder = make_block(), tokens(), context()
    expected = run(block, x, encoder_hidden_states=encoder)
    tome_patch.diffusion(block, 0.5)
    tome_patch.diffusion(block, 0.0)
    assert torch.equal(run(block, x, encoder_hidden_states=encoder), expected)
    assert type(block).__mro__[1:].count(BasicTransformerBlock) == 1
    assert len(block._forward_pre_hooks) == len(block._forward_hooks) == 1
    tome_patch.remove(block)
    assert type(block) is BasicTransformerBlock and not block._forward_pre_hooks and not block._forward_hooks


def test_latent_size():
    block, x, encoder = make_block(), tokens(48), context()
    expected = run(block, x, encoder_hidden_states=encoder)
    tome_patch.diffusion(block, 0.5)
    with pytest.raises(ValueError, match="latent_size"):
        run(block, x, encoder_hidden_states=encoder)
    tome_patch.diffusion(block, 0.5, latent_size=(6, 8), random_dst=False, backend="reference")
    plan = grid_match(x, 24, (6, 8), random_dst=False, backend="reference")
    assert torch.equal(run(block, x, encoder_hidden_states=encoder), hand_merged(make_block(), x, encoder, plan))
    # The tokens of a 12x16 latent downsampled twice: merged only when max_downsample allows.
    tome_patch.diffusion(block, 0.5, latent_size=(12, 16), random_dst=False)
    with pytest.warns(NoMergeWarning, match="downsampling 2 .*max_downsample=2"):
        assert torch.equal(run(block, x, encoder_hidden_states=encoder), expected)
    tome_patch.diffusion(block, 0.5, latent_size=(12, 16), random_dst=False, max_downsample=2,
                         backend="reference")
    assert torch.equal(run(block, x, encoder_hidden_states=encoder), hand_merged(make_block(), x, encoder, plan))
    # 48 tokens are no power-of-two downsampling of 6x9 (54, 15, 6, 2, 1 tokens).
    tome_patch.diffusion(block, 0.5, latent_size=(6, 9), max_downsample=4)
    with pytest.raises(ValueError, match=r"N=48 .*latent_size 6x9 .*d=1: 6x9=54, d=2: 3x5=15\)"):
        run(block, x, encoder_hidden_states=encoder)


def test_transformer_records_its_4d_input():
    torch.manual_seed(0)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=DIM, norm_num_groups=8,
                               cross_attention_dim=CONTEXT_DIM).eval()
    seen = record_tokens(model)
    tome_patch.diffusion(model, 0.5)
    run(model, torch.randn(2, DIM, 8, 6), encoder_hidden_states=context())
    assert seen == {"transformer_blocks.0": 24}


def test_dit_tokens_are_the_patch_grid():
    """DiT's tokens are 2x2 patches of the 8x8 latent: the pass records the 4x4 patch grid,
    so every block is level 1 and merges with the default max_downsample=1; latent_size,
    when given, is that grid."""
    model = dit()
    inputs, conditions = dit_inputs()
    expected = run(model, *inputs, **conditions)
    seen = record_tokens(model)
    tome_patch.diffusion(model, 0.5)
    merged = run(model, *inputs, **conditions)
    assert not torch.allclose(merged, expected, atol=1e-5) and seen == {"transformer_blocks.0": 8}
    last = tome_patch.get_state(model).last_pass
    assert last.recorded_size == (4, 4) and [(c.level, c.grid, c.r) for c in last.blocks] == [(1, (4, 4), 8)]
    tome_patch.diffusion(model, 0.5, latent_size=(4, 4))
    assert torch.equal(run(model, *inputs, **conditions), merged)


def test_forward_time_errors():
    block = tome_patch.diffusion(make_block(), 0.5)
    with pytest.raises(ValueError, match="attention_mask"):
        run(block, tokens(), attention_mask=torch.zeros(2, 1, 64), encoder_hidden_states=context())
    with pytest.raises(ValueError, match="hidden_states"):
        run(block, torch.randn(2, 64, 1, DIM), encoder_hidden_states=context())


BAD_ARGUMENTS = [
    ({"ratio": "0.5"}, TypeError, "ratio"), ({"ratio": True}, TypeError, "ratio"),
    ({"ratio": -0.1}, ValueError, "ratio"), ({"ratio": 1.5}, ValueError, "ratio"),
    ({"ratio": float("nan")}, ValueError, "ratio"),
    ({"sx": 0}, ValueError, "sx"), ({"sy": 2.0}, TypeError, "sy"),
    ({"max_downsample": 0}, ValueError, "max_downsample"), ({"max_downsample": True}, TypeError, "max_downsample"),
    ({"max_downsample": 3}, ValueError, "max_downsample must be a power of two"),
    ({"max_downsample": 12}, ValueError, "max_downsample must be a power of two"),
    ({"random_dst": 1}, TypeError, "random_dst"), ({"merge_attn": "yes"}, TypeError, "merge_attn"),
    ({"merge_crossattn": None}, TypeError, "merge_crossattn"), ({"merge_mlp": 0}, TypeError, "merge_mlp"),
    ({"seed": -1}, ValueError, "seed"), ({"seed": 2**64}, ValueError, "seed"), ({"seed": 1.5}, TypeError, "seed"),
    ({"latent_size": (8,)}, TypeError, "latent_size"), ({"latent_size": (0, 8)}, ValueError, "latent_size"),
    ({"backend": "nope"}, ValueError, "backend"), ({"backend": None}, TypeError, "backend"),
]


@pytest.mark.parametrize("kwargs, error, name", BAD_ARGUMENTS)
def test_bad_arguments_leave_the_model_as_it_was(kwargs, error, name):
    block = make_block()
    with pytest.raises(error, match=name):
        tome_patch.diffusion(block, **kwargs)
    assert type(block) is BasicTransformerBlock and not tome_patch.is_patched(block) and not block._forward_pre_hooks
    # A patched model keeps its settings.
    tome_patch.diffusion(block, 0.25)
    with pytest.raises(error, match=name):
        tome_patch.diffusion(block, **kwargs)
    assert tome_patch.get_state(block).ratio == 0.25 and len(block._forward_pre_hooks) == 1


@pytest.mark.parametrize("bad_block, reason", [
    (dict(norm_type="ada_norm", num_embeds_ada_norm=10), "norm_type='ada_norm'"),
    (dict(positional_embeddings="sinusoidal", num_positional_embeddings=64), "positional embeddings"),
    (dict(attention_type="gated"), "gated"),
])
def test_unsupported_blocks_are_refused(bad_block, reason):
    model = nn.Sequential(make_block(), make_block(**bad_block))
    with pytest.raises(ValueError, match=rf"model\.1 .*{reason}"):
        tome_patch.diffusion(model)
    assert type(model[0]) is BasicTransformerBlock and not tome_patch.is_patched(model)


def test_refused_models():
    with pytest.raises(TypeError, match="model"):
        tome_patch.diffusion(object())
    with pytest.raises(ValueError, match="no diffusers transformer block"):
        tome_patch.diffusion(nn.Linear(4, 4))
    outer = nn.Sequential(make_block())
    tome_patch.diffusion(outer[0])
    with pytest.raises(ValueError, match="already patched through another module"):
        tome_patch.diffusion(outer)
    unet = make_unet()
    unet.enable_gradient_checkpointing()
    for random_dst in (True, False):  # the recomputation runs outside the pass either way
        with pytest.raises(ValueError, match="gradient checkpointing"):
            tome_patch.diffusion(unet, random_dst=random_dst)
    unet.disable_gradient_checkpointing()
    assert tome_patch.is_patched(tome_patch.diffusion(unet, random_dst=False))
