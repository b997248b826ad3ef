"""Token merging for diffusion models (Bolya & Hoffman 2023, "tomesd") in diffusers 0.42.x:
``BasicTransformerBlock`` (Stable Diffusion's UNets, DiT, PixArt) here, and the joint
text-image blocks of SD3 and Flux in ``diffusion_dit`` / ``diffusion_attention``.

Unlike ToMe in a ViT, the residual stream keeps its length: each patched block computes one
``grid_match`` plan on its input (image) hidden states and merges by its scheme: "merge"
merges the normalised tokens ("mean") before the self-attention (and, if asked, the
cross-attention and the feed-forward) and unmerges each output before its residual add; "kv"
merges only the self-attention's keys and values. The plan's 2-D partition needs the tokens'
grid, recorded by a forward pre-hook on the patched model (the 4-D latent, a patch-embedded
transformer's patch grid, Flux's ``img_ids``) or given as ``latent_size``. A block's
downsampling level is the smallest power of two d with ceil(H / d) * ceil(W / d) tokens, how a
UNet's stride-2 convolutions shrink the latent.

Each block becomes a subclass of its own class (``tome_subclass``); no module or parameter
changes, so the state_dict keeps its names while patched and ``remove`` restores the model.

What one forward pass uses (the recorded latent size, the seeded generators, what each block
merged) lives in a ``DiffusionPass`` that the model's pre-hook opens and its forward hook
closes, kept per thread: two threads calling one patched model never share a pass. A pass
with ratio > 0 in which no block merged anything warns (``NoMergeWarning``), once per
patched model and reason, saying why.
"""

import math
import os
import sys
import threading
import warnings
from collections.abc import Mapping
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import checks
from ..backends import check_backend_name
from ..methods import grid_match
from ..plan import MergePlan
from . import diffusion_attention, diffusion_dit
from .hooks import call_arguments, original_class, tome_subclass

# The norm types whose forward _merged_forward reproduces: Stable Diffusion 1.x / 2.x, DiT,
# PixArt. The others (ada_norm, ada_norm_continuous, layer_norm_i2vgen) are refused.
SUPPORTED_NORMS = ("layer_norm", "ada_norm_zero", "ada_norm_single")


class NoMergeWarning(UserWarning):
    """A forward pass of a model patched with ratio > 0 merged no token at all."""


