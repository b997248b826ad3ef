"""ToMe for timm's VisionTransformer family (ViT, DeiT, DeiT-distilled, with or without
LayerScale), as in timm 1.0.x; with PiToMe's or DSM's matching as options.

Each block becomes a subclass of its own class whose forward merges between the attention
and the MLP; a forward hook on the attention's key normalisation (an Identity unless qk_norm)
hands the keys to the merge. No module or parameter changes, so the state_dict keeps its
names while patched and ``remove`` restores the model exactly.

Only what this forward reproduces is patched: timm's ``Block`` with its standard
``Attention``, neither subclassed with a forward of its own (a replaced forward would be
silently lost). The model's forward paths either merge or, while any block merges, refuse
what merging breaks (an attention mask over the input tokens, intermediates as a patch grid).
"""

from typing import List, Optional, Tuple

from torch import Tensor, nn

from ..backends import check_backend_name
from ..checks import check_flag
from .hooks import KeyCapture, call_arguments, original_class, remove_hooks, tome_subclass
from .options import check_vision_method
from .schedule import RSchedule
from .state import ToMeState


class _ToMeBlock:
    """timm's Block.forward with the merge between attention and MLP."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        state: ToMeState = self._tome_state
        if attn_mask is not None or is_causal:
            if state.any_merging:
                raise ValueError(_NO_MASK)
            # Nothing merges: the block is timm's.
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self._tome_index == 0:
            state.begin(None, x.shape[1])
        state.block = self._tome_index
        bias = state.attention_bias(x.dtype)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=bias)))
        r = state.r[self._tome_index]
        if r > 0:
            x = state.merge(x, r)
        else:
            state.keys = None
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


_NO_CHECKPOINTING = ("gradient checkpointing recomputes blocks in the backward pass, which would replay "
                     "the merges on the wrong sizes; turn it off to use ToMe")
_NO_MASK = ("a ToMe-patched model that merges takes no attn_mask / is_causal: the mask is over the input "
            "tokens, and merging changes the token count")


class _ToMeVisionTransformer:
    """Average pooling weighted by size (a merged token stands for all its patches), and
    every forward path checked for what merging breaks before any block runs."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ValueError(_NO_CHECKPOINTING)
        super().set_grad_checkpointing(False)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        self._tome_check_mask(attn_mask, is_causal)
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        self._tome_check_mask(attn_mask, is_causal)
        return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        """timm's, with the intermediates as tokens (output_fmt="NLC"): after a merge they
        are no longer a patch grid, so "NCHW" is refused while any block merges."""
        from timm.models.vision_transformer import VisionTransformer

        bound = call_arguments(VisionTransformer.forward_intermediates, self, x, *args, **kwargs)
        self._tome_check_mask(bound.get("attn_mask"), bound.get("is_causal", False))
        if self._tome_state.any_merging and bound.get("output_fmt", "NCHW") == "NCHW":
            raise ValueError("a ToMe-patched model that merges has no patch grid after its first merge: ask for "
                             "intermediates as tokens (output_fmt='NLC', or reshape=False in "
                             "get_intermediate_layers), or patch with r=0")
        return super().forward_intermediates(x, *args, **kwargs)

    def _tome_check_mask(self, attn_mask: Optional[Tensor], is_causal: bool) -> None:
        if (attn_mask is not None or is_causal) and self._tome_state.any_merging:
            raise ValueError(_NO_MASK)

    def pool(self, x: Tensor, pool_type=None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        weights = self._tome_state.valid_weights()
        if pool_type != "avg" or weights is None:
            return super().pool(x, pool_type)
        if weights.shape[:2] != x.shape[:2]:
            raise ValueError(f"x has (B, N) = {tuple(x.shape[:2])}, but this thread's last forward pass of the "
                             f"patched model ended with {tuple(weights.shape[:2])} tokens: average pooling weights "
                             "each token by its size, so pool the features of that pass")
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        weights = weights[:, start:].to(x.dtype)
        return (x[:, start:] * weights).sum(dim=1) / weights.sum(dim=1)


def _check_model(model: nn.Module) -> List[nn.Module]:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (ViT, DeiT), got {type(model).__name__}")
    if getattr(model, "num_reg_tokens", 0):
        raise ValueError("model has register tokens, which the merge contract does not protect (only a class "
                         "and a distillation token)")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"model pools with attention (global_pool={model.global_pool!r}), which ToMe does not "
                         "weight by size")
    if model.global_pool not in ("token", "avg", "max", ""):
        raise ValueError(f"model.global_pool={model.global_pool!r}: supported are 'token', 'avg', 'max' and ''")
    if getattr(model, "grad_checkpointing", False):
        raise ValueError(f"model has gradient checkpointing on: {_NO_CHECKPOINTING}")
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        problem = _block_problem(block, Block, Attention)
        if problem is not None:
            raise ValueError(f"model.blocks[{i}] {problem}: ToMe patches timm's pre-norm Block with its standard "
                             "Attention, whose forward it reproduces")
    return blocks


