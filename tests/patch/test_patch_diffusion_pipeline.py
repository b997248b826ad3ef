"""tome_kernels.patch.diffusion on a diffusers pipeline, as tomesd's ``apply_patch(pipe)``: tiny
random pipelines patched, run end to end, and restored, nothing downloaded. A class-conditional
DiT pipeline (no tokenizer), and text-to-image StableDiffusion3Pipeline, FluxPipeline and
PixArtAlphaPipeline with no text encoder or tokenizer at all: the prompt embeddings are passed
to the call directly."""

import contextlib

import pytest
import torch

import tome_kernels.patch as tome_patch
from tests.patch.diffusers_models import (
    NO_UNEXPECTED_NO_OPS,
    one_thread,  # noqa: F401 (a fixture, used by every test through the mark below)
    record_tokens,
)

diffusers = pytest.importorskip("diffusers")

# diffusers 0.42's DPMSolverMultistepScheduler (PixArt's) on numpy 2: not this project's warning.
NUMPY_COPY = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
pytestmark = [NO_UNEXPECTED_NO_OPS, pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings(NUMPY_COPY)]
SAMPLE = 16  # latent 16 x 16, patch 2: 64 image tokens per block


def tiny_pipeline():
    torch.manual_seed(0)
    # 1000 classes: the pipeline's classifier-free guidance uses class 1000 as the null label.
    transformer = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                  out_channels=8, num_layers=2, sample_size=SAMPLE, patch_size=2,
                                                  num_embeds_ada_norm=1000).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8],
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4).eval()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler(),
                                 id2label={0: "cat"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe):
    with torch.no_grad():
        return pipe(class_labels=[0, 0], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images


def test_a_patched_pipeline_merges_in_its_transformer_end_to_end():
    pipe = tiny_pipeline()
    expected = generate(pipe)
    # A patch-embedded transformer's tokens are its patch grid, level 1: the default
    # max_downsample=1 merges in every block.
    assert tome_patch.diffusion(pipe, 0.5, seed=3) is pipe
    assert tome_patch.is_patched(pipe) and tome_patch.is_patched(pipe.transformer)
    assert tome_patch.get_state(pipe) is tome_patch.get_state(pipe.transformer)
    seen = record_tokens(pipe.transformer)
    image = generate(pipe)
    # 64 image tokens per block; ratio 0.5 with 2 x 2 windows merges 32 of them before attention.
    assert set(seen.values()) == {(SAMPLE // 2) ** 2 // 2}, seen
    assert {(call.tokens, call.level, call.r) for call in tome_patch.get_state(pipe).last_pass.blocks} == {(64, 1, 32)}
    assert image.shape == expected.shape == (2, 3, 2 * SAMPLE, 2 * SAMPLE)
    assert torch.isfinite(image).all() and not torch.equal(image, expected)
    assert torch.equal(generate(pipe), image), "a seeded patched pipeline repeats exactly"
    assert tome_patch.remove(pipe) is pipe
    assert not tome_patch.is_patched(pipe) and not tome_patch.is_patched(pipe.transformer)
    assert torch.equal(generate(pipe), expected)


def test_ratio_0_is_the_unpatched_pipeline():
    pipe = tiny_pipeline()
    expected = generate(pipe)
    tome_patch.diffusion(pipe, 0.0)
    assert torch.equal(generate(pipe), expected)


def test_bad_pipelines_and_arguments_are_refused_before_any_change():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="ratio"):
        tome_patch.diffusion(pipe, 1.5)
    assert not tome_patch.is_patched(pipe)
    no_denoiser = diffusers.DiTPipeline(transformer=None, vae=pipe.vae, scheduler=pipe.scheduler)
    with pytest.raises(TypeError, match="neither a unet nor a transformer"):
        tome_patch.diffusion(no_denoiser, 0.5)
    # It holds no patch: not patched, and remove gives it back unchanged.
    assert not tome_patch.is_patched(no_denoiser) and tome_patch.remove(no_denoiser) is no_denoiser
    with pytest.raises(TypeError, match="diffusers pipeline"):
        tome_patch.get_state(object())
    with pytest.raises(ValueError, match="not patched"):
        tome_patch.get_state(pipe)


# Text-to-image pipelines. A 32 x 32 image; a 2-block VAE downsamples by 2, so the latent is
# 16 x 16 and every transformer block sees 64 image tokens (SD3 and PixArt: 2 x 2 patches;
# Flux: the 2 x 2 packing of its latent). TEXT text tokens; batch 2.
IMAGE, IMAGE_TOKENS, TEXT, BATCH = 32, 64, 5, 2
MERGED = IMAGE_TOKENS // 2  # ratio 0.5 with 2 x 2 windows: 32 of the 64 merged away


def tiny_vae(latent_channels, shift_factor=None):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                                   up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8],
                                   layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                                   scaling_factor=1.5, shift_factor=shift_factor).eval()


