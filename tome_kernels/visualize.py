"""Pictures of which patches a ToMe model merged: every group of patches that ended in the
same final token is painted in its mean colour and outlined.

    tome_kernels.patch.timm(model, r=16, trace_source=True)
    model(batch)
    token_map = tome_kernels.patch.get_state(model).token_map       # (B, N_input)
    save_merge_png(images[0], token_map, 16, "merge.png", index=0)

``image`` is the picture as seen by a person (before the model's mean/std normalisation),
at the resolution the model saw. Pillow is needed only to read PIL images and to write PNGs.
"""

import os
import sys
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .checks import check_int_pair, is_int

PatchSize = Union[int, Sequence[int]]
Colour = Optional[Sequence[int]]


def _pil_image_module():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("tome_kernels.visualize needs Pillow to read PIL images and write PNGs: "
                          "pip install pillow") from error
    return Image


def _pixels(image) -> Tensor:
    """(3, H, W) float64 values in [0, 255] on the CPU."""
    if not isinstance(image, Tensor):
        # A PIL image exists only if PIL.Image was imported: no need to import it here.
        pil = sys.modules.get("PIL.Image")
        if pil is None or not isinstance(image, pil.Image):
            raise TypeError(f"image must be a (3, H, W) tensor or a PIL image, got {type(image).__name__}")
        rgb = image.convert("RGB")
        width, height = rgb.size
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.view(height, width, 3).permute(2, 0, 1).to(torch.float64)
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be a (3, H, W) or (1, H, W) tensor, got shape {tuple(image.shape)}")
    image = image.detach().cpu().expand(3, -1, -1)
    if image.dtype == torch.uint8:
        return image.to(torch.float64)
    if not image.is_floating_point():
        raise TypeError(f"image must be uint8 (0-255) or floating point (0-1), got {image.dtype}")
    image = image.to(torch.float64)
    if image.numel() and not (image.isfinite().all() and image.min() >= 0 and image.max() <= 1):
        raise ValueError("a floating-point image must hold values in [0, 1] (undo the model's normalisation first)")
    return image * 255


def _one_token_map(token_map, index: Optional[int]) -> Tensor:
    if not isinstance(token_map, Tensor):
        raise TypeError(f"token_map must be an int64 tensor, got {type(token_map).__name__} (a patched model's "
                        "get_state(model).token_map is None until a forward pass with trace_source=True merged tokens)")
    if token_map.dtype == torch.bool or token_map.is_floating_point() or token_map.is_complex():
        raise TypeError(f"token_map must hold integers, got {token_map.dtype}")
    if token_map.dim() == 2:
        if index is None:
            if token_map.shape[0] != 1:
                raise ValueError(f"token_map holds {token_map.shape[0]} images: say which with index=")
            index = 0
        if not is_int(index):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -token_map.shape[0] <= index < token_map.shape[0]:
            raise ValueError(f"index={index} is out of range for a token_map of {token_map.shape[0]} images")
        token_map = token_map[index]
    elif token_map.dim() != 1:
        raise ValueError(f"token_map must be (N,) or (B, N), got shape {tuple(token_map.shape)}")
    elif index not in (None, 0):
        raise ValueError(f"index={index} given for a token_map of one image")
    token_map = token_map.detach().cpu().to(torch.int64)
    if token_map.numel() and token_map.min() < 0:
        raise ValueError("token_map must hold non-negative token rows")
    return token_map


def _outline_colour(outline: Colour) -> Optional[Tensor]:
    if outline is None:
        return None
    if not isinstance(outline, (tuple, list)) or len(outline) != 3 or \
            any(not is_int(c) or not 0 <= c <= 255 for c in outline):
        raise ValueError(f"outline must be None or an (r, g, b) triple of ints in 0-255, got {outline!r}")
    return torch.tensor(outline, dtype=torch.uint8)


