"""The attention of a patched diffusion block on merged image tokens: diffusers attention
processors (the library's own extension point, ``Attention.set_processor``) that wrap the
processor a block had and run it unchanged whenever the block call merges nothing.

Two schemes (``SCHEMES``), both on one ``grid_match`` plan of the block's image tokens:

    merge  (Bolya & Hoffman 2023, "tomesd"): the image tokens' queries, keys and values are
           merged ("mean"); attention runs on the shorter sequence; the output projection runs
           on the merged image rows, which are then unmerged. A merged key stands for its group
           once (tomesd's convention).
    kv     (key / value merging, as in ToDo, Smith et al. 2024, and attention-only merging for
           DiTs): only the image keys and values are merged; every query, text and image,
           attends to them, with log(size) added to a merged key's logit (ToMe's proportional
           attention), so the output keeps every token and nothing is unmerged.

Text tokens are never merged: they keep their own queries, keys and values in both schemes.

Rotary position embeddings (Flux) are applied before merging, to each token's query and key
at its own position. A dot product is linear in each side, so a merged key's logit is then the
mean of its members' logits (and a merged query's the mean of theirs): exactly what merging
means without rotary embeddings. Merging the hidden states first and rotating the merged
token at one position (its destination's, say) would instead rotate tokens from elsewhere in
the image, which bipartite matching pairs freely, by the wrong angle. The price is that the
q / k / v projections run on every token; the attention and the output projection do not.

Processors supported, each reproduced operation for operation on the merged path (diffusers
0.42): ``AttnProcessor2_0`` (a ``BasicTransformerBlock``'s self-attention, kv scheme; the
merge scheme merges there before the projections, in ``diffusion.py``), ``JointAttnProcessor2_0``
(SD3's ``JointTransformerBlock``, its ``attn`` and SD3.5's image-only ``attn2``) and
``FluxAttnProcessor`` (Flux's double- and single-stream blocks).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..plan import MergePlan

SCHEMES = ("merge", "kv")


def _tokens(x: Tensor) -> Tensor:
    """(B, H, L, D) -> (B, L, H * D), the layout a plan merges."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, H * D) -> (B, H, L, D)."""
    batch, length, _ = x.shape
    return x.reshape(batch, length, heads, -1).transpose(1, 2)


def _projections(x: Tensor, heads: int, to_q, to_k, to_v, norm_q, norm_k) -> Tuple[Tensor, Tensor, Tensor]:
    """(B, H, L, D) queries, keys and values of ``x`` (B, L, C): the projections, then the
    query and key norms where the attention has them (None otherwise), as diffusers does."""
    query, key, value = (_heads(project(x), heads) for project in (to_q, to_k, to_v))
    return (query if norm_q is None else norm_q(query)), (key if norm_k is None else norm_k(key)), value


def merged_attention(query: Tensor, key: Tensor, value: Tensor, start: int, plan: MergePlan,
                     scheme: str) -> Tuple[Tensor, int]:
    """Scaled dot-product attention with the image tokens merged by ``plan``.

    Args:
        query, key, value: (B, H, L, D), norms and rotary embeddings already applied; rows
            [start, start + N) are the N = plan.num_tokens image tokens, the rest text.
        start: the first image row.
        plan: the block call's plan over the N image tokens.
        scheme: "merge" or "kv" (module docstring).

    Returns:
        (out, image_rows): out (B, L', H * D), L' = L - r for "merge" (the image rows merged,
        to be unmerged by the caller) and L for "kv"; image_rows, the number of image rows in
        out (N - r or N), from ``start``.
    """
    heads, dim = query.shape[1], query.shape[-1]
    stop = start + plan.num_tokens

    def around(x: Tensor, image: Tensor) -> Tensor:
        # The text rows before and after the image rows, kept as they were.
        return torch.cat([x[:, :, :start], image, x[:, :, stop:]], dim=2)

    if scheme == "kv":
        # Keys and values merged in one pass (their channels side by side, per head), which
        # also counts the tokens each merged row stands for: with no sizes given, merge_wavg's
        # weights are ones, so its average is the mean and its sizes the group counts.
        kv = torch.cat([key[:, :, start:stop], value[:, :, start:stop]], dim=-1)
        kv, size = plan.merge_wavg(_tokens(kv))
        kv = _heads(kv, heads)
        key, value = around(key, kv[..., :dim]), around(value, kv[..., dim:])
        bias = torch.zeros(query.shape[0], 1, 1, key.shape[2], device=query.device, dtype=query.dtype)
        bias[:, 0, 0, start:start + plan.num_tokens - plan.r] = size.squeeze(-1).log().to(query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        return _tokens(out), plan.num_tokens
    qkv = torch.cat([query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop]], dim=-1)
    qkv = _heads(plan.merge(_tokens(qkv), "mean"), heads)
    query, key, value = (around(x, qkv[..., i * dim:(i + 1) * dim]) for i, x in enumerate((query, key, value)))
    out = F.scaled_dot_product_attention(query, key, value)
    return _tokens(out), plan.num_tokens - plan.r