def sd3_pipeline():
    torch.manual_seed(0)
    # dual_attention_layers=(0,): the first block also has SD3.5's image-only second attention.
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=IMAGE // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=IMAGE // 2, dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(16, 0.1),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)


def flux_pipeline():
    torch.manual_seed(0)
    # in_channels 64: the 16 latent channels of each 2 x 2 packed patch.
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6)).eval()
    return diffusers.FluxPipeline(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                  vae=tiny_vae(16, 0.1), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None)


def pixart_pipeline():
    torch.manual_seed(0)
    # out_channels 8: PixArt's learned variance, which the pipeline drops.
    transformer = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, norm_num_groups=8,
        cross_attention_dim=16, sample_size=IMAGE // 2, patch_size=2, caption_channels=12).eval()
    return diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(4), transformer=transformer,
                                         scheduler=diffusers.DPMSolverMultistepScheduler())


def embeddings(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sd3_call():
    # guidance_scale 2: classifier-free guidance on, the transformer runs on batch 2 x 2.
    return dict(prompt_embeds=embeddings(BATCH, TEXT, 16, seed=1), pooled_prompt_embeds=embeddings(BATCH, 8, seed=2),
                negative_prompt_embeds=embeddings(BATCH, TEXT, 16, seed=3),
                negative_pooled_prompt_embeds=embeddings(BATCH, 8, seed=4), guidance_scale=2.0)


def flux_call():
    # No guidance embedding, true_cfg_scale 1: no classifier-free guidance, no negative prompt.
    return dict(prompt_embeds=embeddings(BATCH, TEXT, 16, seed=1), pooled_prompt_embeds=embeddings(BATCH, 8, seed=2))


def pixart_call():
    # The second prompt is 3 tokens long, padded to TEXT: its cross-attention is masked.
    mask = torch.ones(BATCH, TEXT, dtype=torch.long)
    mask[1, 3:] = 0
    return dict(prompt_embeds=embeddings(BATCH, TEXT, 12, seed=1), prompt_attention_mask=mask,
                negative_prompt=None, negative_prompt_embeds=embeddings(BATCH, TEXT, 12, seed=3),
                negative_prompt_attention_mask=torch.ones(BATCH, TEXT, dtype=torch.long),
                use_resolution_binning=False, guidance_scale=2.0)


# Per pipeline: the (query, key) lengths of the attentions in its transformer, unpatched and
# with each scheme. A joint attention runs on the image and text tokens together (N + TEXT);
# SD3.5's second attention and PixArt's self-attention on the N image tokens; PixArt's
# cross-attention has the image queries and the text keys, and is never merged (merge_crossattn
# is off). "merge" shortens the image queries and keys; "kv" only the image keys.
JOINT, IMAGE_ONLY = IMAGE_TOKENS + TEXT, IMAGE_TOKENS
PIPELINES = {
    "sd3": (sd3_pipeline, sd3_call, {
        None: {(JOINT, JOINT), (IMAGE_ONLY, IMAGE_ONLY)},
        "merge": {(JOINT - MERGED, JOINT - MERGED), (IMAGE_ONLY - MERGED, IMAGE_ONLY - MERGED)},
        "kv": {(JOINT, JOINT - MERGED), (IMAGE_ONLY, IMAGE_ONLY - MERGED)}}),
    "flux": (flux_pipeline, flux_call, {
        None: {(JOINT, JOINT)},
        "merge": {(JOINT - MERGED, JOINT - MERGED)},
        "kv": {(JOINT, JOINT - MERGED)}}),
    "pixart": (pixart_pipeline, pixart_call, {
        None: {(IMAGE_ONLY, IMAGE_ONLY), (IMAGE_ONLY, TEXT)},
        "merge": {(IMAGE_ONLY - MERGED, IMAGE_ONLY - MERGED), (IMAGE_ONLY, TEXT)},
        "kv": {(IMAGE_ONLY, IMAGE_ONLY - MERGED), (IMAGE_ONLY, TEXT)}}),
}
# Blocks called per transformer pass: SD3 2 joint; Flux 1 double- and 1 single-stream; PixArt 2.
BLOCKS = 2
STEPS = 2


def text_pipeline(name):
    pipe = PIPELINES[name][0]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_generate(name, pipe):
    with torch.no_grad():
        return pipe(**PIPELINES[name][1](), height=IMAGE, width=IMAGE, num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images


@contextlib.contextmanager
def attention_lengths(denoiser):
    """Yields a set filled, as ``denoiser`` runs, with the (query, key) sequence lengths of
    every ``torch.nn.functional.scaled_dot_product_attention`` called inside its forward
    passes (diffusers' attentions and the patch's merged ones; not the VAE's)."""
    seen, depth = set(), []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        if depth:
            seen.add((query.shape[-2], key.shape[-2]))
        return sdpa(query, key, value, *args, **kwargs)

    def enter(_module, _args):
        depth.append(None)

    def leave(_module, _args, _output):
        depth.pop()

    handles = [denoiser.register_forward_pre_hook(enter), denoiser.register_forward_hook(leave, always_call=True)]
    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        yield seen
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def recorded_passes(pipe):
    """Yields a list filled with the block calls (``BlockCall``: tokens, level, grid, r) of
    every pass of the pipeline's patched denoiser, read from its state as each pass ends."""
    passes = []
    state = tome_patch.get_state(pipe)

    def record(_module, _args, _output):
        passes.append(list(state.last_pass.blocks))

    # Registered after the patch's own forward hook, so it runs once the pass is closed.
    handle = pipe.transformer.register_forward_hook(record)
    try:
        yield passes
    finally:
        handle.remove()


OPTIONS = [dict(scheme="merge"), dict(scheme="kv"), dict(scheme="merge", merge_mlp=True)]


@pytest.mark.parametrize("options", OPTIONS, ids=["merge", "kv", "merge-mlp"])
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_a_patched_text_to_image_pipeline_merges_end_to_end(name, options):
    pipe = text_pipeline(name)
    lengths = PIPELINES[name][2]
    with attention_lengths(pipe.transformer) as unpatched:
        expected = text_generate(name, pipe)
    assert unpatched == lengths[None]
    assert tome_patch.diffusion(pipe, 0.5, seed=3, **options) is pipe
    assert tome_patch.is_patched(pipe) and tome_patch.is_patched(pipe.transformer)
    assert tome_patch.get_state(pipe) is tome_patch.get_state(pipe.transformer)
    with recorded_passes(pipe) as passes, attention_lengths(pipe.transformer) as seen:
        image = text_generate(name, pipe)
    # Every block of every pass merged half its 64 image tokens, on the patch grid (level 1).
    calls = [[(call.tokens, call.level, call.grid, call.r) for call in calls] for calls in passes]
    assert calls == [[(IMAGE_TOKENS, 1, (8, 8), MERGED)] * BLOCKS] * STEPS
    assert seen == lengths[options["scheme"]]
    assert image.shape == expected.shape == (BATCH, 3, IMAGE, IMAGE)
    assert torch.isfinite(image).all() and not torch.equal(image, expected)
    assert torch.equal(text_generate(name, pipe), image), "a seeded patched pipeline repeats exactly"
    assert tome_patch.remove(pipe) is pipe
    assert not tome_patch.is_patched(pipe) and not tome_patch.is_patched(pipe.transformer)
    with attention_lengths(pipe.transformer) as restored:
        assert torch.equal(text_generate(name, pipe), expected)
    assert restored == lengths[None]


@pytest.mark.parametrize("scheme", ["merge", "kv"])
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_ratio_0_is_the_unpatched_text_to_image_pipeline(name, scheme):
    pipe = text_pipeline(name)
    expected = text_generate(name, pipe)
    tome_patch.diffusion(pipe, 0.0, scheme=scheme)
    assert tome_patch.is_patched(pipe)
    assert torch.equal(text_generate(name, pipe), expected)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_kv_with_merge_mlp_is_refused_and_leaves_the_pipeline_unpatched(name):
    pipe = text_pipeline(name)
    processors = dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match="merge_mlp"):
        tome_patch.diffusion(pipe, 0.5, scheme="kv", merge_mlp=True)
    assert not tome_patch.is_patched(pipe) and not tome_patch.is_patched(pipe.transformer)
    assert pipe.transformer.attn_processors == processors
    assert not pipe.transformer._forward_hooks and not pipe.transformer._forward_pre_hooks


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_a_non_square_image_merges_on_its_row_major_token_grid(name):
    # 32 x 48 pixels: a 16 x 24 latent, 8 x 12 patches (Flux: packed 2 x 2 latent pixels).
    pipe = tome_patch.diffusion(text_pipeline(name), 0.5, seed=3)
    with recorded_passes(pipe) as passes, torch.no_grad():
        image = pipe(**PIPELINES[name][1](), height=32, width=48, num_inference_steps=STEPS,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
    calls = [[(call.tokens, call.level, call.grid, call.r) for call in calls] for calls in passes]
    assert calls == [[(96, 1, (8, 12), 48)] * BLOCKS] * STEPS
    assert image.shape == (BATCH, 3, 32, 48) and torch.isfinite(image).all()

