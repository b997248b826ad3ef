"""Merge pictures: group mean colours, outlines on group boundaries only, a readable PNG."""

import sys

import pytest
import torch

import tome_kernels.patch as tome_patch
from tome_kernels.visualize import render_merge, save_merge_png

Image = pytest.importorskip("PIL.Image")

WHITE = (255, 255, 255)


def halves_image():
    """8x8 pixels, 4x4 patches of 2x2. Left half: black on top, (100, 200, 40) below, mean
    (50, 100, 20). Right half: (10, 20, 30) but one pixel of red 42, mean (11, 20, 30)."""
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[:, 4:, :4] = torch.tensor([100, 200, 40], dtype=torch.uint8)[:, None, None]
    image[:, :, 4:] = torch.tensor([10, 20, 30], dtype=torch.uint8)[:, None, None]
    image[0, 0, 5] = 42
    return image


def halves_map():
    """Class token (row 0), then patch columns 0-1 in row 1 and columns 2-3 in row 2."""
    patches = torch.tensor([1, 1, 2, 2]).repeat(4)
    return torch.cat([torch.tensor([0]), patches])


LEFT, RIGHT = [50, 100, 20], [11, 20, 30]


def test_group_mean_colours_without_outline():
    out = render_merge(halves_image(), halves_map(), 2, outline=None)
    assert out.shape == (8, 8, 3) and out.dtype == torch.uint8
    assert (out[:, :4] == torch.tensor(LEFT, dtype=torch.uint8)).all()
    assert (out[:, 4:] == torch.tensor(RIGHT, dtype=torch.uint8)).all()


def test_outline_on_the_boundary_only():
    out = render_merge(halves_image(), halves_map(), 2, outline=WHITE)
    # The boundary runs between pixel columns 3 and 4: the line is column 3, top to bottom.
    assert (out[:, 3] == 255).all()
    assert (out[:, :3] == torch.tensor(LEFT, dtype=torch.uint8)).all()
    assert (out[:, 4:] == torch.tensor(RIGHT, dtype=torch.uint8)).all()


def test_png_written_and_read_back(tmp_path):
    path = tmp_path / "merge.png"
    out = save_merge_png(halves_image(), halves_map(), 2, path)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB" and png.size == (8, 8)
        pixels = [list(png.getpixel((x, y))) for y in range(8) for x in range(8)]
    assert pixels == out.view(-1, 3).tolist()
    assert pixels[0] == LEFT and pixels[3] == [255, 255, 255] and pixels[7] == RIGHT


def test_irregular_groups_against_a_pixel_by_pixel_rule():
    torch.manual_seed(1)
    grid_h, grid_w, patch_h, patch_w = 5, 6, 3, 2
    image = torch.rand(3, grid_h * patch_h, grid_w * patch_w)
    groups = torch.randint(0, 7, (grid_h * grid_w,)) + 2  # two prefix tokens hold rows 0 and 1
    token_map = torch.cat([torch.tensor([0, 1]), groups])
    out = render_merge(image, token_map, (patch_h, patch_w), num_prefix_tokens=2, outline=(1, 2, 3))
    plain = render_merge(image, token_map, (patch_h, patch_w), num_prefix_tokens=2, outline=None)

    labels = groups.view(grid_h, grid_w).repeat_interleave(patch_h, 0).repeat_interleave(patch_w, 1)
    height, width = labels.shape
    for g in groups.unique():
        member = labels == g
        mean = (image[:, member].to(torch.float64) * 255).mean(dim=1).round().to(torch.uint8)
        assert (plain[member] == mean).all()
    for y in range(height):
        for x in range(width):
            neighbours = [(y, x + 1), (y + 1, x), (y + 1, x + 1)]
            edge = any(v < height and u < width and labels[v, u] != labels[y, x] for v, u in neighbours)
            if edge:
                assert out[y, x].tolist() == [1, 2, 3]
                # Lines lie on a patch's last row or column, never in its inside.
                assert y % patch_h == patch_h - 1 or x % patch_w == patch_w - 1
            else:
                assert out[y, x].tolist() == plain[y, x].tolist()


def test_prefix_tokens_are_not_patches():
    base = render_merge(halves_image(), halves_map(), 2)
    # What the prefix token maps to does not matter, even a row the patches use.
    token_map = halves_map()
    token_map[0] = 2
    assert torch.equal(render_merge(halves_image(), token_map, 2), base)
    # A class and a distillation token ahead of the same patches.
    two_prefix = torch.cat([torch.tensor([0]), token_map])
    assert torch.equal(render_merge(halves_image(), two_prefix, 2, num_prefix_tokens=2), base)
    assert torch.equal(render_merge(halves_image(), halves_map()[1:], 2, num_prefix_tokens=0), base)