class _Wrapper:
    """What the three processors share: the block's state (which says whether the call now
    running merges, and how) and the processor the attention had, restored by ``remove``."""

    def __init__(self, original, state):
        self.original = original
        self.state = state

    # diffusers' set_attention_backend / reset_attention_backend and context parallelism set
    # these on every processor that has them. Passed through to the wrapped processor, so the
    # calls that merge nothing run it on the backend asked for, the setting outlives
    # ``remove``, and a merging call can refuse it (``diffusion_dit.check_processors``); a
    # processor without them (SD3's) makes the wrapper have none either (the getter's
    # AttributeError), and diffusers skips it.
    _attention_backend = property(lambda self: self.original._attention_backend,
                                  lambda self, value: setattr(self.original, "_attention_backend", value))
    _parallel_config = property(lambda self: self.original._parallel_config,
                                lambda self, value: setattr(self.original, "_parallel_config", value))


class ToMeBasicSelfAttnProcessor(_Wrapper):
    """``AttnProcessor2_0`` of a ``BasicTransformerBlock``'s self-attention (``attn1``), with
    the kv scheme: every token's query over merged keys and values."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        plan = self.state.attention_plan()
        if plan is None or encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError("attention_mask must be None when the self-attention merges tokens: the mask is over the "
                             "N unmerged tokens")
        query, key, value = _projections(hidden_states, attn.heads, attn.to_q, attn.to_k, attn.to_v, attn.norm_q,
                                         attn.norm_k)
        out, _ = merged_attention(query, key, value, 0, plan, "kv")
        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        return out / attn.rescale_output_factor


class ToMeJointAttnProcessor(_Wrapper):
    """``JointAttnProcessor2_0`` (SD3): image tokens first, then the text tokens."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, *args, **kwargs):
        plan = self.state.attention_plan()
        if plan is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        # (The original ignores attention_mask too.)
        query, key, value = _projections(hidden_states, attn.heads, attn.to_q, attn.to_k, attn.to_v, attn.norm_q,
                                         attn.norm_k)
        if encoder_hidden_states is not None:
            text_query, text_key, text_value = _projections(encoder_hidden_states, attn.heads, attn.add_q_proj,
                                                            attn.add_k_proj, attn.add_v_proj, attn.norm_added_q,
                                                            attn.norm_added_k)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)
        out, image_rows = merged_attention(query, key, value, 0, plan, self.state.scheme)
        out = out.to(query.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :image_rows]))
        if image_rows < plan.num_tokens:
            image = plan.unmerge(image)
        if encoder_hidden_states is None:
            return image
        text = out[:, image_rows:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


class ToMeFluxAttnProcessor(_Wrapper):
    """``FluxAttnProcessor``: text tokens first, then the image tokens; rotary embeddings on
    both. In a single-stream block the text and image tokens come concatenated, with no
    ``encoder_hidden_states``: the image tokens are the last N = plan.num_tokens."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, image_rotary_emb=None):
        plan = self.state.attention_plan()
        if plan is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("attention_mask must be None when a Flux block merges tokens: the mask is over the "
                             "unmerged tokens")
        query, key, value, text_query, text_key, text_value = _get_qkv_projections(attn, hidden_states,
                                                                                   encoder_hidden_states)
        # (B, L, H, D), as the original: the sequence on dim 1.
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))
            text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
            text_value = text_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            # Rotated at every token's own position, before merging (module docstring).
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_rows = query.shape[1] - plan.num_tokens
        out, image_rows = merged_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                           text_rows, plan, self.state.scheme)
        out = out.to(query.dtype)
        text, image = out[:, :text_rows], out[:, text_rows:]
        if encoder_hidden_states is None:
            # Single-stream: the block's proj_out follows, on every token.
            if image_rows < plan.num_tokens:
                image = plan.unmerge(image)
            return torch.cat([text, image], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        if image_rows < plan.num_tokens:
            image = plan.unmerge(image)
        return image, attn.to_add_out(text.contiguous())

