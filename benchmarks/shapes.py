"""The named benchmark shapes and the fewest bytes a merge step must move for each."""

from dataclasses import dataclass, replace
from typing import List, Optional

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int
    channels: int
    r: int
    heads: Optional[int]  # keys (B, H, N, Dh) when set, else a metric (B, N, D)
    feature_dim: int  # Dh for keys, D for a metric
    class_token: bool

    @property
    def metric_shape(self):
        if self.heads is None:
            return (self.batch, self.tokens, self.feature_dim)
        return (self.batch, self.heads, self.tokens, self.feature_dim)

    @property
    def metric_kind(self) -> str:
        return "metric" if self.heads is None else "keys"

    def min_bytes(self, dtype: torch.dtype, backward: bool) -> int:
        """Each input read once and each output written once (indices not counted).

        Forward reads x, the metric and size (float32) and writes x_merged and
        size_merged. The backward of the weighted merge reads the two output gradients, x
        and size (the size gradient depends on x) and writes the gradients of x and size.
        """
        e = torch.empty((), dtype=dtype).element_size()
        b, n, c, m = self.batch, self.tokens, self.channels, self.tokens - self.r
        metric = b * n * self.feature_dim * (self.heads or 1) * e
        forward = (b * n * c * e + metric + b * n * 4) + (b * m * c * e + b * m * 4)
        if not backward:
            return forward
        return forward + (b * m * c * e + b * m * 4 + b * n * c * e + b * n * 4) + (b * n * c * e + b * n * 4)


# The full-size shapes, for a GPU. ViTs take their attention keys as the metric.
GPU_SHAPES: List[Shape] = [
    Shape("vit_b16_224", 256, 197, 768, 16, 12, 64, True),
    Shape("vit_b16_224_b1", 1, 197, 768, 16, 12, 64, True),
    Shape("vit_l16_512", 64, 1025, 1024, 40, 16, 64, True),
    Shape("vit_h14_518", 32, 1370, 1280, 40, 16, 80, True),
    Shape("diffusion", 2, 4096, 320, 2048, None, 320, False),
]

# The same rows with a batch a 2-core CPU gets through in seconds; ViT-B/16 at B = 32 is the
# CPU target's shape (the "cpu" provider at least 5x the reference).
_CPU_BATCH = {"vit_b16_224": 32, "vit_b16_224_b1": 1, "vit_l16_512": 2, "vit_h14_518": 1, "diffusion": 1}
CPU_SHAPES: List[Shape] = [replace(s, batch=_CPU_BATCH[s.name]) for s in GPU_SHAPES]


def default_shapes(device: torch.device) -> List[Shape]:
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
