"""ToMe for BERT-style encoders: a Hugging Face transformers ``BertModel`` (transformers 5.x),
as used by sentence-transformers models such as all-MiniLM-L6-v2.

Each ``BertLayer`` becomes a subclass of its own class whose forward merges the attention
output (after BERT's post-norm residual) before the feed-forward part; a forward hook on the
key projection hands the keys (B, H, N, Dh) to the merge. [CLS] is token 0 and is never
merged away.

The model itself becomes a subclass too, whose forward starts each pass: it reads the 2-D
``attention_mask`` and starts with size 1 at real tokens and ``PADDING_SIZE`` at padded
ones. Being the forward (not a hook), it also runs when a library calls ``model.forward``
directly, as sentence-transformers does. The merge keeps padding out of the matching (NaN
keys: never a source before the real tokens, never a destination), and moves the real tokens
ahead of the padding before the first merge (so with left padding [CLS] is still the
protected token 0) and after each one, so a sentence in a padded batch merges exactly as it
would alone, with either padding side (tested). After the first merge the attention mask is
rebuilt from the sizes, so padding is never attended to nor pooled.

``method="pitome"`` matches with PiToMe instead (``pitome_match``'s ``real`` mask gives each
sentence of a padded batch the roles it would have alone).
"""

import sys
import warnings
from typing import List, Optional

import torch
from torch import Tensor, nn

from ..backends import check_backend_name
from ..checks import check_flag
from .hooks import KeyCapture, call_arguments, original_class, remove_hooks, tome_subclass
from .options import check_method, with_prop_attn
from .schedule import RSchedule, r_per_block
from .state import PADDING_SIZE, ToMeState

# The attention interfaces that take an additive float mask of shape (B, 1, 1, N).
_SUPPORTED_ATTENTION = ("eager", "sdpa")


class _ToMeBertLayer:
    """BertLayer.forward (encoder only) with the merge between attention and feed-forward."""

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                past_key_values=None, **kwargs) -> Tensor:
        state: ToMeState = self._tome_state
        if self._tome_index == 0:
            # Without the model's forward (``model.encoder(...)``) the pass would reuse the
            # last pass's sizes, or miss the padding of this one.
            if not state.started:
                raise RuntimeError("a ToMe-patched BERT must be called through the patched model itself (its "
                                   "forward reads the attention mask), not through model.encoder")
            state.started = False
        if encoder_hidden_states is not None or past_key_values is not None:
            raise ValueError("a ToMe-patched BERT is an encoder: encoder_hidden_states and past_key_values "
                             "must be None")
        if self.gradient_checkpointing and self.training:
            raise RuntimeError("a ToMe-patched BERT cannot use gradient checkpointing: recomputing a layer would "
                               "merge its tokens a second time")
        if state.merged:
            # The incoming mask has the input's length; the merged tokens need their own.
            attention_mask = state.attention_bias(hidden_states.dtype)
        attention_output, _ = self.attention(hidden_states, attention_mask, past_key_values=None, **kwargs)
        state.block = self._tome_index
        r = state.r[self._tome_index]
        if r > 0:
            attention_output = state.merge(attention_output, r)
        else:
            state.keys = None
        # imported here: tome_kernels.patch must import without transformers installed
        from transformers.pytorch_utils import apply_chunking_to_forward

        return apply_chunking_to_forward(self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim,
                                         attention_output)


def _attention_implementation(layer: nn.Module) -> str:
    return getattr(layer.attention.self.config, "_attn_implementation", None) or "eager"


class _ToMeBertModel:
    """BertModel.forward, after starting the pass with the sizes the attention mask gives."""

    def forward(self, *args, **kwargs):
        state: ToMeState = self._tome_state
        called, state.called = state.called, False
        if not called and not state.unmerge_output and not state.warned_direct_call:
            state.warned_direct_call = True
            warnings.warn(_DIRECT_CALL, stacklevel=2)
        _begin_pass(self, args, kwargs)
        out = super().forward(*args, **kwargs)
        if state.unmerge_output and state.token_map is not None:
            if isinstance(out, tuple):
                out = (_unmerged(out[0], state.token_map), *out[1:])
            else:
                out.last_hidden_state = _unmerged(out.last_hidden_state, state.token_map)
        return out


_DIRECT_CALL = ("a ToMe-patched BertModel was called through its forward method directly, as sentence-transformers "
                "does: its last_hidden_state has fewer tokens than the attention mask, so a pooling that reads the "
                "mask (sentence-transformers' Pooling) falls back to an unweighted mean over merged tokens and "
                "padding. Patch the SentenceTransformer itself, tome_kernels.patch.bert(sentence_model, r), or pool "
                "with tome_kernels.patch.mean_pool")


class _CallMark:
    """A forward pre-hook that tells the patched forward it was called through the module
    (``model(...)``), not as ``model.forward(...)``, which skips hooks."""

    def __init__(self, state: ToMeState):
        self.state = state

    def __call__(self, _module: nn.Module, _inputs) -> None:
        self.state.called = True