def test_float_and_pil_images_and_batched_maps():
    base = render_merge(halves_image(), halves_map(), 2)
    assert torch.equal(render_merge(halves_image().double() / 255, halves_map(), 2), base)
    assert torch.equal(render_merge(halves_image().float() / 255, halves_map(), 2), base)
    pil = Image.frombytes("RGB", (8, 8), bytes(halves_image().permute(1, 2, 0).flatten().tolist()))
    assert torch.equal(render_merge(pil, halves_map(), 2), base)
    batch = torch.stack([torch.zeros(17, dtype=torch.long), halves_map()])
    assert torch.equal(render_merge(halves_image(), batch, 2, index=1), base)
    assert torch.equal(render_merge(halves_image(), batch, 2, index=-1), base)
    assert torch.equal(render_merge(halves_image(), halves_map()[None], 2), base)
    # One group: the whole picture its mean, and no line at all.
    single = render_merge(halves_image(), torch.zeros(17, dtype=torch.long), 2)
    assert (single == single[0, 0]).all()


def test_patched_vit_end_to_end(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()
    tome_patch.timm(model, 8, trace_source=True)
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        model(images)
    token_map = tome_patch.get_state(model).token_map
    assert token_map.shape == (2, 197)
    path = tmp_path / "vit.png"
    out = save_merge_png(images[0], token_map, model.patch_embed.patch_size, path, index=0)
    with Image.open(path) as png:
        assert png.size == (224, 224) and png.mode == "RGB"
    # 197 tokens, 16 merged away, the class token apart: 180 groups of patches, each one colour.
    groups = token_map[0, 1:]
    assert groups.unique().numel() == 180
    plain = render_merge(images[0], token_map, 16, index=0, outline=None)
    cells = plain.view(14, 16, 14, 16, 3).permute(0, 2, 1, 3, 4).reshape(196, 256, 3)
    assert (cells == cells[:, :1]).all()
    for g in groups.unique()[:10]:
        members = cells[groups == g, 0]
        assert (members == members[0]).all()
    assert out.shape == (224, 224, 3)


def test_bad_input(tmp_path):
    image, token_map = halves_image(), halves_map()
    with pytest.raises(ValueError, match="token_map has 16 tokens"):
        render_merge(image, token_map[1:], 2)
    with pytest.raises(ValueError, match="token_map has 17 tokens"):
        render_merge(image, token_map, 2, num_prefix_tokens=2)
    with pytest.raises(ValueError, match="grid of 3x3 patches"):
        render_merge(image, token_map, 3)
    with pytest.raises(TypeError, match="patch_size"):
        render_merge(image, token_map, 2.0)
    with pytest.raises(ValueError, match="patch_size"):
        render_merge(image, token_map, (0, 2))
    with pytest.raises(TypeError, match="token_map"):
        render_merge(image, None, 2)
    with pytest.raises(TypeError, match="token_map"):
        render_merge(image, token_map.float(), 2)
    with pytest.raises(ValueError, match="token_map"):
        render_merge(image, token_map.view(1, 1, 17), 2)
    with pytest.raises(ValueError, match="non-negative"):
        render_merge(image, token_map - 5, 2)
    with pytest.raises(ValueError, match="index="):
        render_merge(image, token_map.repeat(2, 1), 2)
    with pytest.raises(ValueError, match="out of range"):
        render_merge(image, token_map.repeat(2, 1), 2, index=2)
    with pytest.raises(ValueError, match="one image"):
        render_merge(image, token_map, 2, index=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        render_merge(image.float(), token_map, 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        render_merge(torch.full((3, 8, 8), float("nan")), token_map, 2)
    with pytest.raises(TypeError, match="uint8"):
        render_merge(image.long(), token_map, 2)
    with pytest.raises(ValueError, match="image must be"):
        render_merge(image[None], token_map, 2)
    with pytest.raises(TypeError, match="image must be"):
        render_merge([[0]], token_map, 2)
    with pytest.raises(ValueError, match="outline"):
        render_merge(image, token_map, 2, outline=(256, 0, 0))
    with pytest.raises(ValueError, match="outline"):
        render_merge(image, token_map, 2, outline="white")
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        render_merge(image, token_map, 2, num_prefix_tokens=-1)
    with pytest.raises(TypeError, match="path"):
        save_merge_png(image, token_map, 2, 3)


def test_missing_pillow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        save_merge_png(halves_image(), halves_map(), 2, tmp_path / "x.png")
    # Rendering a tensor needs no Pillow.
    render_merge(halves_image(), halves_map(), 2)
