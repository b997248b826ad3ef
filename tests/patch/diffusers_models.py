"""Tiny random-weight diffusers models, inputs and runners shared by the diffusion patch's
test modules (tests/patch/test_patch_diffusion*.py). Skips the importing module when
diffusers is not installed."""

import pytest
import torch

from tome_kernels.patch.diffusion import NoMergeWarning

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402, F401 (Transformer2DModel: for the test modules)
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402

DIM, CONTEXT_DIM = 32, 24

# Every test module of the diffusion patch fails on a NoMergeWarning it does not expect.
NO_UNEXPECTED_NO_OPS = pytest.mark.filterwarnings(f"error::{NoMergeWarning.__module__}.NoMergeWarning")


@pytest.fixture
def one_thread():
    """The models here are tiny: a second intra-op thread costs more than it saves, and on a
    busy machine many times more (measured: 35 s against 4 s for test_patch_diffusion.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_block(**kwargs):
    torch.manual_seed(0)
    return BasicTransformerBlock(DIM, 2, 16, cross_attention_dim=CONTEXT_DIM, **kwargs).eval()


def make_unet():
    # Transformer blocks at two resolutions: the latent's (ds = 1) and half of it (ds = 2).
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def sd_unet():
    """Stable Diffusion's layout, tiny: attention at downsampling 1, 2 and 4 on the way down
    and up, none at 8 but in the mid block (which runs at 8)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 8, 8, 8),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=8,
    ).eval()


def sdxl_unet():
    """SDXL's layout, tiny: no attention at the latent's resolution, attention at 2 and 4."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 8, 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=8,
    ).eval()


def sd_inputs(height, width, batch=1, seed=4):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, height, width, generator=generator), torch.tensor([5] * batch),
            torch.randn(batch, 3, 16, generator=generator))


def dit(patch_size=2, sample_size=8):
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=1,
                                 sample_size=sample_size, patch_size=patch_size, num_embeds_ada_norm=10).eval()


def dit_inputs(height=8, width=8):
    sample = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(5))
    return (sample,), dict(timestep=torch.tensor([1, 2]), class_labels=torch.tensor([0, 3]))


def pixart(sample_size=8):
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                    num_layers=1, norm_num_groups=8, cross_attention_dim=16, sample_size=sample_size,
                                    patch_size=2, caption_channels=12).eval()


def pixart_inputs(height=8, width=8):
    generator = torch.Generator().manual_seed(6)
    sample = torch.randn(2, 4, height, width, generator=generator)
    return (sample,), dict(encoder_hidden_states=torch.randn(2, 3, 12, generator=generator),
                           timestep=torch.tensor([1, 2]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def tokens(n=64, batch=2, seed=1):
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(seed))


def context(batch=2):
    return torch.randn(batch, 5, CONTEXT_DIM, generator=torch.Generator().manual_seed(2))


def run(model, *args, **kwargs):
    with torch.no_grad():
        out = model(*args, **kwargs)
    return getattr(out, "sample", out)


def unet_inputs(height=16, width=12):
    sample = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(4))
    return sample, torch.tensor([10, 500]), context()


def record_tokens(model, part="attn1"):
    """Token count each block's ``part`` receives, by block name, filled as the model runs."""
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, BasicTransformerBlock):
            getattr(module, part).register_forward_pre_hook(
                lambda _m, args, name=name: seen.__setitem__(name, args[0].shape[1]))
    return seen


# SD3 and Flux (joint text-image blocks), tiny. TEXT text tokens, JOINT_DIM their channels.
TEXT, JOINT_DIM = 5, 16


def sd3(dual_attention_layers=(), num_layers=2):
    """An SD3 transformer (SD3.5 with ``dual_attention_layers``), qk_norm="rms_norm": its
    16x16 latent is an 8x8 grid of 2x2 patches; the last block is context_pre_only."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=num_layers,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM,
                                 caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                 pos_embed_max_size=16, dual_attention_layers=tuple(dual_attention_layers),
                                 qk_norm="rms_norm").eval()


def sd3_inputs(height=16, width=16, batch=2, seed=7):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, height, width, generator=generator)
    return (sample,), dict(encoder_hidden_states=torch.randn(batch, TEXT, JOINT_DIM, generator=generator),
                           pooled_projections=torch.randn(batch, 8, generator=generator),
                           timestep=torch.arange(batch, dtype=torch.float32) * 250 + 3)


def flux(num_single_layers=1):
    """A Flux transformer: one double-stream block, ``num_single_layers`` single-stream ones,
    rotary embeddings over (0, row, col) ids."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=num_single_layers,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=JOINT_DIM,
                                  pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()


def flux_ids(height, width, first=0):
    """(height * width, 3) image ids (first, row, col), row-major, as Flux pipelines make them."""
    ids = torch.zeros(height, width, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None]
    return ids.reshape(-1, 3)


def flux_inputs(height=8, width=8, batch=2, seed=8):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, height * width, 16, generator=generator)
    return (latents,), dict(encoder_hidden_states=torch.randn(batch, TEXT, JOINT_DIM, generator=generator),
                            pooled_projections=torch.randn(batch, 8, generator=generator),
                            timestep=torch.arange(batch, dtype=torch.float32) * 0.25 + 0.1,
                            img_ids=flux_ids(height, width), txt_ids=torch.zeros(TEXT, 3))
