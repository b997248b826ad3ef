"""The per-model ToMe state that a patched model's blocks share during one forward pass.

A patched block cannot pass sizes or source maps to the next block through its return value
(timm chains blocks with nn.Sequential, BERT with its own loop), so they live here: the first
block resets them, every block reads and updates them, and the caller can read them after
the forward pass (``tome_kernels.patch.get_state(model)``).

What one forward pass keeps (sizes, source map, the keys handed from an attention to its
merge) is kept per thread: two threads calling one patched model each see their own pass, as
they would with the unpatched model, and ``get_state`` reads the last pass of the thread that
asks. The settings (r, the method, the flags) are plain attributes, shared by all threads,
copied by ``copy.deepcopy`` and saved by ``torch.save``; the per-thread part is neither (a
copy starts with no pass, as a fresh model does).

The state also runs each block's matching by the model's method (``options.py``): ToMe's
bipartite matching, PiToMe's energy-protected matching, or DSM (windows of the patch grid
at its first merging block, ToMe's matching after it); every method's plan is applied by
the same size-weighted merge.
"""

import threading
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..api import bipartite_match, bipartite_merge
from ..methods import pitome_match, window_match
from ..plan import MergePlan
from .options import MethodOptions

# A padded position's size. Padding is kept out of the matching (NaN keys), but when a row
# has fewer real candidates than r, padded tokens are still merged away (into a real token:
# ToMe's B token 0, PiToMe's first destination). 2**-60 is so small that a real token's
# size-weighted average with padding rounds to the real token alone in float32 (the padding's
# share is below 2**-59, far under half an ulp, for any finite token of magnitude below about
# 2**30 times the real one), yet positive and a normal float32, so no group of padding
# averages to 0 / 0. A token is real when its size is at least VALID_SIZE: real sizes are
# whole counts of real tokens, and a row's padding sums to far less.
PADDING_SIZE = 2.0**-60
VALID_SIZE = 0.5


def _per_thread(name: str, default=None, doc: str = "") -> property:
    """An attribute of ``ToMeState`` that each thread reads and writes on its own. A plain
    property over a ``threading.local``, which torch.compile traces without a graph break."""

    def get(self):
        return getattr(self._threads, name, default)

    def set(self, value):
        setattr(self._threads, name, value)

    return property(get, set, doc=doc)