def render_merge(image, token_map: Tensor, patch_size: PatchSize, *, index: Optional[int] = None,
                 num_prefix_tokens: int = 1, outline: Colour = (255, 255, 255)) -> Tensor:
    """Paint each group of merged patches in its mean colour and outline the groups.

    Args:
        image: a (3, H, W) (or (1, H, W)) tensor, float in [0, 1] or uint8, or a PIL image.
        token_map: (N_input,) or (B, N_input) integers: the final token of every input token,
            prefix tokens first, then the patches in raster order
            (``tome_kernels.patch.get_state(model).token_map``).
        patch_size: the model's patch size, an int or (height, width).
        index: which image of a (B, N_input) token map; may be left out when B = 1.
        num_prefix_tokens: tokens ahead of the patches (class, distillation): dropped before
            rendering, as they are not patches. A patch is grouped only with the patches that
            share its final token.
        outline: the (r, g, b) of the group outlines, or None for none.

    Returns:
        (H, W, 3) uint8: each pixel the mean colour (rounded) over all the pixels of its
        group; with ``outline``, a pixel is painted in it when the pixel to its right, below
        it, or diagonally below-right belongs to another group, which draws a one-pixel line
        along every boundary between groups, on the last row or column of a patch, and
        nothing inside a group.
    """
    pixels = _pixels(image)
    token_map = _one_token_map(token_map, index)
    patch_h, patch_w = check_int_pair("patch_size", patch_size)
    colour = _outline_colour(outline)
    if not is_int(num_prefix_tokens) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
    _, height, width = pixels.shape
    if height == 0 or width == 0 or height % patch_h or width % patch_w:
        raise ValueError(f"image of {height}x{width} pixels is not a non-empty grid of {patch_h}x{patch_w} patches")
    grid_h, grid_w = height // patch_h, width // patch_w
    expected = grid_h * grid_w + num_prefix_tokens
    if token_map.numel() != expected:
        raise ValueError(f"token_map has {token_map.numel()} tokens; a {height}x{width} image of {patch_h}x{patch_w} "
                         f"patches with {num_prefix_tokens} prefix token(s) has {expected}")

    _, group = torch.unique(token_map[num_prefix_tokens:], return_inverse=True)
    num_groups = int(group.max()) + 1
    patch_sums = pixels.view(3, grid_h, patch_h, grid_w, patch_w).sum(dim=(2, 4)).reshape(3, -1)
    group_sums = torch.zeros(3, num_groups, dtype=torch.float64).index_add_(1, group, patch_sums)
    group_pixels = torch.bincount(group, minlength=num_groups).to(torch.float64) * (patch_h * patch_w)
    mean = (group_sums / group_pixels).round().clamp(0, 255).to(torch.uint8)

    labels = group.view(grid_h, grid_w).repeat_interleave(patch_h, 0).repeat_interleave(patch_w, 1)
    out = mean[:, labels].permute(1, 2, 0).contiguous()
    if colour is not None:
        edge = torch.zeros(height, width, dtype=torch.bool)
        edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
        edge[:-1, :-1] |= labels[:-1, :-1] != labels[1:, 1:]
        out[edge] = colour
    return out


def save_merge_png(image, token_map: Tensor, patch_size: PatchSize, path: Union[str, os.PathLike], *,
                   index: Optional[int] = None, num_prefix_tokens: int = 1,
                   outline: Colour = (255, 255, 255)) -> Tensor:
    """``render_merge`` (same arguments) written to ``path`` as an RGB PNG; returns the
    rendered (H, W, 3) uint8 tensor."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    Image = _pil_image_module()
    out = render_merge(image, token_map, patch_size, index=index, num_prefix_tokens=num_prefix_tokens,
                       outline=outline)
    height, width, _ = out.shape
    Image.frombytes("RGB", (width, height), bytes(out.flatten().tolist())).save(path, format="PNG")
    return out


__all__ = ["render_merge", "save_merge_png"]