def _unmerged(hidden_states: Tensor, token_map: Tensor) -> Tensor:
    """(B, N_input, C): each input token takes the state of the merged token it ended in.
    The mean of these over the real input tokens is the size-weighted mean of the merged
    tokens, and token 0 is [CLS] (never merged)."""
    return hidden_states.gather(1, token_map[..., None].expand(-1, -1, hidden_states.shape[-1]))


def sentence_transformer_bert(model) -> Optional[nn.Module]:
    """The transformers model of a sentence-transformers ``SentenceTransformer`` (its first
    module's ``auto_model``), or None when ``model`` is not one. Looked up without
    importing sentence-transformers: a model of it exists only once it is imported."""
    library = sys.modules.get("sentence_transformers")
    if library is None or not isinstance(model, library.SentenceTransformer):
        return None
    first = model[0] if len(model) else None
    encoder = getattr(first, "auto_model", None)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"model is a SentenceTransformer whose first module ({type(first).__name__}) holds no "
                        "transformers model (.auto_model)")
    return encoder


def _begin_pass(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Start the pass of ``model(*args, **kwargs)`` with the sizes the mask gives."""
    state: ToMeState = model._tome_state
    layers = model.encoder.layer
    implementation = _attention_implementation(layers[0])
    if implementation not in _SUPPORTED_ATTENTION:
        raise ValueError(f"a ToMe-patched BERT runs with attn_implementation 'eager' or 'sdpa', not {implementation!r}")
    call = call_arguments(original_class(model).forward, model, *args, **kwargs)
    mask = call.get("attention_mask")
    tokens = call.get("input_ids")
    if tokens is None:
        tokens = call.get("inputs_embeds")
    size = None
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D (batch, tokens) for a ToMe-patched BERT, got shape "
                             f"{tuple(mask.shape)}: merging changes the token count, so the model builds its own masks")
        real = mask.to(tokens.device if tokens is not None else mask.device) != 0
        # Whether the batch has padding is data: torch.compile cannot branch on it, so a
        # compiled pass takes the padded path for any mask (the same merges: with no
        # padding, hiding and reordering change nothing).
        if torch.compiler.is_compiling() or not bool(real.all()):
            size = torch.where(real, 1.0, PADDING_SIZE).to(torch.float32)[..., None]
    num_tokens = mask.shape[1] if mask is not None else (tokens.shape[1] if tokens is not None else 0)
    state.begin(size, num_tokens)
    state.started = True


def _check_model(model) -> List[nn.Module]:
    from transformers.models.bert.modeling_bert import BertLayer, BertSelfAttention

    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(model, nn.Module) or not isinstance(layers, (nn.ModuleList, list, tuple)) or not layers:
        hint = " (pass its .bert)" if isinstance(getattr(model, "bert", None), nn.Module) else ""
        raise TypeError(f"model must be a transformers BertModel (a module whose .encoder.layer lists BertLayer), "
                        f"got {type(model).__name__}{hint}")
    config = getattr(model, "config", None)
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("model is configured as a decoder or with cross-attention (config.is_decoder / "
                         "config.add_cross_attention): ToMe patches bidirectional encoders only")
    for i, layer in enumerate(layers):
        if not isinstance(layer, BertLayer):
            raise TypeError(f"model.encoder.layer[{i}] is a {type(layer).__name__}, expected a BertLayer")
        if layer.is_decoder or hasattr(layer, "crossattention") or layer.attention.is_cross_attention:
            raise ValueError(f"model.encoder.layer[{i}] is a decoder layer or has cross-attention: ToMe patches "
                             "bidirectional encoders only")
        attention = layer.attention.self
        if not isinstance(attention, BertSelfAttention) or attention.is_causal:
            raise ValueError(f"model.encoder.layer[{i}].attention.self is a {type(attention).__name__} "
                             f"(is_causal={getattr(attention, 'is_causal', None)}): expected a bidirectional "
                             "BertSelfAttention")
        implementation = _attention_implementation(layer)
        if implementation not in _SUPPORTED_ATTENTION:
            raise ValueError(f"model uses attn_implementation {implementation!r}; ToMe needs 'eager' or 'sdpa' "
                             "(an additive float mask), e.g. model.set_attn_implementation('sdpa')")
    return list(layers)


def patch_bert(model: nn.Module, r: RSchedule, *, method: str = "tome", preset: Optional[str] = None,
               margin=None, alpha: Optional[float] = None, energy_form: Optional[str] = None, split=None,
               prop_attn: Optional[bool] = None, backend: str = "auto", trace_source: bool = False) -> nn.Module:
    """Patch a BERT-style encoder in place to merge tokens in every layer; returns it.

    Args:
        model: a transformers ``BertModel`` (encoder: no decoder, no cross-attention), with
            attn_implementation "eager" or "sdpa"; or a sentence-transformers
            ``SentenceTransformer`` over one (see below).
        r: tokens removed per layer: an int, a per-layer list, or ``(r, inflection)``.
        method: "tome" (ToMe's bipartite matching, Bolya et al., ICLR 2023) or "pitome"
            (PiToMe, Tran et al., NeurIPS 2024; ``tome_kernels.pitome_match``). DSM needs a
            patch grid: it is for ``patch.timm`` only.
        preset: PiToMe's configuration (method="pitome" only), ``patch.options.PRESETS``:
            "authors_text" (the default: the authors' BERT patch: Gaussian energy of width
            1 - m, margin 0.9 - 0.25 l / L, the r highest-energy tokens merged into the next
            r, no proportional attention) or "paper" (equation (4), margin 0.9 (1 - l / L),
            alternating split, proportional attention); the vision presets are accepted too.
        margin, alpha, energy_form, split: override the preset (method="pitome" only), as in
            ``patch.timm``.
        prop_attn: proportional attention (log(size) added to the attention logits); None:
            on, except where a PiToMe preset says otherwise.
        backend: the merge backend, as in ``bipartite_merge``.
        trace_source: keep, per sequence, the final token of every input token
            (``get_state(model).token_map``).

    The patched model takes a 2-D ``attention_mask`` (or none), padded on either side. Its
    ``last_hidden_state`` has fewer tokens than the input; pool it with
    ``mean_pool(model, last_hidden_state)``, which weights each token by its size and leaves
    padding out. ``pooler_output`` reads token 0, [CLS], which is never merged away.

    A ``SentenceTransformer`` is patched through its BertModel, whose ``last_hidden_state``
    is then unmerged back to the input tokens (each takes the merged token it ended in), so
    that the library's pooling over its attention mask is the size-weighted one: ``encode``
    gives the merged embedding. ``remove(model)`` undoes either patch.

    Raises:
        TypeError / ValueError: for a model or an argument it cannot take, before any change.
    """
    from . import remove

    # Everything is checked before anything changes, so a bad argument leaves the model as it was.
    check_backend_name(backend)
    check_flag("trace_source", trace_source)
    inner = sentence_transformer_bert(model)
    encoder = model if inner is None else inner
    layers = _check_model(encoder)
    options = check_method(method, ("tome", "pitome"), len(layers), "authors_text", preset=preset, margin=margin,
                           alpha=alpha, energy_form=energy_form, split=split)
    options = with_prop_attn(prop_attn, options)
    schedule = r_per_block(r, len(layers))
    remove(encoder)
    # Unmerging the output needs the token map.
    state = ToMeState(schedule, class_token=True, distill_token=False, prop_attn=options.prop_attn,
                      trace_source=trace_source or inner is not None, backend=backend, options=options,
                      unmerge_output=inner is not None)
    state.undo = remove_bert
    for index, layer in enumerate(layers):
        attention = layer.attention.self
        layer._tome_state = state
        layer._tome_index = index
        attention.key.register_forward_hook(KeyCapture(state, head_dim=attention.attention_head_size))
        layer.__class__ = tome_subclass(type(layer), _ToMeBertLayer)
    encoder._tome_state = state
    encoder.register_forward_pre_hook(_CallMark(state))
    encoder.__class__ = tome_subclass(type(encoder), _ToMeBertModel)
    return model


def remove_bert(model: nn.Module) -> None:
    """Undo ``patch_bert`` on ``model`` (the BertModel)."""
    for layer in model.encoder.layer:
        if original_class(layer) is not type(layer):
            remove_hooks(layer.attention.self.key, KeyCapture)
            layer.__class__ = original_class(layer)
            del layer._tome_state, layer._tome_index
    remove_hooks(model, _CallMark)
    model.__class__ = original_class(model)
    del model._tome_state


def mean_pool(model: nn.Module, hidden_states: Tensor) -> Tensor:
    """(B, C) mean of the current tokens of the last forward pass, each weighted by its size
    (the input tokens it stands for) and padding left out; the sentence-transformers mean
    pooling of the unmerged tokens, up to rounding. Returned in ``hidden_states``' dtype."""
    from . import get_state

    state = get_state(model)
    if not isinstance(hidden_states, Tensor) or hidden_states.dim() != 3:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, Tensor) else type(hidden_states).__name__
        raise ValueError(f"hidden_states must be a (B, N, C) tensor, got {got}")
    weights = state.valid_weights()
    if weights is None:
        return hidden_states.mean(dim=1)
    if weights.shape[:2] != hidden_states.shape[:2]:
        raise ValueError(f"hidden_states has (B, N) = {tuple(hidden_states.shape[:2])} but the model's last forward "
                         f"pass ended with {tuple(weights.shape[:2])} tokens: pool the output of that pass")
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    weights = weights.to(device=hidden_states.device, dtype=dtype)
    pooled = (hidden_states.to(dtype) * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return pooled.to(hidden_states.dtype)
