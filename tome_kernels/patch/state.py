"""The per-model ToMe state that a patched model's blocks share during one forward pass.

A patched block cannot pass sizes or source maps to the next block through its return value
(timm chains blocks with nn.Sequential, BERT with its own loop), so they live here: the first
block resets them, every block reads and updates them, and the caller can read them after
the forward pass (``tome_kernels.patch.get_state(model)``).
"""

from typing import List, Optional

import torch
from torch import Tensor, nn

from ..api import bipartite_match, bipartite_merge
from ..backends import _REGISTRY, requested_backend

# A padded position's size. Padding is kept out of the matching (NaN keys), but when a row
# has fewer real candidates than r, padded A tokens are still merged away (into B token 0, a
# real token): this size leaves it unchanged to about one part in a million, and being
# positive, no group averages to 0 / 0. A token is real when its size is at least
# VALID_SIZE: real sizes are whole counts of real tokens, and a row's padding sums to far less.
PADDING_SIZE = 1e-6
VALID_SIZE = 0.5


def check_backend_name(backend) -> str:
    """Fail at patch time, not at the first forward pass, for a backend that does not exist."""
    name, source = requested_backend(backend)
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"{source}={name!r} is not a backend: expected one of auto, {', '.join(_REGISTRY)}")
    return backend


class ToMeState:
    """What the blocks of one patched model share.

    Attributes read after a forward pass:
        r: tokens each block asks to remove (each block clamps it to what it has).
        size: (B, N_now, 1) float32 sizes of the current tokens, or None before any merge.
        token_map: with ``trace_source``, (B, N_input) int64: the row of the current tokens
            that every input token ended in; None without tracing or before any merge.
        num_input_tokens: N at the first block of the last forward pass.
    """

    def __init__(self, r: List[int], *, class_token: bool, distill_token: bool, prop_attn: bool,
                 trace_source: bool, backend: str):
        self.r = r
        self.class_token = class_token
        self.distill_token = distill_token
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.backend = backend
        # Set by the patch function: how to restore the model (tome_kernels.patch.remove).
        self.undo = None
        self.begin(None)

    def begin(self, size: Optional[Tensor], num_input_tokens: int = 0) -> None:
        """Start a forward pass. ``size`` is None (all ones) or, for padded batches, the
        starting sizes with ``PADDING_SIZE`` at padded positions."""
        self.size = size
        self.padded = size is not None
        self.merged = False
        self.token_map: Optional[Tensor] = None
        self.num_input_tokens = num_input_tokens
        self.keys: Optional[Tensor] = None

    def attention_bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        """The additive (B, 1, 1, N) attention mask for the current tokens, or None when no
        token has merged yet (so that r = 0 runs exactly the unpatched computation).

        Proportional attention adds log(size): a key standing for s tokens counts s times.
        Padding (size below VALID_SIZE) gets the most negative value of ``dtype``.
        """
        if not self.merged or (not self.prop_attn and not self.padded):
            return None
        size = self.size[..., 0].to(torch.float32)
        bias = size.log() if self.prop_attn else torch.zeros_like(size)
        if self.padded:
            bias = bias.masked_fill(size < VALID_SIZE, torch.finfo(dtype).min)
        return bias.to(dtype)[:, None, None, :]

    def valid_weights(self) -> Optional[Tensor]:
        """(B, N, 1) float32 pooling weights: each token's size, zero for padding; None
        when no token has merged and nothing is padded (all weights equal)."""
        if self.size is None:
            return None
        return torch.where(self.size >= VALID_SIZE, self.size, torch.zeros_like(self.size))

    def merge(self, x: Tensor, r: int) -> Tensor:
        """Merge ``r`` tokens of ``x`` on the keys this block's attention left in ``keys``."""
        keys, self.keys = self.keys, None
        if keys is None:
            raise RuntimeError("tome_kernels: the patched attention did not record its keys this pass")
        if self.padded:
            keys = self._hide_padding(keys)
        flags = dict(class_token=self.class_token, distill_token=self.distill_token, backend=self.backend)
        if self.trace_source:
            plan = bipartite_match(keys, r, **flags)
            x, self.size = plan.merge_wavg(x, self.size)
            self._follow(plan.token_map)
        else:
            x, self.size = bipartite_merge(x, keys, r, self.size, **flags)
        if self.padded:
            x = self._real_tokens_first(x)
        self.merged = True
        return x

    def _follow(self, step: Tensor) -> None:
        """Compose one step's token map (input row -> output row) into the traced map."""
        self.token_map = step if self.token_map is None else step.gather(1, self.token_map)

    def _hide_padding(self, keys: Tensor) -> Tensor:
        """Keys with NaN at padded tokens. By the merge contract a NaN score never wins and a
        row of them ranks last, so padding neither takes a real token's place among the r
        merged nor receives one: each row merges its real tokens as it would alone."""
        padding = (self.size[..., 0] < VALID_SIZE)[:, None, :, None]
        return keys.masked_fill(padding, float("nan"))

    def _real_tokens_first(self, x: Tensor) -> Tensor:
        """Move the real tokens ahead of the padding, each group in its order, so that the
        next block splits a row's real tokens into A and B as it would with no padding."""
        order = torch.argsort((self.size[..., 0] < VALID_SIZE).to(torch.int8), dim=1, stable=True)
        x = x.gather(1, order[..., None].expand_as(x))
        self.size = self.size.gather(1, order[..., None])
        if self.token_map is not None:
            self._follow(torch.argsort(order, dim=1))
        return x

    def source_matrix(self) -> Tensor:
        """The dense (B, N_now, N_input) 0/1 matrix of which input tokens each current token
        stands for (the public implementation's form); O(N^2) memory, so only on request."""
        if not self.trace_source:
            raise ValueError("source_matrix needs the model patched with trace_source=True")
        if self.token_map is None:
            raise ValueError("source_matrix: no tokens were merged in the last forward pass (or none ran yet)")
        return nn.functional.one_hot(self.token_map, self.size.shape[1]).transpose(1, 2).to(torch.float32)


_SUBCLASSES = {}


def tome_subclass(cls: type, mixin: type) -> type:
    """The class a patched module takes: ``mixin``'s forward over ``cls``. One per original
    class, so that isinstance checks keep working and ``remove`` knows what to restore."""
    key = (cls, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"ToMe{cls.__name__}", (mixin, cls), {"_tome_original_class": cls})
    return _SUBCLASSES[key]


def capture_keys(module: nn.Module, state: ToMeState, to_heads=None):
    """Hand the output of ``module`` (what an attention makes its keys with) to ``state``,
    so that the merge gets the keys as keys (B, H, N, Dh) and no head-mean is ever
    materialised. A forward hook rather than a wrapper module, so that the model's
    state_dict keeps its names while patched. Returns the hook's handle."""

    def hand_over(_module, _inputs, keys):
        state.keys = keys if to_heads is None else to_heads(keys)

    return module.register_forward_hook(hand_over)