class ToMeState:
    """What the blocks of one patched model share.

    Attributes read after a forward pass (of the thread that reads them):
        r: tokens each block asks to remove (each block clamps it to what it has).
        size: (B, N_now, 1) float32 sizes of the current tokens, or None before any merge.
        token_map: with ``trace_source``, (B, N_input) int64: the row of the current tokens
            that every input token ended in; None without tracing or before any merge.
        num_input_tokens: N at the first block of the last forward pass.
        options: the matching method and its options (``MethodOptions``).
        register_tokens: tokens right after the class token that are never merged nor merged
            into (DINOv2's registers); their size stays 1. 0 for timm and BERT.
    """

    # One forward pass's bookkeeping, per thread (see the module docstring).
    size = _per_thread("size", doc="(B, N_now, 1) sizes of the current tokens, or None")
    padded = _per_thread("padded", False, "whether the pass started with padded tokens")
    merged = _per_thread("merged", False, "whether any block of the pass has merged yet")
    token_map = _per_thread("token_map", doc="(B, N_input) int64 rows of the current tokens, or None")
    num_input_tokens = _per_thread("num_input_tokens", 0, "N at the first block of the pass")
    keys = _per_thread("keys", doc="the keys the last attention handed over, taken by its merge")
    block = _per_thread("block", 0, "the block now merging: PiToMe's margin and DSM's onset depend on it")
    grid_size = _per_thread("grid_size", doc="DSM: the (height, width) patch grid of the pass")
    started = _per_thread("started", False, "BERT: the model's forward started the pass, no layer ran yet")
    called = _per_thread("called", False, "BERT: the model was called as model(...), whose hooks ran")

    def __init__(self, r: List[int], *, class_token: bool, distill_token: bool, prop_attn: bool,
                 trace_source: bool, backend: str, options: MethodOptions = MethodOptions(),
                 unmerge_output: bool = False, register_tokens: int = 0):
        self.r = r
        # Registers sit after the class token: the merge sets them aside (so the matching sees
        # [CLS] + patches, the layout the contract protects) and puts them back in place.
        if register_tokens and (not class_token or distill_token):
            raise ValueError("register_tokens need a class token before them and no distillation token")
        self.register_tokens = register_tokens
        # BERT in a SentenceTransformer: the output is unmerged back to the input tokens, so
        # that the library's own pooling over its attention mask weights each token by its size.
        self.unmerge_output = unmerge_output
        # BERT: the warning that the model was called through its forward directly, given once.
        self.warned_direct_call = False
        self.class_token = class_token
        self.distill_token = distill_token
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.backend = backend
        self.options = options
        # Set by the patch function: how to restore the model (tome_kernels.patch.remove).
        self.undo = None
        self._threads = threading.local()

    def __getstate__(self) -> dict:
        # A threading.local can be neither pickled nor deep-copied; a copy starts with no pass.
        state = dict(self.__dict__)
        del state["_threads"]
        return state

    def __setstate__(self, state: dict) -> None:
        # A state saved before registers were known has none.
        self.__dict__.update({"register_tokens": 0, **state})
        self._threads = threading.local()

    def save_pass(self) -> dict:
        """This thread's pass bookkeeping, to put back with ``restore_pass`` (a diagnostic
        pass, such as counting FLOPs, leaves the user's last pass as it was)."""
        return dict(vars(self._threads))

    def restore_pass(self, saved: dict) -> None:
        vars(self._threads).clear()
        vars(self._threads).update(saved)

    @property
    def any_merging(self) -> bool:
        """Whether any block's r is above 0 (each block may still clamp its r to 0)."""
        return any(r > 0 for r in self.r)

    def begin(self, size: Optional[Tensor], num_input_tokens: int = 0) -> None:
        """Start a forward pass. ``size`` is None (all ones) or, for padded batches, the
        starting sizes with ``PADDING_SIZE`` at padded positions."""
        self.size = size
        self.padded = size is not None
        self.merged = False
        self.token_map = None
        self.num_input_tokens = num_input_tokens
        self.keys = None

    def attention_bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        """The additive (B, 1, 1, N) attention mask for the current tokens, or None when no
        token has merged yet (so that r = 0 runs exactly the unpatched computation).

        Proportional attention adds log(size): a key standing for s tokens counts s times.
        Padding (size below VALID_SIZE) gets the most negative value of ``dtype``.
        """
        if not self.merged or (not self.prop_attn and not self.padded):
            return None
        # At least float32 for the log, and wide enough to hold the most negative value of dtype.
        size = self.size[..., 0].to(torch.promote_types(dtype, torch.float32))
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
            raise RuntimeError(f"tome_kernels: block {self.block}'s attention did not hand its keys to the merge in "
                               "this pass: its attention or k_norm (key projection) no longer runs the patched "
                               "forward hook (replaced after patching?); patch the model again")
        if self.register_tokens:
            return self._merge_around_registers(x, keys, r)
        return self._merge(x, keys, r)

    def _merge_around_registers(self, x: Tensor, keys: Tensor, r: int) -> Tensor:
        """``_merge`` of [CLS] + patches, the registers (rows 1 .. R) set aside and put back
        after [CLS] with size 1; the token map is of all the rows, registers mapping to themselves."""
        reg = self.register_tokens
        batch = x.shape[0]
        registers = x[:, 1:1 + reg]
        x = torch.cat([x[:, :1], x[:, 1 + reg:]], dim=1)
        keys = torch.cat([keys[..., :1, :], keys[..., 1 + reg:, :]], dim=-2)
        if self.size is not None:
            self.size = torch.cat([self.size[:, :1], self.size[:, 1 + reg:]], dim=1)
        # _merge composes its step into token_map: start it afresh, so that the step of the
        # rows without registers comes out, and compose the step over all rows here.
        token_map, self.token_map = self.token_map, None
        x = self._merge(x, keys, r)
        if self.trace_source:
            step = self.token_map
            # [CLS] is row 0 before and after (protected, and nothing merges into it); the
            # other rows move down past the registers.
            own = torch.arange(1, 1 + reg, device=step.device).expand(batch, reg)
            self.token_map = token_map
            self._follow(torch.cat([step[:, :1], own, step[:, 1:] + reg], dim=1))
        ones = torch.ones(batch, reg, 1, dtype=self.size.dtype, device=self.size.device)
        self.size = torch.cat([self.size[:, :1], ones, self.size[:, 1:]], dim=1)
        return torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)

    def _merge(self, x: Tensor, keys: Tensor, r: int) -> Tensor:
        if self.padded:
            if not self.merged:
                # Padding may come first (left padding): the protected class token must be
                # the first real token, and A / B must split the real tokens as they would alone.
                x, keys = self._real_tokens_first(x, keys)
            keys = self._hide_padding(keys)
        plan = self._match(keys, r)
        if plan is None:
            flags = dict(class_token=self.class_token, distill_token=self.distill_token, backend=self.backend)
            x, self.size = bipartite_merge(x, keys, r, self.size, **flags)
        else:
            x, self.size = plan.merge_wavg(x, self.size)
            if self.trace_source:
                self._follow(plan.token_map)
        if self.padded:
            x, _ = self._real_tokens_first(x)
        self.merged = True
        return x

    def _match(self, keys: Tensor, r: int) -> Optional[MergePlan]:
        """This block's plan, or None for ToMe's matching untraced, which the fused
        ``bipartite_merge`` does in one call (no plan is made)."""
        flags = dict(class_token=self.class_token, distill_token=self.distill_token, backend=self.backend)
        method = self.options.method
        if method == "pitome":
            options = self.options
            pitome = dict(margin=options.margins[self.block], alpha=options.alpha, energy_form=options.energy_form,
                          split=options.splits[self.block], **flags)
            real = self.size[..., 0] >= VALID_SIZE if self.padded else None
            return pitome_match(keys, r, real=real, **pitome)
        if method == "dsm" and self.block == self.options.delay:
            return window_match(keys, r, self._patch_grid(keys.shape[-2]), window=self.options.window, **flags)
        return bipartite_match(keys, r, **flags) if self.trace_source else None

    def _patch_grid(self, tokens: int) -> Tuple[int, int]:
        """The patch grid DSM's windows cut, checked against the tokens of its first merging
        block: nothing merged before it, so they must be the prefix tokens and the grid."""
        # Registers are not counted: the merge sets them aside before matching.
        protected = int(self.class_token) + int(self.distill_token)
        grid = self.grid_size
        if grid is None or protected + grid[0] * grid[1] != tokens:
            seen = "no patch grid was recorded" if grid is None else f"a {grid[0]}x{grid[1]} patch grid"
            raise ValueError(f"method='dsm' merges block {self.options.delay}'s tokens in windows of the patch grid, "
                             f"but that block sees {tokens} tokens and {seen} with {protected} prefix tokens; "
                             "tokens dropped or added before the blocks (e.g. patch dropout) break the grid")
        return grid

    def _follow(self, step: Tensor) -> None:
        """Compose one step's token map (input row -> output row) into the traced map."""
        self.token_map = step if self.token_map is None else step.gather(1, self.token_map)

    def _hide_padding(self, keys: Tensor) -> Tensor:
        """Keys with NaN at padded tokens. By the merge contract a NaN score never wins and a
        row of them ranks last, so padding neither takes a real token's place among the r
        merged nor receives one: each row merges its real tokens as it would alone."""
        padding = (self.size[..., 0] < VALID_SIZE)[:, None, :, None]
        return keys.masked_fill(padding, float("nan"))

    def _real_tokens_first(self, x: Tensor, keys: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Move the real tokens ahead of the padding, each group in its order, so that the
        next match splits a row's real tokens into A and B as it would with no padding.
        ``keys`` (B, H, N, Dh), when given, are moved with them."""
        order = torch.argsort((self.size[..., 0] < VALID_SIZE).to(torch.int8), dim=1, stable=True)
        x = x.gather(1, order[..., None].expand_as(x))
        self.size = self.size.gather(1, order[..., None])
        if keys is not None:
            keys = keys.gather(-2, order.view(order.shape[0], *([1] * (keys.dim() - 3)), -1, 1).expand_as(keys))
        if self.trace_source:
            self._follow(torch.argsort(order, dim=1))
        return x, keys

    def source_matrix(self) -> Tensor:
        """The dense (B, N_now, N_input) 0/1 matrix of which input tokens each current token
        stands for (the public implementation's form); O(N^2) memory, so only on request."""
        if not self.trace_source:
            raise ValueError("source_matrix needs the model patched with trace_source=True")
        if self.token_map is None:
            raise ValueError("source_matrix: no tokens were merged in the last forward pass (or none ran yet)")
        return nn.functional.one_hot(self.token_map, self.size.shape[1]).transpose(1, 2).to(torch.float32)
