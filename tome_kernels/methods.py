"""The public functions of the methods beyond ToMe's bipartite matching.

Each makes a ``MergePlan`` (apply it with ``merge_wavg``, ``merge``, ``unmerge``), in three
steps: roles (``roles.py``), each source's best destination (the backend's fused
``assign`` kernel), and the plan's layout (``partition.py``): kept tokens in token order,
sources in their destination's row. Plans are applied by the same merge kernels as ToMe's.

- ``pitome_match`` / ``pitome_merge``: PiToMe's energy-protected merging.
- ``kth_bipartite_match``, ``random_bipartite_match``: the small variants.
- ``grid_match``: the 2-D partition of token merging for diffusion models (tomesd).
- ``window_match``: DSM's local stage, merging within windows of the patch grid.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import checks
from .backends import select_backend
from .backends.ambient import fixed_numerics
from .backends.base import Backend
from .plan import MergePlan
from .reference import energy, partition, roles

# PiToMe's margin at the first block (Tran et al. 2024); the patches lower it with depth.
PITOME_MARGIN = 0.9


def _check_generator(generator) -> Optional[torch.Generator]:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {checks._type_name(generator)}")
    return generator


def _protected(metric, class_token, distill_token) -> int:
    checks.check_metric(metric)
    return int(checks.check_flag("class_token", class_token)) + int(checks.check_flag("distill_token", distill_token))


def _plan(metric: Tensor, role: Tensor, r: int, impl: Backend, window: Optional[Tensor] = None) -> MergePlan:
    return MergePlan(impl.partition(metric, role, r, window), impl)


def _identity(metric: Tensor, impl: Backend) -> MergePlan:
    return MergePlan(partition.identity(metric.shape[0], metric.shape[-2], metric.device), impl)


def _clamped_r(r, tokens: int, protected: int) -> int:
    """r clamped as in ToMe's contract: at most (N - protected) // 2, so that 2r unprotected
    tokens exist, and never below 0 (N = 0 with a class token, or N = 1 with a class and a
    distillation token, has fewer tokens than protected ones: nothing merges)."""
    return max(min(checks.check_r(r), (tokens - protected) // 2), 0)


def check_pitome_margin(margin, energy_form: str) -> float:
    """PiToMe's margin is a cosine similarity, so within [-1, 1] (beyond it every similarity
    falls on one side and the margin no longer separates anything), and below 1 for the
    Gaussian form, whose width is 1 - margin."""
    gaussian = energy_form == "gaussian"
    meaning = "a cosine similarity; the Gaussian energy's width is 1 - margin" if gaussian else "a cosine similarity"
    return checks.check_real("margin", margin, -1.0, 1.0, high_open=gaussian, meaning=meaning)


def check_pitome_alpha(alpha, energy_form: str) -> Optional[float]:
    """alpha scales the ELU forms' penalty below the margin: positive (0 would flatten it, a
    negative one reverse it), 1 when None. The Gaussian form has none: giving one is an
    error rather than ignored (None is returned)."""
    if energy_form == "gaussian":
        if alpha is not None:
            raise ValueError(f"alpha applies to energy_form 'elu' and 'paper' only, not 'gaussian'; got {alpha!r}")
        return None
    if alpha is None:
        return 1.0
    return checks.check_real("alpha", alpha, 0.0, low_open=True, meaning="the scale of the energy below the margin")


def check_pitome_options(margin, alpha, energy_form, split) -> Tuple[float, Optional[float], str, str]:
    """PiToMe's options, checked: ``energy_form`` and ``split`` name a form of
    ``reference.energy.FORMS`` and a split of ``reference.roles.SPLITS``; the margin and
    alpha as ``check_pitome_margin`` and ``check_pitome_alpha`` say."""
    energy_form = checks.check_choice("energy_form", energy_form, energy.FORMS)
    split = checks.check_choice("split", split, roles.SPLITS)
    return check_pitome_margin(margin, energy_form), check_pitome_alpha(alpha, energy_form), energy_form, split


@fixed_numerics
def pitome_match(
    metric: Tensor,
    r: int,
    *,
    margin: float = PITOME_MARGIN,
    alpha: Optional[float] = None,
    energy_form: str = "elu",
    split: str = "alternate",
    class_token: bool = False,
    distill_token: bool = False,
    real: Optional[Tensor] = None,
    backend: str = "auto",
) -> MergePlan:
    """PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token
    Merging", NeurIPS 2024): remove ``r`` tokens, protecting informative ones.

    The protected tokens (class, distillation) are kept and left out of everything below.
    Every other token's energy, ``mean_j f(cos(k_i, k_j))`` over those tokens
    (``tome_kernels.reference.energy``), is computed by a fused kernel; the tokens ranked by
    energy are split into sources and destinations (``split``); every source merges into its
    most similar destination. The defaults are what the authors' image code computes; the
    paper's equation (4) is ``energy_form="paper"``, their text code ``energy_form="gaussian",
    split="halves"`` (docs/methods.md, "PiToMe").

    Args:
        metric: (B, N, D) features or keys (B, H, N, Dh), any float dtype; energies and
            similarities are float64 for float64, float32 otherwise.
        r: tokens to remove, clamped to (N - protected tokens) // 2 and to at least 0.
        margin: m in f, in [-1, 1] (below 1 for "gaussian"); 0.9, the paper's first-block
            value, by default. The patches set each block's (their presets).
        alpha: the scale of f below the margin for "elu" and "paper", > 0; None is 1.
            "gaussian" has none: giving one is a ValueError.
        energy_form: "elu" (ELU(x - m), the authors' image code), "paper" (x above the
            margin, equation (4)) or "gaussian" (exp(-((1 - x) / (1 - m))^2 / 2), the
            authors' text code).
        split: "alternate" (the 2r highest-energy tokens, alternately source and
            destination), "halves" (the r highest sources, the next r destinations) or
            "bipartite" (all tokens alternately, then ToMe's r best edges: the authors'
            ``pitome_bsm``). See ``reference.roles.pitome``.
        class_token, distill_token: tokens 0 and 1 are protected.
        real: for a padded batch whose padding has NaN metric rows, (B, N) bool, the real
            tokens: each row takes the roles it would take alone (``roles.pitome``).
        backend: as in ``bipartite_merge``.

    Returns:
        A ``MergePlan`` of N - r output rows (kept tokens in token order).

    Raises:
        TypeError, ValueError: a bad metric, r, option or ``real``, naming the argument.
    """
    protected = _protected(metric, class_token, distill_token)
    r = _clamped_r(r, metric.shape[-2], protected)
    margin, alpha, energy_form, split = check_pitome_options(margin, alpha, energy_form, split)
    if real is not None:
        expected = (metric.shape[0], metric.shape[-2])
        if not isinstance(real, Tensor) or real.dtype != torch.bool:
            got = getattr(real, "dtype", type(real).__name__)
            raise TypeError(f"real must be None or a (B, N) bool tensor, got {got}")
        if tuple(real.shape) != expected or real.device != metric.device:
            raise ValueError(f"real must have shape (B, N) = {expected} on {metric.device}, "
                             f"got {tuple(real.shape)} on {real.device}")
    impl = select_backend(backend, (metric,))
    if r == 0:
        return _identity(metric, impl)
    # The protected tokens leave the energy: a view of the others, which every kernel reads
    # through its strides.
    scores = impl.energy(metric[..., protected:, :], margin, 1.0 if alpha is None else alpha, energy_form)
    return _plan(metric, roles.pitome(scores, r, protected, real, split), r, impl)


def pitome_merge(
    x: Tensor,
    metric: Tensor,
    r: int,
    size: Optional[Tensor] = None,
    **options,
) -> Tuple[Tensor, Tensor]:
    """PiToMe's step: ``pitome_match(metric, r, **options)`` then the size-weighted merge of
    x; returns (x_merged (B, N - r, C), size_merged (B, N - r, 1))."""
    checks.check_metric(metric)
    checks.check_tokens("x", x, metric.shape[0], metric.shape[-2], metric.device, "(B, N, C)")
    checks.check_size(size, metric.shape[0], metric.shape[-2], metric.device)
    return pitome_match(metric, r, **options).merge_wavg(x, size)


@fixed_numerics
def kth_bipartite_match(
    metric: Tensor, k: int, *, class_token: bool = False, distill_token: bool = False, backend: str = "auto"
) -> MergePlan:
    """Every k-th token (after the protected ones) is a destination and every other token
    merges into its most similar destination: about N / k tokens remain. k <= 1 merges
    nothing."""
    protected = _protected(metric, class_token, distill_token)
    k = checks.check_int("k", k, 0, "every k-th token is a destination")
    impl = select_backend(backend, (metric,))
    if k <= 1 or metric.shape[-2] - protected < k:
        # roles.kth's rule, applied before it: with fewer tokens than protected ones its
        # positions would start below 0.
        return _identity(metric, impl)
    role, sources = roles.kth(metric.shape[-2], k, protected, metric.device)
    return _plan(metric, role, sources, impl)


@fixed_numerics
def random_bipartite_match(
    metric: Tensor,
    r: int,
    *,
    generator: Optional[torch.Generator] = None,
    class_token: bool = False,
    distill_token: bool = False,
    backend: str = "auto",
) -> MergePlan:
    """r unprotected tokens drawn at random (per batch row, from ``generator``) merge into
    their most similar token among the others. r is clamped as in ToMe, to
    (N - protected) // 2, and never below 0; with r = 0 after clamping nothing is drawn from
    the generator."""
    protected = _protected(metric, class_token, distill_token)
    r = _clamped_r(r, metric.shape[-2], protected)
    generator = _check_generator(generator)
    # Chosen before the draw: a backend that cannot run must not use up the generator.
    impl = select_backend(backend, (metric,))
    if r == 0:
        return _identity(metric, impl)  # nothing drawn: no tokens to choose (or fewer than protected)
    role = roles.random(metric.shape[0], metric.shape[-2], r, protected, generator, metric.device)
    return _plan(metric, role, r, impl)


@fixed_numerics
def grid_match(
    metric: Tensor,
    r: int,
    grid_size,
    *,
    stride=(2, 2),
    random_dst: bool = True,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> MergePlan:
    """The 2-D partition of token merging for diffusion (Bolya & Hoffman 2023, "tomesd").

    The N tokens are a (height, width) grid in row-major order. Each ``stride`` (sy, sx)
    window has one destination, at a random offset (from ``generator``, the same for the
    whole batch) or, with ``random_dst=False``, its top-left token; every other token is a
    source. The r sources most similar to a destination merge into it (r is clamped to the
    number of sources). Merge with ``plan.merge(x, "mean")`` and restore the grid after the
    attention or MLP with ``plan.unmerge``.
    """
    checks.check_metric(metric)
    r = checks.check_r(r)
    height, width = checks.check_int_pair("grid_size", grid_size)
    if height * width != metric.shape[-2]:
        raise ValueError(f"grid_size {height}x{width} must have N={metric.shape[-2]} tokens (from the metric)")
    stride = checks.check_int_pair("stride", stride)
    checks.check_flag("random_dst", random_dst)
    generator = _check_generator(generator)
    impl = select_backend(backend, (metric,))
    role, sources = roles.grid(height, width, stride, random_dst, generator, metric.device)
    return _plan(metric, role, min(r, sources), impl)


@fixed_numerics
def window_match(
    metric: Tensor,
    r: int,
    grid_size,
    *,
    window=(2, 2),
    class_token: bool = False,
    distill_token: bool = False,
    backend: str = "auto",
) -> MergePlan:
    """DSM's spatial stage: merge tokens with their neighbours on the patch grid.

    The tokens after the protected ones are a (height, width) grid in row-major order, cut
    into whole ``window`` (wy, wx) windows. The top-left token of each window is its
    destination; of the other tokens of all windows, the r most similar to their own
    window's destination merge into it (r is clamped to their number). Tokens outside whole
    windows are kept.
    """
    protected = _protected(metric, class_token, distill_token)
    r = checks.check_r(r)
    height, width = checks.check_int_pair("grid_size", grid_size)
    if protected + height * width != metric.shape[-2]:
        raise ValueError(
            f"grid_size {height}x{width} plus {protected} protected tokens must make N={metric.shape[-2]} tokens "
            "(from the metric)"
        )
    window = checks.check_int_pair("window", window)
    impl = select_backend(backend, (metric,))
    role, ids, sources = roles.windows(height, width, window, protected, metric.device)
    return _plan(metric, role, min(r, sources), impl, ids)
