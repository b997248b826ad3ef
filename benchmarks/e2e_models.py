"""The models of the end-to-end benchmark (benchmarks/e2e_vit.py), timm's ViTs and transformers'
vision encoders: how each is built (random weights), patched and read, its r and batch sizes;
and how a row forces one proportional-attention implementation.

A ToMe row of these models runs proportional attention by one implementation of
``tome_kernels.patch.prop_attention``, forced for the row through its ``TOME_PROP_ATTENTION``
override (read at every attention call), so that a row's time is that implementation's
whatever ``choose`` would pick on the device:
    bias  SDPA with log(size) as a (B, 1, 1, N) float mask (the row's provider: ``tome_<backend>``)
    flex  compiled FlexAttention with a score_mod (``tome_<backend>_flex``)
"""

import contextlib
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

import torch

import tome_kernels.patch
from tome_kernels.patch import prop_attention

# The implementations a row can force, and the suffix each adds to the provider's name (the
# default path keeps the plain name, so a table reads "tome_cpu" and "tome_cpu_flex").
SUFFIX = {"bias": "", "flex": "_flex"}


@dataclass(frozen=True)
class HFModelSpec:
    """A transformers vision model with random weights: its class, the config arguments that
    make it, its input resolution, r and batch sizes (as timm's ``ModelSpec``)."""

    hf_class: str
    config: Dict
    img_size: int
    r: int
    gpu_batch: int
    cpu_batch: int
    sweep: Tuple[int, ...] = ()
    attentions: Tuple[str, ...] = field(default=tuple(SUFFIX))

    def describe(self) -> str:
        return f"transformers {self.hf_class} ({self.config})"

    def row_fields(self) -> Dict:
        return {"hf_class": self.hf_class, "config": dict(self.config)}

    def build(self, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
        import transformers  # here, not at the top: the timm rows and the other benchmarks run without it

        cls = getattr(transformers, self.hf_class)
        config = cls.config_class(**self.config, attn_implementation="sdpa")
        torch.manual_seed(seed)
        # Built on the device itself: initialising a ViT-B's weights on the host first takes seconds.
        with torch.device(device):
            model = cls(config)
        return model.eval().to(dtype=dtype)

    @staticmethod
    def patch(model: torch.nn.Module, r: int, backend: str) -> None:
        tome_kernels.patch.transformers(model, r, backend=backend, prop_attn=True)

    @staticmethod
    def output(output) -> torch.Tensor:
        """The tensor compared across providers: the pooled output ([CLS] after the last norm),
        which merging keeps in place."""
        return output.pooler_output


# CLIP ViT-B/16's vision tower (openai/clip-vit-base-patch16's config; CLIPVisionConfig's
# defaults are its hidden 768, MLP 3072, 12 layers, 12 heads, but patch 32): 197 tokens, r = 16
# as timm's ViT-B/16 (the last layer clamped to 10, 11 tokens left).
# DINOv2-S/14 with 4 registers at 224: 256 patches + [CLS] + 4 registers = 261 tokens, the
# registers set aside in every merge. r = 16, the same per-layer r as the two B/16 rows, so the
# three compare at equal merge work per layer: no layer clamps (the last matches 81 tokens,
# (81 - 1) // 2 = 40 >= 16) and 65 of the 257 matched tokens are left (+ 4 registers), a milder
# cut than B/16's 11 of 197, as DINOv2's patch features are the product. One r keeps the main
# job within its time on the 2-core CPU (each model's rows cost about as much as a sweep point).
HF_MODELS: Dict[str, HFModelSpec] = {
    "clip_b16_224": HFModelSpec("CLIPVisionModel", {"hidden_size": 768, "intermediate_size": 3072,
                                                    "num_hidden_layers": 12, "num_attention_heads": 12,
                                                    "patch_size": 16, "image_size": 224},
                                224, r=16, gpu_batch=256, cpu_batch=4),
    "dinov2_s14_reg_224": HFModelSpec("Dinov2WithRegistersModel", {"hidden_size": 384, "num_hidden_layers": 12,
                                                                   "num_attention_heads": 6, "patch_size": 14,
                                                                   "image_size": 224, "num_register_tokens": 4},
                                      224, r=16, gpu_batch=256, cpu_batch=4),
}


@dataclass(frozen=True)
class ModelSpec:
    """A timm model with random weights, its input resolution, r and batch sizes.

    ``r`` is the default per block; every block clamps it to what its token count allows.
    ``sweep``: the other r values timed, for the plot of throughput against r.
    """

    timm_name: str
    img_size: int
    r: int
    gpu_batch: int
    cpu_batch: int
    kwargs: Dict = field(default_factory=dict)
    sweep: Tuple[int, ...] = ()
    # timm's patch has one proportional attention (the bias path): no implementation to force.
    attentions = ()

    def describe(self) -> str:
        return f"{self.timm_name} (img_size {self.img_size})"

    def row_fields(self) -> Dict:
        return {"timm_name": self.timm_name}

    def build(self, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
        import timm  # here, not at the top: the other benchmarks run without timm
        torch.manual_seed(seed)
        model = timm.create_model(self.timm_name, pretrained=False, **self.kwargs)
        return model.eval().to(device=device, dtype=dtype)

    @staticmethod
    def patch(model: torch.nn.Module, r: int, backend: str) -> None:
        tome_kernels.patch.timm(model, r, backend=backend)

    @staticmethod
    def output(output: torch.Tensor) -> torch.Tensor:
        return output  # the logits


# ViT-B/16 at 224: 197 tokens, 12 blocks; r = 16 is ToMe's usual setting: the last block is
# clamped to (21 - 1) // 2 = 10 and 11 tokens remain. ViT-L/16 at 512 (timm's 384 model built
# at 512, 1025 tokens, 24 blocks): r = 40 merges 960 tokens without any clamp (the last block
# has 105 tokens, (105 - 1) // 2 = 52 >= 40) and 65 remain; it is also benchmarks.run's shape.
# ViT-B/16 is also timed at r = 4, 8 and 12 (197 tokens down to 149, 101, 53 after 12 blocks),
# each as long as a few seconds on a 2-core CPU at batch 4; ViT-L/16 only at its r, its
# forward pass being 5x as long.
MODELS: Dict[str, ModelSpec] = {
    "vit_b16_224": ModelSpec("vit_base_patch16_224", 224, r=16, gpu_batch=256, cpu_batch=4, sweep=(4, 8, 12)),
    "vit_l16_512": ModelSpec("vit_large_patch16_384", 512, r=40, gpu_batch=32, cpu_batch=1, kwargs={"img_size": 512}),
    **HF_MODELS,
}


@contextlib.contextmanager
def forced_prop_attention(implementation: Optional[str]) -> Iterator[None]:
    """Every proportional attention inside runs ``implementation`` (None: as ``choose`` picks)."""
    if implementation is None:
        yield
        return
    if implementation not in prop_attention.IMPLEMENTATIONS:
        raise ValueError(f"unknown proportional-attention implementation {implementation!r}")
    before = os.environ.get(prop_attention.ENV_VAR)
    os.environ[prop_attention.ENV_VAR] = implementation
    try:
        yield
    finally:
        if before is None:
            del os.environ[prop_attention.ENV_VAR]
        else:
            os.environ[prop_attention.ENV_VAR] = before