def _block_problem(block: nn.Module, block_class: type, attention_class: type) -> Optional[str]:
    """Why ``block`` is not a Block this patch reproduces exactly, or None. A subclass with
    a forward of its own is refused: the patched forward would replace it without a word."""
    original = original_class(block)
    if not issubclass(original, block_class):
        return f"is a {original.__name__}, not a timm Block"
    if original.forward is not block_class.forward:
        return f"is a {original.__name__}, a Block subclass with its own forward"
    if "forward" in vars(block):
        return "has a forward of its own, set on the instance"
    attention = getattr(block, "attn", None)
    if not isinstance(attention, attention_class):
        return f"has attention {type(attention).__name__}, not timm's Attention"
    if type(attention).forward is not attention_class.forward:
        return f"has attention {type(attention).__name__}, an Attention subclass with its own forward"
    if "forward" in vars(attention) or "forward" in vars(attention.k_norm):
        return "has an attention (or its k_norm) with a forward of its own, set on the instance"
    return None


class _PatchGridRecorder:
    """Forward hook on the patch embedding: the (height, width) patch grid of this pass. A
    model built with dynamic_img_size gives it as the shape of its (B, H, W, C) output;
    otherwise the grid is the embedding's fixed one."""

    def __init__(self, state: ToMeState):
        self.state = state

    def __call__(self, module: nn.Module, _inputs, out: Tensor) -> None:
        grid = out.shape[1:3] if out.dim() == 4 else getattr(module, "grid_size", None)
        self.state.grid_size = None if grid is None else (int(grid[0]), int(grid[1]))


def patch_timm(model: nn.Module, r: RSchedule, *, method: str = "tome", preset: Optional[str] = None,
               margin=None, alpha: Optional[float] = None, energy_form: Optional[str] = None, split=None,
               delay: int = 0, window: Tuple[int, int] = (2, 2), trace_source: bool = False,
               prop_attn: Optional[bool] = None, backend: str = "auto") -> nn.Module:
    """Patch a timm VisionTransformer in place to merge tokens in every block; returns it.

    Args:
        model: a timm ``VisionTransformer`` (or ``VisionTransformerDistilled``).
        r: tokens removed per block: an int, a per-block list, or ``(r, inflection)``;
            with method="dsm", an int: the budget is r per block over all blocks.
        method: how each block matches:
            - "tome": ToMe's bipartite matching (Bolya et al., ICLR 2023);
            - "pitome": PiToMe (Tran et al., NeurIPS 2024; ``tome_kernels.pitome_match``),
              same r schedule, configured by ``preset`` and the options below;
            - "dsm": delayed spatial merging: blocks ``0 .. delay-1`` merge nothing, the
              budget ``r * L`` is spread over the others (``dsm_r_per_block``); block
              ``delay`` merges within ``window`` windows of the patch grid
              (``tome_kernels.window_match``), every later block with ToMe's matching.
        preset: PiToMe's configuration (method="pitome" only), ``patch.options.PRESETS``:
            "authors_vit" (the default: the authors' DeiT / ViT patch: margin
            0.75 (1 - l / L), ELU energy, their bipartite split in the first ceil(L / 2)
            blocks and the alternating one after, no proportional attention),
            "authors_mae" (the same with the two splits swapped, as their MAE patch), or
            "paper" (equation (4), margin 0.9 (1 - l / L), alternating split, proportional
            attention). docs/methods.md lists what differs from the authors' code.
        margin, alpha, energy_form, split: override the preset (method="pitome" only):
            margin a number (the first block's, the preset's schedule scaled to it) or one
            per block; split a name or one per block; alpha for the ELU forms only; as in
            ``pitome_match``.
        delay, window: DSM's delay and windows (method="dsm" only).
        trace_source: keep, per image, the final token of every input token
            (``get_state(model).token_map``, O(N) memory).
        prop_attn: proportional attention (log(size) added to the attention logits); None:
            on, except where a PiToMe preset says otherwise.
        backend: the merge backend, as in ``bipartite_merge``.

    A patched model patched again is first restored, so the new settings replace the old.
    ``remove(model)`` undoes the patch.

    Raises:
        TypeError / ValueError: for a model or an argument it cannot take, before any change.
    """
    from . import remove

    # Everything is checked before anything changes, so a bad argument leaves the model as it was.
    check_backend_name(backend)
    check_flag("trace_source", trace_source)
    blocks = _check_model(model)
    options, schedule = check_vision_method(r, len(blocks), prop_attn, method, preset=preset, margin=margin,
                                            alpha=alpha, energy_form=energy_form, split=split, delay=delay,
                                            window=window)
    remove(model)
    state = ToMeState(
        schedule,
        class_token=getattr(model, "cls_token", None) is not None,
        distill_token=getattr(model, "dist_token", None) is not None,
        prop_attn=options.prop_attn, trace_source=trace_source, backend=backend, options=options,
    )
    state.undo = remove_timm
    for index, block in enumerate(blocks):
        block._tome_state = state
        block._tome_index = index
        block.attn.k_norm.register_forward_hook(KeyCapture(state))
        block.__class__ = tome_subclass(type(block), _ToMeBlock)
    if options.method == "dsm":
        model.patch_embed.register_forward_hook(_PatchGridRecorder(state))
    model._tome_state = state
    model.__class__ = tome_subclass(type(model), _ToMeVisionTransformer)
    return model


def remove_timm(model: nn.Module) -> None:
    """Undo ``patch_timm`` on ``model``."""
    for block in model.blocks:
        if original_class(block) is not type(block):
            remove_hooks(block.attn.k_norm, KeyCapture)
            block.__class__ = original_class(block)
            del block._tome_state, block._tome_index
    remove_hooks(model.patch_embed, _PatchGridRecorder)
    model.__class__ = original_class(model)
    del model._tome_state
