"""tome_kernels.patch.diffusion on a diffusers pipeline, as tomesd's ``apply_patch(pipe)``: a
tiny random DiT pipeline (class-conditional: no tokenizer, nothing downloaded) patched, run
end to end, and restored."""

import pytest
import torch

import tome_kernels.patch as tome_patch
from tests.patch.diffusers_models import NO_UNEXPECTED_NO_OPS, record_tokens

diffusers = pytest.importorskip("diffusers")

pytestmark = [NO_UNEXPECTED_NO_OPS]
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
    # DiT's patch embedding (patch 2) makes its tokens the latent downsampled by 2.
    assert tome_patch.diffusion(pipe, 0.5, seed=3, max_downsample=2) is pipe
    assert tome_patch.is_patched(pipe) and tome_patch.is_patched(pipe.transformer)
    assert tome_patch.get_state(pipe) is tome_patch.get_state(pipe.transformer)
    seen = record_tokens(pipe.transformer)
    image = generate(pipe)
    # 64 image tokens per block; ratio 0.5 with 2 x 2 windows merges 32 of them before attention.
    assert set(seen.values()) == {(SAMPLE // 2) ** 2 // 2}, seen
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
    with pytest.raises(TypeError, match="diffusers pipeline"):
        tome_patch.get_state(object())
    with pytest.raises(ValueError, match="not patched"):
        tome_patch.get_state(pipe)
