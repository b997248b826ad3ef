"""The named benchmark shapes and the fewest bytes a merge step must move for each."""

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch

# What a shape's step runs: ToMe's bipartite merge, or one of the other methods
# (tome_kernels.methods) at the same sizes; see providers.py.
METHODS = ("tome", "pitome", "kth", "random", "grid")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int
    channels: int
    r: int  # tokens removed; for "kth" the count that k = 2 removes, for "grid" at most
    heads: Optional[int]  # keys (B, H, N, Dh) when set, else a metric (B, N, D)
    feature_dim: int  # Dh for keys, D for a metric
    class_token: bool
    method: str = "tome"

    @property
    def metric_shape(self):
        if self.heads is None:
            return (self.batch, self.tokens, self.feature_dim)
        return (self.batch, self.heads, self.tokens, self.feature_dim)

    @property
    def metric_kind(self) -> str:
        return "metric" if self.heads is None else "keys"

    @property
    def passes(self) -> Tuple[str, ...]:
        """The other methods are timed forward only: their backward is the merge's backward,
        the same kernels the ToMe rows time."""
        return ("fwd", "fwd+bwd") if self.method == "tome" else ("fwd",)

    @property
    def grid_size(self) -> Tuple[int, int]:
        """The tokens as a square grid (the "grid" method's latent: 4096 = 64 x 64)."""
        side = int(round(self.tokens ** 0.5))
        if side * side != self.tokens:
            raise ValueError(f"shape {self.name}: {self.tokens} tokens are no square grid")
        return side, side

    def min_bytes(self, dtype: torch.dtype, backward: bool) -> int:
        """Each input read once and each output written once (indices not counted).

        Forward reads x, the metric and size (float32) and writes x_merged and
        size_merged. The backward of the weighted merge reads the two output gradients, x
        and size (the size gradient depends on x) and writes the gradients of x and size.
        The "grid" step takes no size: it reads x and the metric and writes the merged rows
        and their unmerge (B, N, C).
        """
        e = torch.empty((), dtype=dtype).element_size()
        b, n, c, m = self.batch, self.tokens, self.channels, self.tokens - self.r
        metric = b * n * self.feature_dim * (self.heads or 1) * e
        if self.method == "grid":
            return (b * n * c * e + metric) + (b * m * c * e + b * n * c * e)
        forward = (b * n * c * e + metric + b * n * 4) + (b * m * c * e + b * m * 4)
        if not backward:
            return forward
        return forward + (b * m * c * e + b * m * 4 + b * n * c * e + b * n * 4) + (b * n * c * e + b * n * 4)


# The full-size shapes, for a GPU. ViTs take their attention keys as the metric. The other
# methods run at the ViT-B/16 and diffusion sizes: PiToMe and random bipartite with the ToMe
# row's r, kth with k = 2 (half the tokens go), the diffusion grid (tomesd: 2x2 windows,
# half the tokens merged, then unmerged) on the 64 x 64 latent only, as it needs a grid.
GPU_SHAPES: List[Shape] = [
    Shape("vit_b16_224", 256, 197, 768, 16, 12, 64, True),
    Shape("vit_b16_224_b1", 1, 197, 768, 16, 12, 64, True),
    Shape("vit_l16_512", 64, 1025, 1024, 40, 16, 64, True),
    Shape("vit_h14_518", 32, 1370, 1280, 40, 16, 80, True),
    Shape("diffusion", 2, 4096, 320, 2048, None, 320, False),
    Shape("vit_b16_224_pitome", 256, 197, 768, 16, 12, 64, True, "pitome"),
    Shape("vit_b16_224_kth", 256, 197, 768, 98, 12, 64, True, "kth"),
    Shape("vit_b16_224_random", 256, 197, 768, 16, 12, 64, True, "random"),
    Shape("diffusion_pitome", 2, 4096, 320, 2048, None, 320, False, "pitome"),
    Shape("diffusion_grid", 2, 4096, 320, 2048, None, 320, False, "grid"),
    Shape("diffusion_kth", 2, 4096, 320, 2048, None, 320, False, "kth"),
    Shape("diffusion_random", 2, 4096, 320, 2048, None, 320, False, "random"),
]

# The same rows with a batch a 2-core CPU gets through in seconds; ViT-B/16 at B = 32 is the
# CPU target's shape (the "cpu" provider at least 5x the reference). kth and random at the
# diffusion size are left to the GPU: on a CPU they would add some 10 s to the main job for
# what the diffusion grid row (the same assignment and merge over 4096 tokens) shows.
_CPU_BATCH = {
    "vit_b16_224": 32, "vit_b16_224_b1": 1, "vit_l16_512": 2, "vit_h14_518": 1, "diffusion": 1,
    "vit_b16_224_pitome": 32, "vit_b16_224_kth": 32, "vit_b16_224_random": 32,
    "diffusion_pitome": 1, "diffusion_grid": 1,
}
CPU_SHAPES: List[Shape] = [replace(s, batch=_CPU_BATCH[s.name]) for s in GPU_SHAPES if s.name in _CPU_BATCH]


def default_shapes(device: torch.device) -> List[Shape]:
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
