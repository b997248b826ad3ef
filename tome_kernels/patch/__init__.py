"""Patch models to run with ToMe through tome_kernels.

    import tome_kernels.patch
    tome_kernels.patch.timm(model, r=16)        # a timm ViT / DeiT
    tome_kernels.patch.bert(encoder, r=4)       # a Hugging Face BertModel (encoder)
    tome_kernels.patch.mean_pool(encoder, out.last_hidden_state)  # size-weighted, no padding
    tome_kernels.patch.diffusion(unet, ratio=0.5)   # diffusers BasicTransformerBlocks (tomesd); or a pipeline
    tome_kernels.patch.transformers(clip, r=8)  # transformers ViT / DeiT / CLIP / SigLIP / DINOv2 vision models
    tome_kernels.patch.llava(llava, r=8)        # a LLaVA's vision tower; then shorten the prompt's image tokens:
    inputs.update(tome_kernels.patch.fit_image_tokens(llava, inputs["input_ids"], inputs["attention_mask"]))
    state = tome_kernels.patch.get_state(model) # sizes, source map after a forward pass
    tome_kernels.patch.remove(model)            # back to the original model
"""

from typing import Union

from torch import nn

from .bert import mean_pool, sentence_transformer_bert
from .bert import patch_bert as bert
from .diffusion import DiffusionState, NoMergeWarning, is_pipeline, pipeline_denoiser
from .diffusion import patch_diffusion as diffusion
from .hf_vision import patch_transformers as transformers
from .hf_vision import vision_model_of
from .schedule import r_per_block
from .state import ToMeState
from .timm_vit import patch_timm as timm
from .vlm import fit_image_tokens, image_token_count, llava_vision_tower
from .vlm import patch_llava as llava


def _patched_module(model: nn.Module) -> nn.Module:
    """The module that holds the patch: a SentenceTransformer's is its BertModel; a
    transformers vision wrapper's (CLIPModel, ViTForImageClassification, ...) its vision model;
    a LLaVA's its vision tower; a diffusers pipeline's its unet or transformer."""
    # A pipeline with no denoiser holds no patch (patching one is refused).
    inner = pipeline_denoiser(model, required=False)
    if inner is None:
        inner = sentence_transformer_bert(model)
    if inner is None:
        inner = vision_model_of(model)
    if inner is None:
        inner = llava_vision_tower(model)
    return model if inner is None else inner


def _check_model_type(model) -> None:
    if not isinstance(model, nn.Module) and not is_pipeline(model):
        raise TypeError(f"model must be a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}")


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(_patched_module(model), "_tome_state", None), (ToMeState, DiffusionState))


def get_state(model: nn.Module) -> Union[ToMeState, DiffusionState]:
    """The state of a patched model (a SentenceTransformer's: its BertModel's; a transformers
    wrapper's such as CLIPModel: its vision model's). ToMe (timm, bert, transformers): r per
    block, and after a forward pass the sizes and (with trace_source) the token map of the
    last batch. Diffusion: the settings, and in ``last_pass`` the latent size and
    each block call's merge of the last forward pass. What a pass leaves is kept per thread:
    the last pass is the one the calling thread ran.

    Raises:
        TypeError: ``model`` is neither a torch.nn.Module nor a diffusers pipeline.
        ValueError: ``model`` is not patched.
    """
    _check_model_type(model)
    if not is_patched(model):
        raise ValueError(f"model ({type(model).__name__}) is not patched by tome_kernels.patch")
    return _patched_module(model)._tome_state


def remove(model: nn.Module) -> nn.Module:
    """Undo a patch in place and return the model; a module that is not patched is returned
    unchanged.

    Raises:
        TypeError: ``model`` is neither a torch.nn.Module nor a diffusers pipeline.
    """
    _check_model_type(model)
    if is_patched(model):
        get_state(model).undo(_patched_module(model))
    return model


__all__ = ["timm", "bert", "transformers", "diffusion", "mean_pool", "get_state", "remove", "is_patched",
           "r_per_block", "ToMeState", "NoMergeWarning", "llava", "image_token_count", "fit_image_tokens"]
