"""Token merging for diffusion models (Bolya & Hoffman 2023, "tomesd") on diffusers'
``BasicTransformerBlock`` (diffusers 0.42.x): Stable Diffusion's UNet, DiT, PixArt.

Unlike ToMe in a ViT, the residual stream keeps its length: each patched block computes one
``grid_match`` plan on its input hidden states, merges the normalised tokens ("mean") before
the self-attention (and, if asked, the cross-attention and the feed-forward), and unmerges
each output before its residual add. The plan's 2-D partition needs the tokens' grid, which
comes from the latent's (H, W): recorded by a forward pre-hook on the patched model from its
first tensor input, or given as ``latent_size``.

Each block becomes a subclass of its own class (``tome_subclass``); no module or parameter
changes, so the state_dict keeps its names while patched and ``remove`` restores the model.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import checks
from ..backends import check_backend_name
from ..methods import grid_match
from ..plan import MergePlan
from .hooks import tome_subclass

# The norm types whose forward _merged_forward reproduces: Stable Diffusion 1.x / 2.x, DiT,
# PixArt. The others (ada_norm, ada_norm_continuous, layer_norm_i2vgen) are refused.
SUPPORTED_NORMS = ("layer_norm", "ada_norm_zero", "ada_norm_single")


def _first_tensor(args: tuple, kwargs: dict) -> Optional[Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


def downsample_level(latent_tokens: int, tokens: int) -> int:
    """ceil(sqrt(latent_tokens / tokens)) in integers: the smallest d with d * d * tokens
    >= latent_tokens (no float rounding at exact squares)."""
    ratio = -(-latent_tokens // tokens)
    return math.isqrt(ratio - 1) + 1


class DiffusionState:
    """The settings of a patched model, and what its blocks share during one forward pass:
    the latent size seen by the model and one seeded generator per device."""

    def __init__(self, ratio: float, *, sx: int, sy: int, max_downsample: int, random_dst: bool, seed: int,
                 merge_attn: bool, merge_crossattn: bool, merge_mlp: bool,
                 latent_size: Optional[Tuple[int, int]], backend: str):
        self.ratio = ratio
        self.stride = (sy, sx)
        self.max_downsample = max_downsample
        self.random_dst = random_dst
        self.seed = seed
        self.merge_attn = merge_attn
        self.merge_crossattn = merge_crossattn
        self.merge_mlp = merge_mlp
        self.latent_size = latent_size
        self.backend = backend
        # Set by the patch function: the pre-hook's handle, and how to restore the model.
        self.hook = None
        self.undo = None
        self.begin(None)

    def begin(self, recorded_size: Optional[Tuple[int, int]]) -> None:
        """Start a forward pass of the patched model: every pass draws the same random
        destinations for a given seed."""
        self.recorded_size = recorded_size
        self._generators: Dict[torch.device, torch.Generator] = {}

    def start_pass(self, _model: nn.Module, args: tuple, kwargs: dict) -> None:
        """The patched model's forward pre-hook: a 4-D first input is the latent (B, C, H, W)."""
        first = _first_tensor(args, kwargs)
        self.begin(tuple(first.shape[-2:]) if first is not None and first.dim() == 4 else None)

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def grid(self, tokens: int) -> Optional[Tuple[int, int]]:
        """The (h, w) grid of a block's ``tokens`` hidden states, or None when the block is
        deeper than ``max_downsample`` and is not merged."""
        size = self.latent_size or self.recorded_size
        if size is None:
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise ValueError(f"a block has N={tokens} hidden states, not a square grid, and the model's first "
                                 "input was not a 4-D latent (B, C, H, W): patch it with latent_size=(H, W)")
            return side, side
        height, width = size
        level = downsample_level(height * width, tokens)
        if level > self.max_downsample:
            return None
        grid = (-(-height // level), -(-width // level))
        if grid[0] * grid[1] != tokens:
            raise ValueError(f"a block has N={tokens} hidden states, but the latent {height}x{width} downsampled by "
                             f"{level} is a {grid[0]}x{grid[1]} grid of {grid[0] * grid[1]} tokens: give the size of "
                             "the latent these tokens come from as latent_size=(H, W)")
        return grid

    def plan(self, hidden_states: Tensor) -> Optional[MergePlan]:
        """This block call's merge plan, or None when nothing merges (the block then runs
        diffusers' own forward, so its output is bit-identical to the unpatched block)."""
        if self.ratio == 0 or not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            return None
        checks.check_tensor("hidden_states", hidden_states, (3,), "(B, N, C)")
        tokens = hidden_states.shape[1]
        r = int(tokens * self.ratio)
        grid = self.grid(tokens) if r > 0 else None
        if grid is None:
            return None
        generator = self.generator(hidden_states.device) if self.random_dst else None
        plan = grid_match(hidden_states, r, grid, stride=self.stride, random_dst=self.random_dst,
                          generator=generator, backend=self.backend)
        return plan if plan.r > 0 else None


class _ToMeBasicTransformerBlock:
    """BasicTransformerBlock.forward, with merging wherever a plan is made."""

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                timestep: Optional[Tensor] = None, cross_attention_kwargs: Optional[dict] = None,
                class_labels: Optional[Tensor] = None, added_cond_kwargs: Optional[dict] = None) -> Tensor:
        plan = self._tome_diffusion.plan(hidden_states)
        if plan is None:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        state = self._tome_diffusion
        return _merged_forward(self, plan, hidden_states, attention_mask, encoder_hidden_states,
                               encoder_attention_mask, timestep, cross_attention_kwargs, class_labels,
                               merge_attn=state.merge_attn, merge_crossattn=state.merge_crossattn,
                               merge_mlp=state.merge_mlp)


def _merged_forward(block: nn.Module, plan: MergePlan, hidden_states: Tensor, attention_mask, encoder_hidden_states,
                    encoder_attention_mask, timestep, cross_attention_kwargs, class_labels, *,
                    merge_attn: bool, merge_crossattn: bool, merge_mlp: bool) -> Tensor:
    """diffusers 0.42's BasicTransformerBlock.forward for the norm types in SUPPORTED_NORMS,
    each of attention / cross-attention / feed-forward on the merged tokens where asked."""
    from diffusers.models.attention import _chunked_feed_forward

    def merged(x: Tensor, on: bool) -> Tensor:
        return plan.merge(x, "mean") if on else x

    def unmerged(y: Tensor, on: bool) -> Tensor:
        return plan.unmerge(y) if on else y

    kwargs = dict(cross_attention_kwargs or {})
    if kwargs.pop("gligen", None) is not None:
        raise ValueError("cross_attention_kwargs['gligen'] needs a gated block, which tome_kernels.patch.diffusion "
                         "refuses")
    if attention_mask is not None and merge_attn and not block.only_cross_attention:
        raise ValueError("attention_mask must be None when the self-attention merges tokens (merge_attn=True): "
                         "the mask is over the N unmerged tokens")
    norm_type = block.norm_type

    if norm_type == "ada_norm_zero":
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(
            hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
    elif norm_type == "ada_norm_single":
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)).chunk(6, dim=1)
        norm_hidden_states = block.norm1(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_msa) + shift_msa
    else:
        norm_hidden_states = block.norm1(hidden_states)
    attn_output = block.attn1(
        merged(norm_hidden_states, merge_attn),
        encoder_hidden_states=encoder_hidden_states if block.only_cross_attention else None,
        attention_mask=attention_mask,
        **kwargs,
    )
    attn_output = unmerged(attn_output, merge_attn)
    # The gates are per (batch, channel), so gating after the unmerge is the same product.
    if norm_type == "ada_norm_zero":
        attn_output = gate_msa.unsqueeze(1) * attn_output
    elif norm_type == "ada_norm_single":
        attn_output = gate_msa * attn_output
    hidden_states = attn_output + hidden_states

    if block.attn2 is not None:
        # PixArt (ada_norm_single) feeds the cross-attention without a norm.
        norm_hidden_states = hidden_states if norm_type == "ada_norm_single" else block.norm2(hidden_states)
        attn_output = block.attn2(
            merged(norm_hidden_states, merge_crossattn),
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **kwargs,
        )
        hidden_states = unmerged(attn_output, merge_crossattn) + hidden_states

    if norm_type == "ada_norm_single":
        norm_hidden_states = block.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp) + shift_mlp
    else:
        norm_hidden_states = block.norm3(hidden_states)
        if norm_type == "ada_norm_zero":
            norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    norm_hidden_states = merged(norm_hidden_states, merge_mlp)
    if block._chunk_size is not None:
        ff_output = _chunked_feed_forward(block.ff, norm_hidden_states, block._chunk_dim, block._chunk_size)
    else:
        ff_output = block.ff(norm_hidden_states)
    ff_output = unmerged(ff_output, merge_mlp)
    if norm_type == "ada_norm_zero":
        ff_output = gate_mlp.unsqueeze(1) * ff_output
    elif norm_type == "ada_norm_single":
        ff_output = gate_mlp * ff_output
    return ff_output + hidden_states


