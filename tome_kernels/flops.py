"""FLOPs of a timm ViT, patched with ToMe or not, counted the way the ToMe paper reports them.

    from tome_kernels.flops import count_gflops, flop_report
    count_gflops(model)            # DeiT-S at 224: 4.599; patched with r = 13: 2.706
    flop_report(model).blocks      # tokens and GFLOPs of every block

Conventions:
- One multiply-add is one FLOP (the ToMe paper's and fvcore's convention): the numbers are
  half of what ``torch.utils.flop_counter.FlopCounterMode`` reports, which counts two.
- What is counted is what ``FlopCounterMode`` counts: matrix products and convolutions (the
  patch embedding, every linear layer, the attention products ``q @ k^T`` and
  ``attn @ v``, the head). Normalisation, softmax, activations, additions and the merge's
  gathers and scatters count zero, as in the paper.
- Attention is counted at the token count each block really sees. PyTorch's fused attention
  is not counted on every device (on the CPU it is not counted at all), so during the
  counting pass every module with a ``fused_attn`` flag (timm's ``Attention``) runs its plain
  ``q @ k^T`` / softmax / ``@ v`` path; the flags are restored afterwards.
- The merge: of the matching, only its one matrix product counts, the cosine similarity of
  the A tokens with the B tokens, ``ceil(N/2) * floor(N/2) * head_dim`` multiply-adds in a
  block that sees N tokens and merges any (a block whose r is zero, or clamped to zero, does
  no matching and counts nothing). To count it the same way whatever merge backend the
  model was patched with (a fused kernel is one opaque op to the counter), the counting pass
  runs the merge with the ``reference`` backend. It is under 1% of a block; ``FlopReport``
  gives it apart (``merge_gflops``) for whoever wants to leave it out.
- One image (batch 1) of random pixels; the count does not depend on the pixels, because
  every block removes a fixed number of tokens.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .checks import check_int_pair

ImageSize = Union[int, Sequence[int]]

# FlopCounterMode counts a multiply-add as two FLOPs; the reported unit is 1e9 multiply-adds.
_COUNTER_FLOPS_PER_GFLOP = 2e9


@dataclass(frozen=True)
class BlockFlops:
    """One transformer block: the tokens its attention sees, the tokens left after its
    merge (what its MLP sees), its GFLOPs, and the part of them that the matching costs."""

    tokens_in: int
    tokens_out: int
    gflops: float
    merge_gflops: float


@dataclass(frozen=True)
class FlopReport:
    """GFLOPs (multiply-adds) of one image through the model, in total and per block."""

    img_size: Tuple[int, int]
    gflops: float
    blocks: Tuple[BlockFlops, ...]

    @property
    def merge_gflops(self) -> float:
        """The matching's share of ``gflops``, summed over the blocks."""
        return sum(block.merge_gflops for block in self.blocks)

    @property
    def other_gflops(self) -> float:
        """Everything outside the blocks: patch embedding and head."""
        return self.gflops - sum(block.gflops for block in self.blocks)

    @property
    def tokens(self) -> Tuple[int, ...]:
        """Tokens each block's attention sees."""
        return tuple(block.tokens_in for block in self.blocks)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (ViT, DeiT), got {type(model).__name__}")


def _resolve_img_size(model: nn.Module, img_size: Optional[ImageSize]) -> Tuple[int, int]:
    """The (H, W) to count at, checked against what the model's patch embedding accepts."""
    embed = model.patch_embed
    native = None if embed.img_size is None else check_int_pair("model.patch_embed.img_size", tuple(embed.img_size))
    if img_size is None:
        if native is None:
            raise ValueError("img_size is required: the model was built without a fixed image size")
        return native
    size = check_int_pair("img_size", img_size)
    if native is not None and size != native and not getattr(model, "dynamic_img_size", False):
        raise ValueError(f"img_size={size}: the model was built for {native} only; create it with "
                         "dynamic_img_size=True to count other sizes")
    patch = check_int_pair("model.patch_embed.patch_size", tuple(embed.patch_size))
    if not getattr(embed, "dynamic_img_pad", False) and (size[0] % patch[0] or size[1] % patch[1]):
        raise ValueError(f"img_size={size} is not a multiple of the patch size {patch}")
    return size