def _first_tensor(args: tuple, kwargs: dict) -> Optional[Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def level_grid(latent_size: Tuple[int, int], downsample: int) -> Tuple[int, int]:
    """The (h, w) grid of an (H, W) latent downsampled by a factor d = ``downsample`` (a
    power of two), as a UNet's stride-2, padding-1 convolutions do it: ceil(H / d) x
    ceil(W / d) (each halving rounds up, and ceil(ceil(H / 2) / 2) = ceil(H / 4))."""
    height, width = latent_size
    return _ceil_div(height, downsample), _ceil_div(width, downsample)


def downsample_level(latent_size: Tuple[int, int], tokens: int) -> Optional[int]:
    """The smallest power of two d (1, 2, 4, ...) whose ``level_grid`` has ``tokens``
    tokens, or None when none has (tokens that do not come from this latent's grid).

    The count strictly falls as d doubles until the grid is 1x1, so d is unique but for a
    single token, which every d >= max(H, W) gives: the smallest is taken (a one-token
    block never merges anyway)."""
    downsample = 1
    while True:
        height, width = level_grid(latent_size, downsample)
        if height * width == tokens:
            return downsample
        if height * width < tokens or height * width == 1:
            return None
        downsample *= 2


_INTERNAL_DIRS = tuple(os.path.dirname(path) + os.sep for path in (os.path.dirname(__file__), torch.__file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside this package and
    torch (the user's call of the model), however many hook and wrapper frames lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class BlockCall(NamedTuple):
    """One patched block's call in a pass: its N ``tokens``, its downsampling ``level``
    (None when not needed, or without a latent size, a square grid being assumed), its
    (h, w) ``grid`` (None when not needed), the tokens it merged away, ``r`` (0: its output
    is diffusers' own), and ``why`` r is 0: "parts" (no merge_* flag), "few" (int(N * ratio)
    is 0), "deep" (level > max_downsample), "window" (the grid has no source token), or ""."""
    tokens: int
    level: Optional[int]
    grid: Optional[Tuple[int, int]]
    r: int
    why: str = ""


class DiffusionPass:
    """One forward pass of a patched model, in one thread.

    Attributes:
        recorded_size: the (H, W) of the model's 4-D first input (the latent), or None.
        blocks: a ``BlockCall`` per patched block call, in call order (none with ratio 0,
            where no block plans anything).
        generators: one per device, seeded with the model's seed when first used.
    """

    def __init__(self, recorded_size: Optional[Tuple[int, int]]):
        self.recorded_size = recorded_size
        self.blocks: List[BlockCall] = []
        self.generators: Dict[torch.device, torch.Generator] = {}

    @property
    def merged(self) -> bool:
        return any(call.r > 0 for call in self.blocks)


# DiffusionState._warn_once run eagerly under torch.compile: traced, the membership test of
# _warned was decided once at trace time and the warning repeated at every compiled call.
# Made when the first state is made or loaded (always eagerly), not at import:
# torch.compiler.disable imports torch._dynamo, and with it triton, which importing
# tome_kernels must not.
_warn_once_eagerly = None
_warn_outside_eagerly = None


class DiffusionState:
    """What the patched blocks of one model share: the settings (plain attributes, shared by
    every thread, copied by ``copy.deepcopy`` and saved by ``torch.save`` with the model)
    and, per thread, the passes now running and the last one that ended (neither copied
    nor saved: a copy starts with no pass, as a fresh model does).

    Attributes read after a forward pass (of the thread that reads them):
        last_pass: the ``DiffusionPass`` of this thread's last forward, or None.
        recorded_size: its latent (H, W), or None.
    """

    def __init__(self, ratio: float, *, sx: int, sy: int, max_downsample: int, random_dst: bool, seed: int,
                 merge_attn: bool, merge_crossattn: bool, merge_mlp: bool,
                 latent_size: Optional[Tuple[int, int]], backend: str, scheme: str = "merge", grid_from=None):
        self.ratio = ratio
        self.scheme = scheme
        # Where a pass's token grid comes from: None, the model's 4-D input latent; an int p,
        # a patch embedding's p x p patches of it; "img_ids", Flux's image token positions.
        self.grid_from = grid_from
        self.stride = (sy, sx)
        self.max_downsample = max_downsample
        self.random_dst = random_dst
        self.seed = seed
        self.merge_attn = merge_attn
        self.merge_crossattn = merge_crossattn
        self.merge_mlp = merge_mlp
        self.latent_size = latent_size
        self.backend = backend
        # Set by the patch function: the hooks' handles, how to restore the model, the
        # indices of the blocks that merge (None: all), and whether the patched module is a
        # model holding the blocks (so a block running outside its forward lost the grid)
        # rather than a bare block.
        self.hooks = ()
        self.blocks = None
        self.blocks_of_a_model = False
        self.undo = None
        self._fresh()

    def _fresh(self) -> None:
        global _warn_once_eagerly, _warn_outside_eagerly
        if _warn_once_eagerly is None:
            _warn_once_eagerly = torch.compiler.disable(DiffusionState._warn_once)
            _warn_outside_eagerly = torch.compiler.disable(DiffusionState._warn_outside)
        self._threads = threading.local()
        # The NoMergeWarning reasons already given: each is said once per patched model.
        self._warned = set()

    def __getstate__(self) -> dict:
        # A threading.local can be neither pickled nor deep-copied; a copy or a loaded
        # model is a new model, which starts with no pass and warns afresh.
        state = dict(self.__dict__)
        del state["_threads"], state["_warned"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fresh()

    def _open_passes(self) -> List[DiffusionPass]:
        passes = getattr(self._threads, "passes", None)
        if passes is None:
            passes = self._threads.passes = []
        return passes

    @property
    def last_pass(self) -> Optional[DiffusionPass]:
        return getattr(self._threads, "last_pass", None)

    @property
    def recorded_size(self) -> Optional[Tuple[int, int]]:
        last = self.last_pass
        return None if last is None else last.recorded_size

    def start_pass(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """The patched model's forward pre-hook: opens a pass, recording its token grid (see
        ``grid_from``). Every pass seeds its own generators, so every pass draws the same
        random destinations for a given seed.

        Raises:
            ValueError: gradient checkpointing turned on after patching, in a pass with
                gradients; ``latent_size`` that no power-of-two downsampling takes to the
                grid this call's input gives (its tokens would merge on the wrong grid).
        """
        now = DiffusionPass(self._input_grid(model, args, kwargs))
        # Opened before the checks raise: the forward hook (always called) closes it.
        self._open_passes().append(now)
        if torch.is_grad_enabled() and checkpointing(model):
            raise ValueError(CHECKPOINTING_REFUSED)
        recorded = now.recorded_size
        if self.latent_size is not None and recorded is not None:
            level = downsample_level(self.latent_size, recorded[0] * recorded[1])
            if level is None or level_grid(self.latent_size, level) != tuple(recorded):
                raise ValueError(f"latent_size={self.latent_size} does not fit {self._grid_source()} of this call, "
                                 f"{recorded[0]}x{recorded[1]}: no power-of-two downsampling of it is that grid, so "
                                 "the tokens would merge on the wrong one; patch with latent_size=None (the grid is "
                                 "read from the input) or the grid the tokens form")

    def _input_grid(self, model: nn.Module, args: tuple, kwargs: dict) -> Optional[Tuple[int, int]]:
        try:
            arguments = call_arguments(type(model).forward, model, *args, **kwargs)
        except TypeError:  # a call the forward itself will refuse, with its own message
            return None
        if self.grid_from == "img_ids":
            return flux_grid(arguments)
        # The latent by its name in diffusers' models (UNets: sample), else the first tensor.
        first = next((arguments[name] for name in ("sample", "hidden_states")
                      if isinstance(arguments.get(name), Tensor)), None)
        if first is None:
            first = _first_tensor(args, kwargs)
        if first is None or first.dim() != 4:
            return None
        height, width = first.shape[-2:]
        if self.grid_from is None:
            return height, width
        # A patch embedding makes (H // p) x (W // p) tokens (a stride-p convolution, or the
        # reshape of DiT / PixArt, which need H and W divisible by p).
        return height // self.grid_from, width // self.grid_from

    def begin_call(self, plan: MergePlan) -> None:
        """A joint block (or a Basic block with the kv scheme) starts a call that merges:
        its attention processors and feed-forward hooks in this thread read ``plan``."""
        self._threads.call = plan

    def end_call(self) -> None:
        self._threads.call = None

    def attention_plan(self) -> Optional[MergePlan]:
        """The plan the running block call's attention merges with, or None."""
        return getattr(self._threads, "call", None) if self.merge_attn else None

    def mlp_plan(self) -> Optional[MergePlan]:
        """The plan the running block call's feed-forward merges with, or None."""
        return getattr(self._threads, "call", None) if self.merge_mlp else None

    def end_pass(self, _model: nn.Module, _args: tuple, _kwargs: dict, output) -> None:
        """The patched model's forward hook (always called, also when the forward raised):
        closes this thread's innermost pass and warns if it merged nothing."""
        passes = self._open_passes()
        if not passes:  # a pre-hook registered before ours raised, so ours never ran
            return
        finished = passes.pop()
        self._threads.last_pass = finished
        # The output is None when the forward raised: the pass did not run to its end.
        if output is not None:
            self._warn_if_nothing_merged(finished)

    def plan(self, hidden_states: Tensor) -> Optional[MergePlan]:
        """This block call's merge plan, or None when nothing merges (the block then runs
        diffusers' own forward, so its output is bit-identical to the unpatched block)."""
        if self.ratio == 0:
            return None
        passes = self._open_passes()
        if passes:
            return self._plan(hidden_states, passes[-1])
        # A patched block called by itself, not through the patched model: a pass of its own.
        if self.blocks_of_a_model and self.latent_size is None:
            _warn_outside_eagerly(self)
        alone = DiffusionPass(None)
        plan = self._plan(hidden_states, alone)
        self._threads.last_pass = alone
        self._warn_if_nothing_merged(alone)
        return plan

    def _plan(self, hidden_states: Tensor, now: DiffusionPass) -> Optional[MergePlan]:
        checks.check_tensor("hidden_states", hidden_states, (3,), "(B, N, C)")
        tokens = hidden_states.shape[1]
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            now.blocks.append(BlockCall(tokens, None, None, 0, "parts"))
            return None
        r = int(tokens * self.ratio)
        if r == 0:
            # Decided before the grid, so a block that could not merge needs no latent size.
            now.blocks.append(BlockCall(tokens, None, None, 0, "few"))
            return None
        level, grid = self.grid(tokens, now.recorded_size)
        if level is not None and level > self.max_downsample:
            now.blocks.append(BlockCall(tokens, level, grid, 0, "deep"))
            return None
        generator = None
        if self.random_dst:
            device = hidden_states.device
            if device not in now.generators:
                now.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
            generator = now.generators[device]
        plan = grid_match(hidden_states, r, grid, stride=self.stride, random_dst=self.random_dst,
                          generator=generator, backend=self.backend)
        now.blocks.append(BlockCall(tokens, level, grid, plan.r, "" if plan.r > 0 else "window"))
        return plan if plan.r > 0 else None

    def grid(self, tokens: int, recorded_size: Optional[Tuple[int, int]] = None
             ) -> Tuple[Optional[int], Tuple[int, int]]:
        """(level, (h, w)): the downsampling level and row-major grid of a block's ``tokens``
        hidden states, from ``latent_size`` or else the ``recorded_size`` of the pass.
        Without either, a square N is taken as a sqrt(N) x sqrt(N) grid of unknown level
        (None, merged whatever max_downsample).

        Raises:
            ValueError: N is not square and there is no latent size, or no power-of-two
                downsampling of the latent has N tokens (the tokens come from another grid).
        """
        size = self.latent_size or recorded_size
        if size is None and self.grid_from == "img_ids":
            # Flux's ids were no whole grid (flux_grid): a square guess could merge a reference
            # image's tokens as if they were rows of the generated one.
            raise ValueError(f"a block has N={tokens} image tokens, but the call's img_ids are not one row-major "
                             "(h, w) grid of them (a Kontext reference image, custom ids), or the block ran outside "
                             "the model's forward (model.forward(...) called directly): call model(...), or patch "
                             "it with latent_size=(h, w), the grid the tokens form")
        if size is None:
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise ValueError(f"a block has N={tokens} hidden states, not a square grid, and the model's first "
                                 "input was not a 4-D latent (B, C, H, W): patch it with latent_size=(H, W)")
            return None, (side, side)
        level = downsample_level(size, tokens)
        if level is None:
            source = "latent_size" if self.latent_size else self._grid_source()
            counts, downsample = [], 1
            while not counts or counts[-1][1] * counts[-1][2] > max(tokens, 1):
                counts.append((downsample, *level_grid(size, downsample)))
                downsample *= 2
            listed = ", ".join(f"d={d}: {h}x{w}={h * w}" for d, h, w in counts)
            raise ValueError(
                f"a block has N={tokens} hidden states, but no power-of-two downsampling d of {source} "
                f"{size[0]}x{size[1]} has that many tokens (ceil(H/d) x ceil(W/d): {listed}): give the (h, w) grid "
                "these tokens come from as latent_size (for a patch embedding of patch size p, the latent's size "
                "divided by p)")
        return level, level_grid(size, level)

    def _grid_source(self) -> str:
        if self.grid_from == "img_ids":
            return "the image token grid of img_ids"
        if self.grid_from is not None:
            return f"the model's grid of {self.grid_from}x{self.grid_from} patches"
        return "the model's input latent"

    def _warn_outside(self) -> None:
        if "outside" in self._warned:
            return
        self._warned.add("outside")
        warnings.warn("tome_kernels.patch.diffusion: a block of the patched model ran outside the model's forward "
                      "(model.forward(...) called directly, or the block called by itself), so the token grid was "
                      "not read from the model's input and a square grid is assumed; call model(...), or patch with "
                      "latent_size", stacklevel=_user_stacklevel())

    def _warn_if_nothing_merged(self, finished: DiffusionPass) -> None:
        if self.ratio > 0 and not finished.merged:
            _warn_once_eagerly(self, finished)

    def _warn_once(self, finished: DiffusionPass) -> None:
        reason, message = self._why_nothing_merged(finished)
        if reason in self._warned:
            return
        self._warned.add(reason)
        warnings.warn(f"tome_kernels.patch.diffusion(ratio={self.ratio}): a forward pass merged no token: {message}",
                      NoMergeWarning, stacklevel=_user_stacklevel())

    def _why_nothing_merged(self, finished: DiffusionPass) -> Tuple[str, str]:
        """(reason, explanation) for a pass that merged nothing, from the block call the
        user most expects to merge: the one with the most tokens (the highest resolution)."""
        if not finished.blocks:
            return "no block", "no patched block ran in it"
        call = max(finished.blocks, key=lambda c: c.tokens)
        if call.why == "parts":
            return "parts", ("merge_attn, merge_crossattn and merge_mlp are all False; set one (merge_attn=True "
                             "merges the self-attention, tomesd's default)")
        if call.why == "few":
            return "few", (f"r = int(N * ratio) is 0 in every block: the most tokens a block had is N={call.tokens}, "
                           f"and N * ratio < 1")
        if call.why == "window":
            sy, sx = self.stride
            height, width = call.grid
            return "window", (f"the highest-resolution block's {call.tokens} tokens are a {height}x{width} grid, "
                              f"which with sy={sy}, sx={sx} has no token to merge (a grid with fewer than sy rows or "
                              "sx columns has no whole window to hold a destination, and sy = sx = 1 makes every "
                              "token a destination); give a smaller sy / sx that leaves windows of 2 tokens or more")
        height, width = call.grid
        size = self.latent_size or finished.recorded_size
        message = (f"no patched block ran at a downsampling <= max_downsample={self.max_downsample}: the highest-"
                   f"resolution one ran at downsampling {call.level} ({call.tokens} tokens, "
                   f"the {size[0]}x{size[1]} latent as a {height}x{width} grid); patch with max_downsample="
                   f"{call.level} to merge there (a UNet's level {call.level}; for tokens of {call.level}x{call.level} "
                   f"patches, latent_size=({height}, {width}), the patch grid, makes them level 1)")
        if self.latent_size is not None:
            recorded = finished.recorded_size
            if recorded is not None and tuple(recorded) != self.latent_size:
                what = ("the latent's (H, W)" if self.grid_from is None else
                        f"the grid's (h, w): the latent's size divided by {self.grid_from}"
                        if isinstance(self.grid_from, int) else "the grid's (h, w)")
                message += (f"; latent_size={self.latent_size} is not {self._grid_source()} "
                            f"{recorded[0]}x{recorded[1]}: is it in image pixels? latent_size is {what}")
            else:
                message += (f"; if latent_size={self.latent_size} is in image pixels, give the latent's (H, W) instead "
                            "(the image's size / 8 for Stable Diffusion's VAE)")
        return "deep", message


def flux_grid(arguments: dict) -> Optional[Tuple[int, int]]:
    """The (h, w) grid of a Flux transformer call's image tokens, from its ``img_ids`` (N, 3)
    (or (B, N, 3), deprecated): (0, row, col) per token, row-major, as Flux pipelines make
    them. None when that is not a whole grid of the call's N image tokens (a Kontext
    reference image, custom ids): the blocks then ask for ``latent_size``."""
    ids, hidden_states = arguments.get("img_ids"), arguments.get("hidden_states")
    if not isinstance(ids, Tensor) or not isinstance(hidden_states, Tensor) or ids.shape[-1] != 3:
        return None
    ids = ids[0] if ids.dim() == 3 else ids
    tokens = hidden_states.shape[1]
    if ids.shape[0] != tokens:
        return None
    # Checked in int64: pipelines make the ids in the latents' dtype, and row * w + col
    # (up to N - 1) is not exact in bfloat16 above 256 or float16 above 2048, though each id is.
    whole = ids.to(torch.int64)
    integral = (whole.to(ids.dtype) == ids).all()
    rows, cols = whole[:, 1], whole[:, 2]
    width = cols.amax() + 1
    # Row-major: token i at (i // w, i % w); the same ids in another order are another grid.
    row_major = (rows * width + cols == torch.arange(tokens, device=ids.device)).all() & integral
    # One host sync per denoising step, for all three: the grid decides the plan's shapes.
    height, width, row_major = torch.stack([rows.amax() + 1, width, row_major.to(torch.int64)]).tolist()
    if not row_major or height * width != tokens:
        return None
    return height, width


class _ToMeBasicTransformerBlock:
    """BasicTransformerBlock.forward, with merging wherever a plan is made: the merge scheme
    merges in ``_merged_forward``; the kv scheme runs diffusers' forward, whose self-attention
    processor (``diffusion_attention.ToMeBasicSelfAttnProcessor``) merges the keys and values."""

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                timestep: Optional[Tensor] = None, cross_attention_kwargs: Optional[dict] = None,
                class_labels: Optional[Tensor] = None, added_cond_kwargs: Optional[dict] = None) -> Tensor:
        plan = self._tome_diffusion.plan(hidden_states)
        if plan is None:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        state = self._tome_diffusion
        if state.scheme == "kv":
            diffusion_dit.check_processors(self, [("attn1", self.attn1)], state)
            state.begin_call(plan)
            try:
                return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                       timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
            finally:
                state.end_call()
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


# The backward pass recomputes each checkpointed block after the model's pass has closed:
# without its latent size or its generator, so with another grid or other destinations.
CHECKPOINTING_REFUSED = ("model has gradient checkpointing on: a block recomputed in the backward pass runs outside "
                         "its forward pass (no latent grid, no seeded generator) and would merge differently; "
                         "turn it off (model.disable_gradient_checkpointing()) to patch or to run a patched model "
                         "with gradients")


def checkpointing(model: nn.Module) -> bool:
    """Whether any module of ``model`` has diffusers' gradient checkpointing on."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _check_ratio(ratio) -> float:
    return checks.check_real("ratio", ratio, 0.0, 1.0, meaning="the fraction of tokens to merge")


def _check_max_downsample(max_downsample) -> int:
    value = checks.check_int("max_downsample", max_downsample, 1)
    # A block's level is always a power of two; 3 would silently act as 2.
    if value & (value - 1):
        raise ValueError(f"max_downsample must be a power of two (1, 2, 4, 8, ...), as a block's downsampling level "
                         f"is, got {value}")
    return value


def _check_seed(seed) -> int:
    seed = checks.check_int("seed", seed, 0)
    if seed >= 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


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


# The scheme="auto" of each block class, and the measurement (or reason) behind it.
_JOINT_EVIDENCE = ("kv: python -m benchmarks.e2e_dit --threads 2 (two runs, 2026-12-01, benchmarks/results/"
                   "e2e_dit_cpu_amd-epyc_20261201T043725Z.json and ..T043942Z.json; table in docs/diffusion.md): "
                   "at ratios 0.3 and 0.5 the two schemes' step times were not told apart (1-12% apart and once "
                   "50%, kv faster in 6 of 12 pairs over these and a third run, ..T045305Z.json; attention is "
                   "13-19% of a CPU step), and kv's output was 11-13x (SD3) and 2x (Flux) closer to the unpatched "
                   "one; no GPU measurement yet (scripts/gpu_checks.py's e2e_dit step)")
DEFAULT_SCHEMES: Dict[str, Tuple[str, str]] = {
    "BasicTransformerBlock": ("merge", "tomesd's own scheme, and these blocks' only one before schemes existed: "
                                       "UNet, DiT and PixArt results stay what they were; not measured against kv"),
    "JointTransformerBlock": ("kv", _JOINT_EVIDENCE),
    "FluxTransformerBlock": ("kv", _JOINT_EVIDENCE),
    "FluxSingleTransformerBlock": ("kv", _JOINT_EVIDENCE),
}


def _family(block: nn.Module) -> str:
    """The supported diffusers class ``block`` is (or subclasses), as ``DEFAULT_SCHEMES`` names it."""
    from diffusers.models.attention import BasicTransformerBlock

    for cls in (BasicTransformerBlock, *diffusion_dit.dit_block_classes()):
        if isinstance(block, cls):
            return cls.__name__
    raise AssertionError(f"{type(block).__name__} is no supported block")


def _unsupported_block(module: nn.Module) -> bool:
    """A diffusers transformer block of a class this patch does not handle (Wan, HunyuanDiT,
    the temporal blocks...): refused by name rather than silently left unmerged. Any
    diffusers ``*TransformerBlock``, and any ``*Block`` of ``diffusers.models.transformers``
    (HunyuanDiTBlock, CogVideoXBlock, LuminaNextDiTBlock: not every family names its blocks
    so; the UNets' blocks live in ``diffusers.models.unets``)."""
    cls = original_class(module)
    name, where = cls.__name__, cls.__module__
    return where.startswith("diffusers.") and (
        name.endswith("TransformerBlock") or (where.startswith("diffusers.models.transformers.") and
                                              name.endswith("Block")))


def _check_model(model: nn.Module, *, scheme: str, merge_crossattn: bool,
                 merge_mlp: bool) -> Tuple[List[nn.Module], str]:
    """The model's blocks to patch, all patchable, and the scheme they take; or the reason why
    not, as a ValueError."""
    from diffusers.models.attention import BasicTransformerBlock

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    own_state = getattr(model, "_tome_state", None)
    joint_classes = diffusion_dit.dit_block_classes()
    blocks = []
    for name, module in model.named_modules():
        where = f"model.{name}" if name else "model"
        if isinstance(module, BasicTransformerBlock):
            problem = _block_problem(module)
        elif isinstance(module, joint_classes):
            problem = diffusion_dit.subclass_problem(module)
        elif _unsupported_block(module):
            raise ValueError(f"{where} is a diffusers {original_class(module).__name__}, which "
                             "tome_kernels.patch.diffusion does not support (supported: BasicTransformerBlock, "
                             "JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock)")
        else:
            continue
        if problem is not None:
            raise ValueError(f"{where} {problem}: tome_kernels.patch.diffusion cannot patch it")
        if getattr(module, "_tome_diffusion", own_state) is not own_state:
            raise ValueError(f"{where} is already patched through another module; remove that patch first")
        blocks.append((where, module))
    if not blocks:
        raise ValueError(f"model ({type(model).__name__}) contains no diffusers transformer block to patch "
                         "(BasicTransformerBlock, JointTransformerBlock, FluxTransformerBlock, "
                         "FluxSingleTransformerBlock)")
    chosen = {DEFAULT_SCHEMES[_family(m)][0] if scheme == "auto" else scheme for _, m in blocks}
    if len(chosen) > 1:
        raise ValueError(f"scheme='auto' picks {' and '.join(sorted(chosen))} for this model's blocks; pass "
                         "scheme='merge' or 'kv'")
    auto = " (scheme='auto' chose 'kv' for this model; pass scheme='merge')" if scheme == "auto" else ""
    scheme = chosen.pop()
    joint = [(where, m) for where, m in blocks if isinstance(m, joint_classes)]
    for where, module in blocks:
        problem = (diffusion_dit.block_problem(module, scheme, merge_mlp) if isinstance(module, joint_classes)
                   else diffusion_dit.basic_kv_problem(module) if scheme == "kv" else None)
        if problem is not None:
            raise ValueError(f"{where} {problem}: tome_kernels.patch.diffusion cannot patch it with "
                             f"scheme={scheme!r}")
    if merge_crossattn and len(joint) == len(blocks):
        raise ValueError(f"merge_crossattn=True: {joint[0][0]} and the model's other blocks are joint text-image "
                         "blocks, which have no cross-attention (their one attention merges with merge_attn)")
    if merge_crossattn and all(isinstance(m, joint_classes) or m.attn2 is None for _, m in blocks):
        raise ValueError(f"merge_crossattn=True, but no block of this {type(model).__name__} has a cross-attention "
                         "(attn2): nothing would merge there")
    if scheme == "kv" and (merge_mlp or merge_crossattn):
        raise ValueError(f"merge_mlp and merge_crossattn apply to scheme='merge'{auto}: the kv scheme merges only "
                         "the self-attention's keys and values, and every token keeps its own output")
    if checkpointing(model):
        raise ValueError(CHECKPOINTING_REFUSED)
    return [m for _, m in blocks], scheme


def _select_blocks(blocks: List[nn.Module], selection) -> List[nn.Module]:
    """The blocks ``selection`` names: None, all; else indices (negative from the end) into
    ``blocks``, the model's supported blocks in module order."""
    if selection is None:
        return blocks
    # A mapping would iterate its keys, and a 0-d array cannot iterate: neither is a list of indices.
    if isinstance(selection, (str, bytes, Tensor, Mapping)) or not hasattr(selection, "__iter__") or \
            getattr(selection, "ndim", 1) != 1:
        raise TypeError(f"blocks must be None or a collection of block indices, got {type(selection).__name__}")
    chosen = []
    for index in selection:
        if not checks.is_int(index):
            raise TypeError(f"blocks must hold ints (block indices), got {type(index).__name__}")
        index = int(index)
        if not -len(blocks) <= index < len(blocks):
            raise ValueError(f"blocks: index {index} is out of range for the model's {len(blocks)} blocks")
        if blocks[index] in chosen:
            raise ValueError(f"blocks: block {index % len(blocks)} is named twice")
        chosen.append(blocks[index])
    if not chosen:
        raise ValueError("blocks is empty: no block would merge (pass None for every block)")
    return [block for block in blocks if block in chosen]


def _grid_from(model: nn.Module):
    """Where a pass of ``model`` finds its token grid (``DiffusionState.grid_from``): Flux's
    ``img_ids``; the patch size of a patch-embedded transformer (DiT, PixArt, SD3, a
    Transformer2DModel fed patches), so that its tokens are level 1, the top of the model;
    else None, the 4-D input latent itself (a UNet)."""
    import diffusers

    if isinstance(model, diffusers.FluxTransformer2DModel):
        return "img_ids"
    patch_models = (diffusers.DiTTransformer2DModel, diffusers.PixArtTransformer2DModel,
                    diffusers.SD3Transformer2DModel)
    if isinstance(model, patch_models) or (isinstance(model, diffusers.Transformer2DModel) and
                                           getattr(model, "is_input_patches", False)):
        return int(model.config.patch_size)
    return None


def is_pipeline(obj) -> bool:
    """Whether ``obj`` is a diffusers ``DiffusionPipeline``. Checked without importing
    diffusers: a pipeline exists only once it is imported."""
    library = sys.modules.get("diffusers")
    return library is not None and isinstance(obj, library.DiffusionPipeline)


def pipeline_denoiser(pipe, *, required: bool = True) -> Optional[nn.Module]:
    """The denoiser a diffusers pipeline runs at every step (its ``unet``, else its
    ``transformer``), or None when ``pipe`` is not a ``DiffusionPipeline`` (or, with
    ``required=False``, has neither).

    Raises:
        TypeError: with ``required``, a pipeline with neither (e.g. a prior-only one):
            nothing to patch.
    """
    if not is_pipeline(pipe):
        return None
    for name in ("unet", "transformer"):
        denoiser = getattr(pipe, name, None)
        if isinstance(denoiser, nn.Module):
            return denoiser
    if not required:
        return None
    raise TypeError(f"model is a {type(pipe).__name__} with neither a unet nor a transformer module to patch")


def patch_diffusion(model: nn.Module, ratio: float = 0.5, *, sx: int = 2, sy: int = 2, max_downsample: int = 1,
                    random_dst: bool = True, seed: int = 0, scheme: str = "auto", merge_attn: bool = True,
                    merge_crossattn: bool = False, merge_mlp: bool = False, latent_size=None, blocks=None,
                    backend: str = "auto") -> nn.Module:
    """Patch the transformer blocks of a diffusers model in place to merge image tokens
    (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"); returns the model.

    Args:
        model: any module holding diffusers ``BasicTransformerBlock``s (a UNet2DConditionModel,
            a DiT / PixArt transformer, a bare block) or joint text-image blocks (an
            SD3Transformer2DModel's ``JointTransformerBlock``s, a FluxTransformer2DModel's
            double- and single-stream blocks); or a diffusers pipeline, whose ``unet`` (else
            ``transformer``) is patched (as tomesd's ``apply_patch(pipe)``); the pipeline is
            returned.
        ratio: the fraction of a block's N image tokens to merge, r = int(N * ratio) (clamped
            to the tokens that are not destinations).
        sx, sy: the stride of the partition: one destination per sy x sx window.
        max_downsample: merge only in blocks whose tokens are the latent downsampled at most
            this much: a power of two (1: only the highest resolution; 2, 4, 8 go deeper). A
            block's level is the smallest power of two d with ceil(H / d) * ceil(W / d) == N.
            A patch-embedded transformer's tokens are its patch grid, level 1, in every block.
        random_dst: each window's destination at a random offset (else its top-left token).
        seed: seeds the random destinations at the start of every forward of ``model``.
        scheme: "merge" (merge before the attention, unmerge after: tomesd), "kv" (merge the
            self-attention's keys and values only, with proportional attention; nothing to
            unmerge), or "auto": each block class's entry in ``DEFAULT_SCHEMES``.
        merge_attn, merge_crossattn, merge_mlp: which parts run on the merged tokens
            (merge_crossattn: a BasicTransformerBlock's cross-attention; merge_crossattn and
            merge_mlp: scheme "merge" only).
        latent_size: the level-1 grid's (H, W), when the model's input does not give it: the
            latent's (a bare block, a transformer fed tokens), a patch-embedded transformer's
            patch grid, a Flux transformer's image token grid.
        blocks: which of the model's supported blocks merge (in module order; Flux: the
            double-stream blocks, then the single-stream ones): None, all; or their indices,
            negative from the end. The diffusion transformers' counterpart of
            ``max_downsample``, as all their blocks see one grid. The others stay unpatched.
        backend: the merge backend, as in ``grid_match``.

    A patched model patched again is first restored, so the new settings replace the old.
    ``tome_kernels.patch.remove(model)`` undoes the patch.

    Raises:
        TypeError, ValueError: a bad argument (named in the message), an unsupported block
            (named), or a model with none; the model is then left as it was.

    At call time, a block raises a ValueError when its N tokens are no power-of-two
    downsampling of the latent (give ``latent_size``), and a forward pass with ratio > 0
    that merges nothing warns with a ``NoMergeWarning`` saying why, once per reason.
    """
    from . import remove

    denoiser = pipeline_denoiser(model)
    if denoiser is not None:
        patch_diffusion(denoiser, ratio, sx=sx, sy=sy, max_downsample=max_downsample, random_dst=random_dst, seed=seed,
                        scheme=scheme, merge_attn=merge_attn, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp,
                        latent_size=latent_size, blocks=blocks, backend=backend)
        return model
    # Everything is checked before anything changes, so a bad argument leaves the model as it was.
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a str, got {type(scheme).__name__}")
    if scheme not in ("auto", *diffusion_attention.SCHEMES):
        raise ValueError(f"scheme must be 'auto', 'merge' or 'kv', got {scheme!r}")
    settings = dict(
        sx=checks.check_int("sx", sx, 1), sy=checks.check_int("sy", sy, 1),
        max_downsample=_check_max_downsample(max_downsample),
        random_dst=checks.check_flag("random_dst", random_dst), seed=_check_seed(seed),
        merge_attn=checks.check_flag("merge_attn", merge_attn),
        merge_crossattn=checks.check_flag("merge_crossattn", merge_crossattn),
        merge_mlp=checks.check_flag("merge_mlp", merge_mlp),
        latent_size=None if latent_size is None else checks.check_int_pair("latent_size", latent_size),
        backend=check_backend_name(backend),
    )
    ratio = _check_ratio(ratio)
    found, settings["scheme"] = _check_model(model, scheme=scheme, merge_crossattn=merge_crossattn,
                                             merge_mlp=merge_mlp)
    selected = _select_blocks(found, blocks)
    remove(model)
    state = DiffusionState(ratio, grid_from=_grid_from(model), **settings)
    # Which blocks merge, as indices into the model's supported blocks (None: all).
    state.blocks = None if blocks is None else tuple(found.index(block) for block in selected)
    state.blocks_of_a_model = model not in found
    state.undo = remove_diffusion
    # Bound methods of the state, not closures: a deep copy of the model gets hooks bound to
    # the copy's state, and pickle saves them by reference to it.
    handles = [model.register_forward_pre_hook(state.start_pass, with_kwargs=True),
               model.register_forward_hook(state.end_pass, with_kwargs=True, always_call=True)]
    joint_classes = diffusion_dit.dit_block_classes()
    for block in selected:
        if isinstance(block, joint_classes):
            handles += diffusion_dit.install(block, state)
            continue
        if state.scheme == "kv":
            block.attn1.set_processor(diffusion_attention.ToMeBasicSelfAttnProcessor(block.attn1.processor, state))
        block._tome_diffusion = state
        block.__class__ = tome_subclass(type(block), _ToMeBasicTransformerBlock)
    state.hooks = tuple(handles)
    model._tome_state = state
    return model


def remove_diffusion(model: nn.Module) -> None:
    """Undo ``patch_diffusion`` on ``model``."""
    state = model._tome_state
    for handle in state.hooks:
        handle.remove()
    for module in model.modules():
        if getattr(module, "_tome_diffusion", None) is state:
            diffusion_dit.restore_processors(module)
            module.__class__ = type(module)._tome_original_class
            del module._tome_diffusion
    del model._tome_state
