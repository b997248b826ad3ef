"""tome_kernels.patch.diffusion: which grid and level a block's tokens are, on latents of
every shape, and the warning when a pass merges nothing (tiny random diffusers models)."""

import re

import pytest
import torch
import torch.nn.functional as F

import tome_kernels.patch as tome_patch
from tests.patch.diffusers_models import (
    NO_UNEXPECTED_NO_OPS,
    NoMergeWarning,
    context,
    dit,
    dit_inputs,
    make_block,
    one_thread,  # noqa: F401 (a fixture, used by every test through the mark below)
    pixart,
    pixart_inputs,
    record_tokens,
    run,
    sd_inputs,
    sd_unet,
    sdxl_unet,
    tokens,
)
from tome_kernels.patch.diffusion import downsample_level, level_grid

pytestmark = [NO_UNEXPECTED_NO_OPS, pytest.mark.usefixtures("one_thread")]


def conv_grids(height, width, levels=5):
    """{d: (h, w)}: the latent's grid after log2(d) real stride-2, padding-1 3x3 convolutions,
    a UNet's downsamplers, for d = 1, 2, 4, ...: the truth downsample_level must find."""
    x, grids, weight = torch.zeros(1, 1, height, width), {}, torch.zeros(1, 1, 3, 3)
    for level in range(levels):
        grids[2**level] = tuple(x.shape[-2:])
        x = F.conv2d(x, weight, stride=2, padding=1)
    return grids


@pytest.mark.parametrize("height", [1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 64, 97])
def test_the_level_is_the_smallest_power_of_two_with_that_grid(height):
    for width in (1, 2, 7, 16, 17, 33, 40, 128):
        for d, (h, w) in conv_grids(height, width).items():
            level = downsample_level((height, width), h * w)
            assert level_grid((height, width), level) == (h, w), (height, width, d)
            # Only a one-token grid is reached at several levels; the smallest is taken.
            assert level == d or (h * w == 1 and level < d), (height, width, d, level)


def test_token_counts_of_no_level():
    assert downsample_level((12, 12), 16) is None  # a 3x3 patch grid: levels have 144, 36, 9, ...
    assert downsample_level((16, 16), 300) is None  # more tokens than the latent
    assert downsample_level((16, 16), 65) is None