def _input_channels(model: nn.Module) -> int:
    """The channels of the image: those of the first convolution of the patch embedding
    (its projection, or the stem of a hybrid model's backbone)."""
    for module in model.patch_embed.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError(f"cannot tell the input channels of {type(model.patch_embed).__name__}: no Conv2d in it")


class _BlockProbe:
    """Forward hooks that read the counter's running total at the edges of each block and
    of its attention and MLP, and the token counts going in and out."""

    def __init__(self, counter: FlopCounterMode, blocks: Sequence[nn.Module]):
        self.counter = counter
        self.marks = [dict() for _ in blocks]
        self.handles = []
        for marks, block in zip(self.marks, blocks):
            self._on(block.register_forward_pre_hook, marks, "start", tokens="tokens_in")
            self._on(block.register_forward_hook, marks, "end", tokens="tokens_out")
            # A patched block merges between the end of its attention and the start of its MLP.
            attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
            if isinstance(attn, nn.Module) and isinstance(mlp, nn.Module):
                self._on(attn.register_forward_hook, marks, "attn_end")
                self._on(mlp.register_forward_pre_hook, marks, "mlp_start")

    def _on(self, register, marks: dict, point: str, tokens: Optional[str] = None) -> None:
        def hook(module, args, *rest):
            marks[point] = self.counter.get_total_flops()
            if tokens is not None:
                x = rest[0] if rest else args[0]
                marks[tokens] = x.shape[1]
        self.handles.append(register(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def blocks(self) -> Tuple[BlockFlops, ...]:
        out = []
        for marks in self.marks:
            merge = marks["mlp_start"] - marks["attn_end"] if "mlp_start" in marks else 0
            out.append(BlockFlops(marks["tokens_in"], marks["tokens_out"],
                                  (marks["end"] - marks["start"]) / _COUNTER_FLOPS_PER_GFLOP,
                                  merge / _COUNTER_FLOPS_PER_GFLOP))
        return tuple(out)


def flop_report(model: nn.Module, img_size: Optional[ImageSize] = None) -> FlopReport:
    """Count one forward pass of one image through ``model`` (a timm VisionTransformer,
    patched by ``tome_kernels.patch.timm`` or not); see the module docstring for what counts.

    Args:
        model: the model; its training mode, ``fused_attn`` flags, merge backend and ToMe
            state (sizes, token map of the last batch) are all as before when this returns.
        img_size: an int or (height, width); default the model's own image size.
    """
    _check_model(model)
    height, width = _resolve_img_size(model, img_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    in_chans = _input_channels(model)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, in_chans, height, width, generator=generator).to(device, dtype)

    modes = [(m, m.training) for m in model.modules()]
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    state = getattr(model, "_tome_state", None)
    saved_state = dict(vars(state)) if state is not None else None
    # The last pass of this thread (sizes, token map) is kept per thread, outside vars(state).
    saved_pass = state.save_pass() if state is not None else None
    counter = FlopCounterMode(display=False)
    probe = _BlockProbe(counter, list(model.blocks))
    try:
        model.eval()
        for module, _ in fused:
            module.fused_attn = False
        if state is not None:
            state.backend = "reference"
        with torch.no_grad(), counter:
            model(image)
        blocks = probe.blocks()
    finally:
        probe.remove()
        for module, flag in fused:
            module.fused_attn = flag
        for module, training in modes:
            module.training = training
        if state is not None:
            vars(state).clear()
            vars(state).update(saved_state)
            state.restore_pass(saved_pass)
    return FlopReport((height, width), counter.get_total_flops() / _COUNTER_FLOPS_PER_GFLOP, blocks)


def count_gflops(model: nn.Module, img_size: Optional[ImageSize] = None) -> float:
    """GFLOPs of one image through ``model``, one multiply-add counted as one FLOP
    (``flop_report(model, img_size).gflops``). DeiT-S at 224 without merging: 4.599."""
    return flop_report(model, img_size).gflops


__all__ = ["count_gflops", "flop_report", "FlopReport", "BlockFlops"]
