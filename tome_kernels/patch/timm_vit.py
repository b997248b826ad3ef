"""ToMe for timm's VisionTransformer family (ViT, DeiT, DeiT-distilled, with or without
LayerScale), as in timm 1.0.x; with PiToMe's or DSM's matching as options.

Each block becomes a subclass of its own class whose forward merges between the attention
and the MLP; a forward hook on the attention's key normalisation (an Identity unless qk_norm)
hands the keys to the merge. No module or parameter changes, so the state_dict keeps its
names while patched and ``remove`` restores the model exactly.
"""

from typing import List, Tuple

from torch import Tensor, nn

from ..backends import check_backend_name
from ..checks import check_flag
from ..methods import PITOME_MARGIN
from .hooks import capture_keys, tome_subclass
from .options import check_method
from .schedule import RSchedule, dsm_r_per_block, r_per_block
from .state import ToMeState


class _ToMeBlock:
    """timm's Block.forward with the merge between attention and MLP."""

    def forward(self, x: Tensor, attn_mask=None, is_causal: bool = False) -> Tensor:
        state: ToMeState = self._tome_state
        if attn_mask is not None or is_causal:
            raise ValueError("a ToMe-patched model takes no attn_mask / is_causal: merging changes the token count")
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


class _ToMeVisionTransformer:
    """Average pooling weighted by size: a merged token stands for all its patches."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ValueError(_NO_CHECKPOINTING)
        super().set_grad_checkpointing(False)

    def pool(self, x: Tensor, pool_type=None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        weights = self._tome_state.valid_weights()
        if pool_type != "avg" or weights is None:
            return super().pool(x, pool_type)
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
        raise ValueError(f"model has {_NO_CHECKPOINTING}")
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        if not isinstance(block, Block) or not isinstance(block.attn, Attention):
            raise ValueError(f"model.blocks[{i}] is a {type(block).__name__} with {type(block.attn).__name__}: "
                             "ToMe patches timm's pre-norm Block with its standard Attention")
    return blocks


def _record_patch_grid(state: ToMeState):
    """Forward hook on the patch embedding: the (height, width) patch grid of this pass. A
    model built with dynamic_img_size gives it as the shape of its (B, H, W, C) output;
    otherwise the grid is the embedding's fixed one."""

    def record(module, _inputs, out):
        grid = out.shape[1:3] if out.dim() == 4 else getattr(module, "grid_size", None)
        state.grid_size = None if grid is None else (int(grid[0]), int(grid[1]))

    return record


def patch_timm(model: nn.Module, r: RSchedule, *, method: str = "tome", margin: float = PITOME_MARGIN,
               alpha: float = 1.0, shifted: bool = False, delay: int = 0, window: Tuple[int, int] = (2, 2),
               trace_source: bool = False, prop_attn: bool = True, backend: str = "auto") -> nn.Module:
    """Patch a timm VisionTransformer in place to merge tokens in every block; returns it.

    Args:
        model: a timm ``VisionTransformer`` (or ``VisionTransformerDistilled``).
        r: tokens removed per block: an int, a per-block list, or ``(r, inflection)``;
            with method="dsm", an int: the budget is r per block over all blocks.
        method: how each block matches:
            - "tome": ToMe's bipartite matching;
            - "pitome": PiToMe (``tome_kernels.pitome_match``), same r schedule, margin
              ``margin * (1 - l / L)`` at block l of L;
            - "dsm": delayed spatial merging: blocks ``0 .. delay-1`` merge nothing, the
              budget ``r * L`` is spread over the others (``dsm_r_per_block``); block
              ``delay`` merges within ``window`` windows of the patch grid
              (``tome_kernels.window_match``), every later block with ToMe's matching.
        margin, alpha, shifted: PiToMe's energy (method="pitome" only).
        delay, window: DSM's delay and windows (method="dsm" only).
        trace_source: keep, per image, the final token of every input token
            (``get_state(model).token_map``, O(N) memory).
        prop_attn: proportional attention (log(size) added to the attention logits).
        backend: the merge backend, as in ``bipartite_merge``.

    A patched model patched again is first restored, so the new settings replace the old.
    ``remove(model)`` undoes the patch.
    """
    from . import remove

    # Everything is checked before anything changes, so a bad argument leaves the model as it was.
    check_backend_name(backend)
    check_flag("prop_attn", prop_attn)
    check_flag("trace_source", trace_source)
    options = check_method(method, ("tome", "pitome", "dsm"), margin=margin, alpha=alpha, shifted=shifted,
                           delay=delay, window=window)
    blocks = _check_model(model)
    if options.method == "dsm":
        schedule = dsm_r_per_block(r, len(blocks), options.delay)
    else:
        schedule = r_per_block(r, len(blocks))
    remove(model)
    state = ToMeState(
        schedule,
        class_token=getattr(model, "cls_token", None) is not None,
        distill_token=getattr(model, "dist_token", None) is not None,
        prop_attn=prop_attn, trace_source=trace_source, backend=backend, options=options,
    )
    state.undo = remove_timm
    for index, block in enumerate(blocks):
        block._tome_state = state
        block._tome_index = index
        block._tome_key_hook = capture_keys(block.attn.k_norm, state)
        block.__class__ = tome_subclass(type(block), _ToMeBlock)
    if options.method == "dsm":
        model._tome_grid_hook = model.patch_embed.register_forward_hook(_record_patch_grid(state))
    model._tome_state = state
    model.__class__ = tome_subclass(type(model), _ToMeVisionTransformer)
    return model


def remove_timm(model: nn.Module) -> None:
    """Undo ``patch_timm`` on ``model``."""
    for block in model.blocks:
        original = getattr(type(block), "_tome_original_class", None)
        if original is not None:
            block._tome_key_hook.remove()
            block.__class__ = original
            del block._tome_state, block._tome_index, block._tome_key_hook
    grid_hook = getattr(model, "_tome_grid_hook", None)
    if grid_hook is not None:
        grid_hook.remove()
        del model._tome_grid_hook
    model.__class__ = type(model)._tome_original_class
    del model._tome_state
