"""The run-time half of ``patch.transformers``: the attention function it registers in
transformers' ``AttentionInterface``, each known encoder layer's forward with the merge between
the attention residual and the MLP, SigLIP's pooling head weighted by size, and the hook that
records DSM's patch grid. ``hf_vision.py`` checks a model and installs these.

Each layer forward reproduces transformers 5.x's own (``ViTLayer``, ``DeiTLayer``,
``CLIPEncoderLayer``, ``SiglipEncoderLayer``, ``Dinov2Layer``, ``Dinov2WithRegistersLayer``)
operation for operation, so that a layer whose r is 0 before any merge computes the same bits.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .prop_attention import size_attention
from .state import ToMeState

# The names under which the attention function is registered, by the implementation the
# model had (its "base"). Two names, one function: the name also picks transformers' mask
# function for the model's own attention_mask (sdpa's boolean mask, eager's additive one).
ATTENTION_NAMES = {"sdpa": "tome_kernels_sdpa", "eager": "tome_kernels_eager"}

NO_MASK = ("a ToMe-patched transformers vision model that merges takes no attention_mask: the mask is over the "
           "input tokens, and merging changes the token count")
NO_CHECKPOINTING = ("gradient checkpointing recomputes layers in the backward pass, which would replay the merges "
                    "on the wrong sizes; turn it off (model.activation_checkpointing_disable()) to use ToMe")


def tome_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                   **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """The attention of a patched layer, as transformers calls an ``AttentionInterface``
    function (query, key, value (B, H, N, Dh)): hands the keys to the layer's merge and runs
    the model's own attention (``module._tome_base``) with log(size) per key once a token
    has merged (proportional attention); before that, the base call unchanged."""
    state: Optional[ToMeState] = getattr(module, "_tome_state", None)
    if state is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAMES['sdpa']!r} / {ATTENTION_NAMES['eager']!r} is "
                           f"tome_kernels.patch.transformers' and runs only in a patched model; this "
                           f"{type(module).__name__} is not patched (its config was copied from a patched model's "
                           "config?): set its config._attn_implementation back to 'sdpa' or 'eager'")
    state.keys = key
    log_size = state.size[..., 0].log() if state.merged and state.prop_attn else None
    return size_attention(module, query, key, value, attention_mask, log_size, module._tome_base, **kwargs)


def register_attention() -> None:
    """Register the attention function and the mask functions of its names in transformers.
    Done by each patch and by each patched layer loaded by pickle (``torch.load`` of a patched
    model, in a process that never patched one), not at import: importing tome_kernels
    imports no transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base, name in ATTENTION_NAMES.items():
        AttentionInterface.register(name, tome_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


class _RegisteredOnLoad:
    """A patched layer unpickled in a new process needs the attention names its config holds."""

    def __setstate__(self, state: dict) -> None:
        register_attention()
        super().__setstate__(state)


def _start(layer: nn.Module, hidden_states: Tensor,
           attention_mask: Optional[Tensor]) -> Tuple[ToMeState, Optional[Tensor]]:
    """What every patched layer does before its attention: layer 0 starts the pass; while any
    layer merges, what merging breaks is refused. Returns the state and the mask to attend with."""
    state: ToMeState = layer._tome_state
    if layer._tome_index == 0:
        state.begin(None, hidden_states.shape[1])
    state.block = layer._tome_index
    if state.any_merging:
        # Run eagerly, the model makes no mask unless given one. Compiled, it makes an all-True
        # one anyway (transformers skips it only outside dynamo), so there a user's mask is
        # refused by the model's pre-hook (NoMaskWhileMerging) instead.
        if attention_mask is not None and not torch.compiler.is_compiling():
            raise ValueError(NO_MASK)
        if layer.gradient_checkpointing and layer.training:
            raise ValueError(NO_CHECKPOINTING)
        implementation = getattr(layer, layer._tome_attention_attr).config._attn_implementation
        if implementation not in ATTENTION_NAMES.values():
            raise RuntimeError(f"the attention implementation of this ToMe-patched model was changed to "
                               f"{implementation!r} after patching (set_attn_implementation?), so its attention no "
                               "longer hands keys to the merge: patch the model again")
    # Until the first merge the layer is the model's own, mask included (bit for bit); after
    # it, a mask over the input tokens no longer fits, and can only be the all-True one.
    return state, None if state.merged else attention_mask


def _merge(layer: nn.Module, state: ToMeState, hidden_states: Tensor) -> Tensor:
    r = state.r[layer._tome_index]
    if r > 0:
        return state.merge(hidden_states, r)
    state.keys = None
    return hidden_states


class ViTLayerForward(_RegisteredOnLoad):
    """ViTLayer / DeiTLayer.forward (pre-norm, dropout on each branch) with the merge."""

    _tome_attention_attr = "attention"

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        state, attention_mask = _start(self, hidden_states, attention_mask)
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual
        hidden_states = _merge(self, state, hidden_states)

        residual = hidden_states
        hidden_states = self.layernorm_after(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual
        return hidden_states


class CLIPLayerForward(_RegisteredOnLoad):
    """CLIPEncoderLayer / SiglipEncoderLayer.forward (pre-norm, plain residuals) with the merge."""

    _tome_attention_attr = "self_attn"

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        state, attention_mask = _start(self, hidden_states, attention_mask)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = residual + hidden_states
        hidden_states = _merge(self, state, hidden_states)

        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class Dinov2LayerForward(_RegisteredOnLoad):
    """Dinov2Layer / Dinov2WithRegistersLayer.forward (layer scale, drop path) with the merge."""

    _tome_attention_attr = "attention"

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        state, attention_mask = _start(self, hidden_states, attention_mask)
        residual = hidden_states
        hidden_states = self.norm1(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = self.layer_scale1(hidden_states)
        hidden_states = self.drop_path(hidden_states) + residual
        hidden_states = _merge(self, state, hidden_states)

        residual = hidden_states
        hidden_states = self.norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.layer_scale2(hidden_states)
        hidden_states = self.drop_path(hidden_states) + residual
        return hidden_states


class SizeWeightedPoolingHead:
    """SiglipMultiheadAttentionPoolingHead.forward whose probe attends to each token as many
    times as its size: log(size) is the additive float attn_mask of each key (the proportional
    attention of the layers, which a merged token's pooled weight needs whatever prop_attn says:
    it stands for all its patches). Before any merge, the head's own forward."""

    def forward(self, hidden_state: Tensor) -> Tensor:
        state: ToMeState = self._tome_state
        if not state.merged:
            return super().forward(hidden_state)
        size = state.size
        if size.shape[:2] != hidden_state.shape[:2]:
            raise ValueError(f"hidden_state has (B, N) = {tuple(hidden_state.shape[:2])}, but this thread's last "
                             f"forward pass of the patched model ended with {tuple(size.shape[:2])} tokens: the head "
                             "weights each token by its size, so pool the output of that pass")
        batch_size, heads = hidden_state.shape[0], self.attention.num_heads
        probe = self.probe.repeat(batch_size, 1, 1)
        # nn.MultiheadAttention takes a float mask per (batch, head) as (B * heads, L, S), batch-major.
        log_size = size[..., 0].log().to(hidden_state.dtype)
        mask = log_size[:, None, None, :].expand(-1, heads, 1, -1).reshape(batch_size * heads, 1, -1)

        hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=mask)[0]

        residual = hidden_state
        hidden_state = self.layernorm(hidden_state)
        hidden_state = residual + self.mlp(hidden_state)
        return hidden_state[:, 0]


class PatchGridRecorder:
    """Forward pre-hook on a model's embeddings: DSM's (height, width) patch grid of this pass,
    from pixel_values' shape and the config's patch size (so images of another size, with
    interpolate_pos_encoding, get their own grid). A strided convolution of kernel p makes
    H // p rows."""

    def __init__(self, state: ToMeState, patch_size: Tuple[int, int]):
        self.state = state
        self.patch_size = patch_size

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        pixel_values = args[0] if args else kwargs.get("pixel_values")
        height, width = pixel_values.shape[-2:]
        self.state.grid_size = (int(height) // self.patch_size[0], int(width) // self.patch_size[1])


class NoMaskWhileMerging:
    """Forward pre-hook on the vision model: refuses an attention_mask while any layer merges
    (the layers cannot tell a user's mask from the all-True one transformers makes under
    torch.compile). ``parameters``: the names of the model forward's positional parameters."""

    def __init__(self, state: ToMeState, parameters: Sequence[str]):
        self.state = state
        self.position = list(parameters).index("attention_mask") if "attention_mask" in parameters else None

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        if mask is not None and self.state.any_merging:
            raise ValueError(NO_MASK)