def expected_merges(height, width, seen_full, ratio, stride):
    """Each block's token count after merging, by name, from the convolution grids: the
    block's level grid is the one with its N tokens, r = int(N * ratio) clamped to the
    sources (N minus one destination per whole sy x sx window)."""
    grids = conv_grids(height, width)
    out = {}
    for name, n in seen_full.items():
        h, w = next(grid for grid in grids.values() if grid[0] * grid[1] == n)
        sources = n - (h // stride[0]) * (w // stride[1])
        out[name] = n - min(int(n * ratio), sources)
    return out


def test_the_issue_example_merges_at_every_level():
    """An SD-like UNet, max_downsample=8, a 17x16 latent: once misread as level 7 and raised."""
    unet = sd_unet()
    seen = record_tokens(unet)
    tome_patch.diffusion(unet, 0.5, max_downsample=8)
    unet(torch.randn(1, 4, 17, 16), torch.tensor([5]), encoder_hidden_states=torch.randn(1, 3, 16))
    calls = tome_patch.get_state(unet).last_pass.blocks
    assert sorted({(c.level, c.grid) for c in calls}) == [(1, (17, 16)), (2, (9, 8)), (4, (5, 4)), (8, (3, 2))]
    assert all(c.r == c.tokens // 2 for c in calls)
    assert sorted(set(seen.values())) == [3, 10, 36, 136]


# Odd, tall, wide and one-row latents; each merges at every level 1, 2, 4, 8 of the UNet.
SHAPES = [((17, 16), (2, 2)), ((15, 33), (2, 2)), ((33, 9), (2, 2)), ((9, 40), (2, 2)), ((64, 24), (2, 2)),
          ((1, 37), (1, 2)), ((29, 1), (2, 1)), ((16, 16), (2, 2))]


@pytest.mark.parametrize("shape, stride", SHAPES)
@pytest.mark.parametrize("ratio", [0.3, 0.9])
def test_unet_merges_int_n_ratio_clamped_at_every_level(shape, stride, ratio):
    unet = sd_unet()
    inputs = sd_inputs(*shape)
    seen = record_tokens(unet)
    expected = run(unet, *inputs)
    seen_full = dict(seen)
    assert len(seen_full) == 10  # 3 down, 1 mid, 6 up blocks
    tome_patch.diffusion(unet, ratio, max_downsample=8, sy=stride[0], sx=stride[1])
    out = run(unet, *inputs)
    assert seen == expected_merges(*shape, seen_full, ratio, stride)
    calls = tome_patch.get_state(unet).last_pass.blocks
    assert {c.level for c in calls} == {1, 2, 4, 8} and all(c.r > 0 for c in calls)
    assert not torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("max_downsample", [1, 2, 4, 8])
def test_max_downsample_bounds_the_merging_levels(max_downsample):
    unet = sd_unet()
    tome_patch.diffusion(unet, 0.5, max_downsample=max_downsample)
    run(unet, *sd_inputs(15, 33))
    for call in tome_patch.get_state(unet).last_pass.blocks:
        assert (call.r > 0) == (call.level <= max_downsample), call


def patch_and_fix(kind):
    """A model, its inputs, the patch options that make a ratio-0.9 pass a silent no-op,
    what the warning must say, and the options the warning suggests."""
    if kind == "sdxl":  # no attention at the latent's resolution
        return (sdxl_unet(), sd_inputs(16, 16), {}, {}, r"downsampling 2 \(64 tokens.*max_downsample=2",
                {"max_downsample": 2})
    # latent_size in image pixels: the 16x16 latent's 256 tokens are "level 8" of 128x128.
    return (sd_unet(), sd_inputs(16, 16), {}, {"latent_size": (128, 128)},
            r"downsampling 8 .*latent_size=\(128, 128\) is not the model's input latent 16x16: is it in image pixels",
            {"latent_size": (16, 16)})


@pytest.mark.parametrize("kind", ["sdxl", "latent_size_in_pixels"])
def test_silent_no_ops_warn_once(kind):
    model, args, kwargs, options, message, fix = patch_and_fix(kind)
    if isinstance(args, tuple) and not kwargs:
        kwargs = {}
    expected = run(model, *args, **kwargs)
    tome_patch.diffusion(model, 0.9, **options)
    with pytest.warns(NoMergeWarning, match=message) as caught:
        for _ in range(3):
            assert torch.equal(run(model, *args, **kwargs), expected)
    assert len(caught) == 1
    # The suggested setting merges, and says nothing (an unexpected warning fails the test).
    tome_patch.diffusion(model, 0.9, **{**options, **fix})
    assert not torch.allclose(run(model, *args, **kwargs), expected, atol=1e-6)
    assert tome_patch.get_state(model).last_pass.merged


def test_each_reason_warns_once_per_patched_model():
    block, encoder = make_block(), context()
    row = tokens(48)
    tome_patch.diffusion(block, 0.5, latent_size=(1, 48))
    with pytest.warns(NoMergeWarning) as caught:
        for _ in range(2):
            run(block, row, encoder_hidden_states=encoder)  # one row: no whole 2x2 window
            run(block, tokens(1), encoder_hidden_states=encoder)  # int(1 * 0.5) = 0
    assert [str(w.message).split("merged no token: ")[1][:30] for w in caught] == [
        "the highest-resolution block's", "r = int(N * ratio) is 0 in eve"]
    assert "48 tokens are a 1x48 grid, which with sy=2, sx=2 has no token to merge" in str(caught[0].message)
    # Patched anew, the model warns anew; a stride that fits one row merges, silently.
    tome_patch.diffusion(block, 0.5, latent_size=(1, 48))
    with pytest.warns(NoMergeWarning, match="1x48 grid"):
        run(block, row, encoder_hidden_states=encoder)
    tome_patch.diffusion(block, 0.5, latent_size=(1, 48), sy=1)
    run(block, row, encoder_hidden_states=encoder)
    assert tome_patch.get_state(block).last_pass.blocks[0].r == 24


def test_no_merging_part_warns_and_ratio_0_does_not():
    block, x, encoder = make_block(), tokens(), context()
    tome_patch.diffusion(block, 0.5, merge_attn=False)
    with pytest.warns(NoMergeWarning, match="merge_attn, merge_crossattn and merge_mlp are all False"):
        run(block, x, encoder_hidden_states=encoder)
    tome_patch.diffusion(block, 0.0, max_downsample=1, latent_size=(128, 128))
    run(block, x, encoder_hidden_states=encoder)


def test_a_sub_module_called_alone_is_a_pass_of_its_own():
    """A patched block called directly, not through the patched UNet, has no recorded
    latent: a square N is merged as a square grid, and a no-op still warns."""
    unet = sd_unet()
    tome_patch.diffusion(unet, 0.5)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    with pytest.warns(UserWarning, match=r"ran outside the model's forward .*square grid is assumed"):
        run(block, torch.randn(1, 64, 8), encoder_hidden_states=torch.randn(1, 3, 16))
    assert tome_patch.get_state(unet).last_pass.blocks[0].grid == (8, 8)
    with pytest.warns(NoMergeWarning, match="r = int"):
        run(block, torch.randn(1, 1, 8), encoder_hidden_states=torch.randn(1, 3, 16))


@pytest.mark.parametrize("kind", ["dit", "dit_patch_3", "pixart"])
def test_patch_embedded_tokens_are_level_1(kind):
    """A DiT's or PixArt's tokens are its patch grid (here 4x4: 2x2 patches of an 8x8 latent,
    or 3x3 patches of 12x12, no power-of-two downsampling of it), level 1 in every block, so
    the default max_downsample merges there."""
    if kind == "pixart":
        model, (args, kwargs) = pixart(), pixart_inputs()
    else:
        model = dit() if kind == "dit" else dit(patch_size=3, sample_size=12)
        args, kwargs = dit_inputs() if kind == "dit" else dit_inputs(12, 12)
    tome_patch.diffusion(model, 0.5)
    run(model, *args, **kwargs)
    assert {call[1:4] for call in tome_patch.get_state(model).last_pass.blocks} == {(1, (4, 4), 8)}


def test_tokens_of_no_level_raise():
    # A latent_size the tokens do not come from is refused, not merged on a wrong grid: by the
    # block, when the input gives no grid to compare it with (a bare block)...
    unet = sd_unet()
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    tome_patch.diffusion(block, 0.5, latent_size=(10, 10))
    with pytest.raises(ValueError, match=r"N=64 .*latent_size 10x10"):
        run(block, torch.randn(1, 64, 8), encoder_hidden_states=torch.randn(1, 3, 16))


@pytest.mark.parametrize("latent_size", [(10, 10), (8, 32)])
def test_latent_size_that_does_not_fit_the_input_raises(latent_size):
    # ... and by the pass, before any block runs, when the input's grid is no power-of-two
    # downsampling of it: (8, 32) has the 16x16 latent's 256 tokens, in another shape.
    unet = tome_patch.diffusion(sd_unet(), 0.5, latent_size=latent_size)
    with pytest.raises(ValueError, match=rf"latent_size={re.escape(str(latent_size))} does not fit the model's "
                                         "input latent of this call, 16x16"):
        run(unet, *sd_inputs(16, 16))
    assert not tome_patch.get_state(unet)._open_passes()


def test_latent_size_the_input_is_a_downsampling_of_is_taken():
    # A patched sub-module given the whole latent: its input (8x8) is the 16x16 latent's level 2.
    unet = sd_unet()
    tome_patch.diffusion(unet.down_blocks[1], 0.5, latent_size=(16, 16), max_downsample=2)
    hidden = torch.randn(1, unet.down_blocks[1].resnets[0].conv1.in_channels, 8, 8)
    unet.down_blocks[1](hidden, temb=torch.randn(1, unet.time_embedding.linear_2.out_features),
                        encoder_hidden_states=torch.randn(1, 3, 16))
    calls = tome_patch.get_state(unet.down_blocks[1]).last_pass.blocks
    assert calls and all(call.level == 2 and call.grid == (8, 8) and call.r > 0 for call in calls)
