"""The FLOP counter: multiply-adds at the token counts each block really sees."""

import pytest
import torch
from torch import nn

import tome_kernels.patch as tome_patch
from tome_kernels.flops import count_gflops, flop_report

timm = pytest.importorskip("timm")

# FlopCounterMode counts DeiT-S at 9.198 GFLOP with unfused attention; the paper's
# 4.6 GFLOPs is half of that, one multiply-add per FLOP.
DEIT_S_GMACS = 4.598882304


def tiny_vit(**kwargs):
    """32x32 images of 8x8 patches: 16 patches + the class token, 2 heads of 16 dims."""
    config = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0,
                  num_classes=10)
    config.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**config)


def expected_gmacs(tokens, r, *, dim=32, heads=2, hidden=64, patches=16, patch=8, in_chans=3, classes=10):
    """Multiply-adds of ``tiny_vit`` worked out by hand: linear layers and attention at each
    block's token count, the matching's A-by-B similarity product in each merging block,
    then the MLP at the tokens left. Returns (total, [(n_in, n_out, block, merge)])."""
    total = patches * dim * in_chans * patch * patch + dim * classes
    blocks = []
    n = tokens
    for r_l in r:
        removed = max(0, min(r_l, (n - 1) // 2))
        n_out = n - removed
        attention = n * dim * 3 * dim + 2 * n * n * dim + n * dim * dim
        merge = ((n + 1) // 2) * (n // 2) * (dim // heads) if removed else 0
        mlp = 2 * n_out * dim * hidden
        blocks.append((n, n_out, (attention + merge + mlp) / 1e9, merge / 1e9))
        total += attention + merge + mlp
        n = n_out
    return total / 1e9, blocks


def hooks(model):
    """Every forward hook on the model (the patch may have its own)."""
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()}


def small_vit(depth=4):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth)


def test_deit_small_unpatched_matches_known_count():
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    assert count_gflops(model) == pytest.approx(DEIT_S_GMACS, abs=1e-6)


def test_fewer_flops_as_r_grows_and_r0_equals_unpatched():
    model = small_vit()
    unpatched = count_gflops(model)
    counts = []
    for r in (0, 4, 8, 16):
        tome_patch.timm(model, r)
        counts.append(count_gflops(model))
    assert counts[0] == unpatched
    assert all(a > b for a, b in zip(counts, counts[1:])), counts


@pytest.mark.parametrize("r", [0, 3, [5, 0, 2], 100])
def test_tiny_vit_matches_hand_count(r):
    model = tiny_vit()
    tome_patch.timm(model, r)
    schedule = tome_patch.get_state(model).r
    total, blocks = expected_gmacs(17, schedule)
    report = flop_report(model)
    assert report.img_size == (32, 32)
    assert report.gflops == pytest.approx(total, rel=1e-12)
    assert [(b.tokens_in, b.tokens_out) for b in report.blocks] == [(b[0], b[1]) for b in blocks]
    assert [b.gflops for b in report.blocks] == pytest.approx([b[2] for b in blocks], rel=1e-12)
    assert [b.merge_gflops for b in report.blocks] == pytest.approx([b[3] for b in blocks], rel=1e-12)
    assert report.other_gflops == pytest.approx((16 * 32 * 3 * 64 + 32 * 10) / 1e9, rel=1e-9)


def test_tiny_vit_unpatched_matches_hand_count():
    total, _ = expected_gmacs(17, [0, 0, 0])
    assert count_gflops(tiny_vit()) == pytest.approx(total, rel=1e-12)


def test_other_image_size_on_a_dynamic_model():
    model = tiny_vit(dynamic_img_size=True)
    tome_patch.timm(model, 2)
    # 48x32 pixels: 6x4 patches + the class token.
    total, _ = expected_gmacs(25, [2, 2, 2], patches=24)
    report = flop_report(model, (48, 32))
    assert report.img_size == (48, 32)
    assert report.tokens == (25, 23, 21)
    assert report.gflops == pytest.approx(total, rel=1e-12)


def test_merge_counted_alike_whatever_the_backend():
    model = small_vit(depth=2)
    tome_patch.timm(model, 8, trace_source=True, backend="reference")
    reference = flop_report(model)
    tome_patch.timm(model, 8, trace_source=True, backend="auto")
    assert flop_report(model) == reference
    # 197 then 189 tokens; ViT-Ti has heads of 64 dims.
    assert reference.merge_gflops == pytest.approx((99 * 98 + 95 * 94) * 64 / 1e9, rel=1e-12)


def test_model_settings_and_state_restored():
    model = small_vit(depth=2)
    tome_patch.timm(model, 4, trace_source=True, backend="auto")
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    state = tome_patch.get_state(model)
    token_map, size = state.token_map, state.size
    model.train()
    model.blocks[1].eval()
    model.blocks[0].attn.fused_attn = True
    model.blocks[1].attn.fused_attn = False
    modes = {name: m.training for name, m in model.named_modules()}
    before = hooks(model)

    count_gflops(model)

    assert {name: m.training for name, m in model.named_modules()} == modes
    assert (model.blocks[0].attn.fused_attn, model.blocks[1].attn.fused_attn) == (True, False)
    assert tome_patch.get_state(model) is state
    assert state.backend == "auto"
    assert state.token_map is token_map and state.size is size
    assert hooks(model) == before


def test_settings_restored_after_an_error():
    model = small_vit(depth=2)
    tome_patch.timm(model, 4, backend="auto")
    model.train()
    model.blocks[0].attn.fused_attn = True
    before = hooks(model)

    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = model.head.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        count_gflops(model)
    handle.remove()
    assert model.training and all(m.training for m in model.modules())
    assert model.blocks[0].attn.fused_attn is True
    assert tome_patch.get_state(model).backend == "auto"
    assert hooks(model) == before


def test_bad_arguments():
    model = tiny_vit()
    with pytest.raises(TypeError, match="VisionTransformer"):
        count_gflops(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="VisionTransformer"):
        count_gflops("vit")
    with pytest.raises(TypeError, match="img_size"):
        count_gflops(model, 32.0)
    with pytest.raises(TypeError, match="img_size"):
        count_gflops(model, (32, 32, 3))
    with pytest.raises(TypeError, match="img_size"):
        count_gflops(model, True)
    with pytest.raises(ValueError, match="img_size"):
        count_gflops(model, 0)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        count_gflops(model, 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        count_gflops(tiny_vit(dynamic_img_size=True), (36, 32))
