"""How each merging method chooses its sources and destinations: (B or 1, N) int8 roles
(``partition.KEEP`` / ``SOURCE`` / ``DEST``) and how many sources merge.

Every function here is plain, device-agnostic PyTorch; the heavy part of each method (the
energy, the assignment) is computed by a backend. ``protected`` is the number of leading
tokens (class token, distillation token) that every method keeps as they are.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .partition import DEST, KEEP, SOURCE


def _roles(batch: int, tokens: int, device) -> Tensor:
    return torch.full((batch, tokens), KEEP, dtype=torch.int8, device=device)


# How PiToMe splits the tokens it ranks by energy into sources and destinations.
SPLITS = ("alternate", "halves", "bipartite")


def pitome(energy: Tensor, k: int, protected: int, real: Optional[Tensor] = None, split: str = "alternate") -> Tensor:
    """PiToMe's roles (B, N) int8 from the energies (B, N - protected) of the unprotected
    tokens (the protected ones are kept), ranked by energy, descending, ties to the lower
    index. ``split``:

    - "alternate" (the paper, the authors' image code): the 2k tokens of highest energy are
      mergeable, ranks 0, 2, 4, ... sources and 1, 3, 5, ... destinations;
    - "halves" (the authors' text code): ranks 0 .. k-1 are sources, k .. 2k-1 destinations;
    - "bipartite" (the authors' ``pitome_bsm``): every unprotected token, even ranks sources
      and odd ranks destinations; the partition then merges the k sources most similar to a
      destination, as ToMe's matching does.

    The other tokens are kept. ``real`` (B, N) bool marks a padded batch's real tokens; its
    padding ranks after every real token. With "alternate" and "halves" each row then
    takes the pairs it would take alone, min(k, its real unprotected tokens // 2), keeps its
    other real tokens, and makes its padding sources, which merge after every real source
    since they score no similarity; a row without a real pair makes its top-ranked token the
    destination its padding merges into. Every row still has k sources. With "bipartite",
    padding ranked last alternates like the rest; with NaN metric rows it scores no
    similarity, so it merges after every real source.
    """
    batch, candidates = energy.shape
    tokens = protected + candidates
    position = torch.arange(candidates, device=energy.device)
    order = torch.sort(energy, dim=1, descending=True, stable=True).indices
    real = None if real is None else real[:, protected:]
    if real is not None:
        # Padding after every real token whatever its energy (a second stable sort keeps the
        # energy order within each): a real row of NaN, or padding that is not NaN, must not
        # take a rank among the real pairs, which would leave a row without a destination.
        order = order.gather(1, torch.sort((~real).gather(1, order).to(torch.uint8), dim=1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, position.expand_as(order))
    if split == "bipartite":
        role = torch.where(rank % 2 == 0, SOURCE, DEST)
    else:
        pairs = torch.full_like(rank[:, :1], k)
        if real is not None:
            pairs = torch.clamp(real.sum(dim=1, keepdim=True) // 2, max=k)
        if split == "halves":
            role = torch.where(rank < pairs, SOURCE, torch.where(rank < 2 * pairs, DEST, KEEP))
        else:
            role = torch.where(rank < 2 * pairs, torch.where(rank % 2 == 0, SOURCE, DEST), KEEP)
        if real is not None:
            role = torch.where(~real, SOURCE, role)
            role = torch.where((pairs == 0) & (rank == 0), DEST, role)
    roles = _roles(batch, tokens, energy.device)
    roles[:, protected:] = role.to(torch.int8)
    return roles


def kth(tokens: int, k: int, protected: int, device) -> Tuple[Tensor, int]:
    """kth bipartite: after the protected tokens, every k-th token (positions k-1, 2k-1, ...
    counted from the first unprotected one) is a destination and every other one a source,
    all merged. Returns (roles (1, N), sources)."""
    roles = _roles(1, tokens, device)
    position = torch.arange(tokens - protected, device=device)
    if k <= 1 or tokens - protected < k:
        return roles, 0  # every token would be a destination, or none would
    roles[0, protected:] = torch.where(position % k == k - 1, DEST, SOURCE).to(torch.int8)
    return roles, (tokens - protected) - (tokens - protected) // k


def random(batch: int, tokens: int, r: int, protected: int, generator: Optional[torch.Generator], device) -> Tensor:
    """Random bipartite: per batch row, r unprotected tokens drawn at random are sources and
    all other unprotected tokens destinations."""
    gen_device = generator.device if generator is not None else device
    # float32 draws whatever torch.get_default_dtype() is: a float64 default would draw
    # other numbers from the same generator state, so another plan for the same seed.
    draws = torch.rand(batch, tokens - protected, generator=generator, device=gen_device,
                       dtype=torch.float32).to(device)
    chosen = draws.argsort(dim=1)[:, :r] + protected
    roles = _roles(batch, tokens, device)
    roles[:, protected:] = DEST
    # A tensor source, not a scalar: see partition.select (inductor and a dynamic r).
    return roles.scatter(1, chosen, torch.full_like(chosen, SOURCE, dtype=roles.dtype))


def grid(
    height: int, width: int, stride: Tuple[int, int], random_dst: bool,
    generator: Optional[torch.Generator], device,
) -> Tuple[Tensor, int]:
    """The 2-D partition of token merging for diffusion (tomesd): tokens in row-major order
    on a height x width grid; one destination per stride (sy, sx) window, at a random offset
    drawn from ``generator`` (the same for the whole batch) or at the window's top-left;
    every other token, the rows and columns left over past the last whole window included,
    is a source. Returns (roles (1, N), sources)."""
    sy, sx = stride
    rows, cols = height // sy, width // sx
    roles = _roles(1, height * width, device)
    if rows == 0 or cols == 0:
        return roles, 0
    roles[:] = SOURCE
    if random_dst:
        gen_device = generator.device if generator is not None else device
        offset = torch.randint(sy * sx, (rows, cols), generator=generator, device=gen_device).to(device)
    else:
        offset = torch.zeros(rows, cols, dtype=torch.long, device=device)
    row = torch.arange(rows, device=device)[:, None] * sy + offset // sx
    col = torch.arange(cols, device=device)[None, :] * sx + offset % sx
    roles[0, (row * width + col).flatten()] = DEST
    return roles, height * width - rows * cols


def windows(height: int, width: int, window: Tuple[int, int], protected: int, device) -> Tuple[Tensor, Tensor, int]:
    """DSM's local stage: the tokens after the protected ones form a height x width grid cut
    into whole (wy, wx) windows; each window's top-left token is its destination and its
    other tokens are sources that may only merge into it. Tokens outside whole windows and
    protected tokens are kept. Returns (roles (1, N), window ids (1, N) int32, sources)."""
    wy, wx = window
    rows, cols = height // wy, width // wx
    tokens = protected + height * width
    roles = _roles(1, tokens, device)
    ids = torch.full((1, tokens), -1, dtype=torch.int32, device=device)
    if rows == 0 or cols == 0:
        return roles, ids, 0
    y = torch.arange(height, device=device)[:, None]
    x = torch.arange(width, device=device)[None, :]
    inside = (y < rows * wy) & (x < cols * wx)
    window_id = torch.where(inside, (y // wy) * cols + x // wx, -1)
    top_left = inside & (y % wy == 0) & (x % wx == 0)
    grid_roles = torch.where(top_left, DEST, torch.where(inside, SOURCE, KEEP))
    roles[0, protected:] = grid_roles.flatten().to(torch.int8)
    ids[0, protected:] = window_id.flatten().to(torch.int32)
    return roles, ids, rows * cols * (wy * wx - 1)
