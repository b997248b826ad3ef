"""Host-side input checks, run before any backend does work.

Each failure raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong
shape or value) with a message that names the argument and says what was expected.
"""

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from .reference import MERGE_MODES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


def check_tensor(name: str, value, ranks: Tuple[int, ...], expected_shape: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected_shape}, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor ({_DTYPE_NAMES}), got dtype {value.dtype}")
    if value.dim() not in ranks:
        raise ValueError(f"{name} must have shape {expected_shape}, got a {value.dim()}-D tensor of shape "
                         f"{tuple(value.shape)}")
    return value


def is_int(value) -> bool:
    """An integer (a Python or NumPy int) that is not a bool: bool is an int subclass, but
    r=True is far more likely a slip than "merge one token"."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (int or float) that is not a bool, for the same reason as ``is_int``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 0, meaning: str = "") -> int:
    """An int (``is_int``) of at least ``minimum``, as a Python int. ``meaning`` (e.g. "the
    number of tokens to remove") goes into the error message."""
    why = f" ({meaning})" if meaning else ""
    if not is_int(value):
        raise TypeError(f"{name} must be a Python int{why}, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{why}, got {value}")
    return int(value)


def check_r(r) -> int:
    return check_int("r", r, 0, "the number of tokens to remove")


def check_real(name: str, value) -> float:
    """A finite real number (int or float, not bool), as a float."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    if value != value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")
    return value


def check_mode(mode) -> str:
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {', '.join(MERGE_MODES)}, got {mode!r}")
    return mode


def check_metric(metric) -> Tuple[int, int]:
    """Validate a metric (B, N, D) or keys (B, H, N, Dh); return (B, N)."""
    check_tensor("metric", metric, (3, 4), "(B, N, D) or keys (B, H, N, Dh)")
    if metric.dim() == 4 and metric.shape[1] == 0:
        raise ValueError(f"metric given as keys (B, H, N, Dh) must have H >= 1 heads, got shape {tuple(metric.shape)}")
    return metric.shape[0], metric.shape[-2]


def check_tokens(name: str, value, batch: int, tokens: int, device: torch.device, expected: str) -> Tensor:
    """A (B, N, C)-like tensor whose B and N must agree with the metric's, on its device."""
    check_tensor(name, value, (3,), expected)
    if value.shape[0] != batch or value.shape[1] != tokens:
        raise ValueError(
            f"{name} must have shape {expected} with B={batch} and N={tokens} (from the metric), "
            f"got {tuple(value.shape)}"
        )
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the metric is on {device}: all tensors must be on one "
                         "device")
    return value


def check_size(size: Optional[Tensor], batch: int, tokens: int, device: torch.device) -> None:
    if size is None:
        return
    check_tokens("size", size, batch, tokens, device, "(B, N, 1)")
    if size.shape[2] != 1:
        raise ValueError(f"size must have shape (B, N, 1), got {tuple(size.shape)}")


def check_match_inputs(metric, r, class_token, distill_token) -> int:
    """All checks of ``bipartite_match``; returns r as an int."""
    check_metric(metric)
    check_flag("class_token", class_token)
    check_flag("distill_token", distill_token)
    return check_r(r)


def check_merge_inputs(x, metric, r, size, class_token, distill_token) -> int:
    """All checks of ``bipartite_merge``; returns r as an int."""
    r = check_match_inputs(metric, r, class_token, distill_token)
    batch, tokens = metric.shape[0], metric.shape[-2]
    check_tokens("x", x, batch, tokens, metric.device, "(B, N, C)")
    check_size(size, batch, tokens, metric.device)
    return r


def check_int_pair(name: str, value) -> Tuple[int, int]:
    """A positive int or (height, width) pair of them, as (height, width)."""
    if is_int(value):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(is_int(v) for v in value):
        raise TypeError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    if min(value) <= 0:
        raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return int(value[0]), int(value[1])