def _check_ratio(ratio) -> float:
    if not checks.is_real(ratio):
        raise TypeError(f"ratio must be a real number (the fraction of tokens to merge), got "
                        f"{type(ratio).__name__}: {ratio!r}")
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1] (the fraction of tokens to merge), got {ratio!r}")
    return float(ratio)


def _check_seed(seed) -> int:
    if not checks.is_int(seed):
        raise TypeError(f"seed must be a Python int, got {type(seed).__name__}: {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


def _block_problem(block: nn.Module) -> Optional[str]:
    """Why ``block`` cannot be patched, or None."""
    from diffusers.models.attention import BasicTransformerBlock

    original = getattr(type(block), "_tome_original_class", type(block))
    if original.forward is not BasicTransformerBlock.forward:
        return f"is a {original.__name__}, a subclass with its own forward"
    if block.norm_type not in SUPPORTED_NORMS:
        return f"has norm_type={block.norm_type!r}; supported are {', '.join(SUPPORTED_NORMS)}"
    if block.pos_embed is not None:
        return "adds positional embeddings to the normalised tokens, which the merged forward does not"
    if hasattr(block, "fuser"):
        return "is a gated (GLIGEN) block, whose fuser the merged forward does not run"
    return None


def _check_model(model: nn.Module, random_dst: bool) -> List[nn.Module]:
    """The model's BasicTransformerBlocks, all patchable, or the reason why not."""
    from diffusers.models.attention import BasicTransformerBlock

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    own_state = getattr(model, "_tome_state", None)
    blocks = []
    for name, module in model.named_modules():
        if not isinstance(module, BasicTransformerBlock):
            continue
        where = f"model.{name}" if name else "model"
        problem = _block_problem(module)
        if problem is not None:
            raise ValueError(f"{where} {problem}: tome_kernels.patch.diffusion cannot patch it")
        if getattr(module, "_tome_diffusion", own_state) is not own_state:
            raise ValueError(f"{where} is already patched through another module; remove that patch first")
        blocks.append(module)
    if not blocks:
        raise ValueError(f"model ({type(model).__name__}) contains no diffusers BasicTransformerBlock to patch")
    if random_dst and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError("model has gradient checkpointing on: recomputing a block would draw other random "
                         "destinations; turn it off or patch with random_dst=False")
    return blocks


def patch_diffusion(model: nn.Module, ratio: float = 0.5, *, sx: int = 2, sy: int = 2, max_downsample: int = 1,
                    random_dst: bool = True, seed: int = 0, merge_attn: bool = True, merge_crossattn: bool = False,
                    merge_mlp: bool = False, latent_size=None, backend: str = "auto") -> nn.Module:
    """Patch every diffusers ``BasicTransformerBlock`` of ``model`` in place to merge tokens
    as tomesd does; returns the model.

    Args:
        model: any module holding BasicTransformerBlocks: a UNet2DConditionModel, a
            Transformer2DModel, a bare block.
        ratio: the fraction of a block's N tokens to merge, r = int(N * ratio) (clamped to the
            tokens that are not destinations).
        sx, sy: the stride of the partition: one destination per sy x sx window.
        max_downsample: merge only in blocks whose tokens are the latent downsampled at most
            this much (1: only the highest resolution).
        random_dst: each window's destination at a random offset (else its top-left token).
        seed: seeds the random destinations at the start of every forward of ``model``.
        merge_attn, merge_crossattn, merge_mlp: which parts run on the merged tokens.
        latent_size: the latent's (H, W), when the model's first input is not the 4-D
            latent (a bare block, a transformer fed tokens, a patch embedding).
        backend: the merge backend, as in ``grid_match``.

    A patched model patched again is first restored, so the new settings replace the old.
    ``tome_kernels.patch.remove(model)`` undoes the patch.
    """
    from . import remove

    # Everything is checked before anything changes, so a bad argument leaves the model as it was.
    settings = dict(
        sx=checks.check_int("sx", sx, 1), sy=checks.check_int("sy", sy, 1),
        max_downsample=checks.check_int("max_downsample", max_downsample, 1),
        random_dst=checks.check_flag("random_dst", random_dst), seed=_check_seed(seed),
        merge_attn=checks.check_flag("merge_attn", merge_attn),
        merge_crossattn=checks.check_flag("merge_crossattn", merge_crossattn),
        merge_mlp=checks.check_flag("merge_mlp", merge_mlp),
        latent_size=None if latent_size is None else checks.check_int_pair("latent_size", latent_size),
        backend=check_backend_name(backend),
    )
    ratio = _check_ratio(ratio)
    blocks = _check_model(model, random_dst)
    remove(model)
    state = DiffusionState(ratio, **settings)
    state.undo = remove_diffusion
    state.hook = model.register_forward_pre_hook(state.start_pass, with_kwargs=True)
    for block in blocks:
        block._tome_diffusion = state
        block.__class__ = tome_subclass(type(block), _ToMeBasicTransformerBlock)
    model._tome_state = state
    return model


def remove_diffusion(model: nn.Module) -> None:
    """Undo ``patch_diffusion`` on ``model``."""
    state = model._tome_state
    state.hook.remove()
    for module in model.modules():
        if getattr(module, "_tome_diffusion", None) is state:
            module.__class__ = type(module)._tome_original_class
            del module._tome_diffusion
    del model._tome_state
