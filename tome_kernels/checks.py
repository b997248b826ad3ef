"""Host-side input checks, run before any backend does work.

Each failure raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong
shape or value) with a message that names the argument and says what was expected.

One rule per kind of number argument, for every public function and patch
(docs/semantics.md, "Edge values"):

- counts (r, k, delay, strides, grid sizes...): an integer, Python or NumPy (any
  ``numbers.Integral``), never a bool and never a tensor, then its range;
- real parameters (PiToMe's margin and alpha, an inflection, a ratio): a real number,
  Python or NumPy, never a bool or a tensor, finite, then its range.

A tensor is refused even when it holds one number: reading its value would wait for the
device (a host sync in the middle of a model) and would stop ``torch.compile`` tracing.
"""

import math
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


def _tensor_hint(value) -> str:
    return " (pass a Python number: int(t) / float(t))" if isinstance(value, Tensor) else ""


def check_int(name: str, value, minimum: int = 0, meaning: str = "") -> int:
    """An int (``is_int``) of at least ``minimum``, as a Python int. ``meaning`` (e.g. "the
    number of tokens to remove") goes into the error message."""
    why = f" ({meaning})" if meaning else ""
    if not is_int(value):
        raise TypeError(f"{name} must be a Python int or a NumPy integer{why}, got {type(value).__name__}: "
                        f"{value!r}{_tensor_hint(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{why}, got {value}")
    return int(value)


def check_r(r) -> int:
    return check_int("r", r, 0, "the number of tokens to remove")


def check_real(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
               high_open: bool = False, meaning: str = "") -> float:
    """A finite real number (int or float, Python or NumPy, not bool) in [low, high] (an end
    left out with ``low_open`` / ``high_open``), as a float."""
    why = f" ({meaning})" if meaning else ""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number{why}, got {type(value).__name__}: {value!r}"
                        f"{_tensor_hint(value)}")
    if math.isinf(high):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
    else:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    bounded = not (math.isinf(low) and math.isinf(high))
    # Comparisons rather than math.isfinite: torch.compile traces them on a float it made
    # symbolic (dynamic=True), and cannot trace math.isfinite (NaN fails both comparisons).
    if not -math.inf < value < math.inf:
        also = f"; it must be {bound}" if bounded else ""
        raise ValueError(f"{name} must be finite{also}{why}, got {value!r}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        raise ValueError(f"{name} must be {bound}{why}, got {value!r}")
    return float(value)


def _type_name(value) -> str:
    """The type of ``value`` with its module where that is not the builtins (a
    ``numpy.bool`` is not a ``bool``, a ``numpy.random.Generator`` not a torch one)."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_flag(name: str, value) -> bool:
    """A bool, Python or NumPy (as NumPy integers are counts), as a Python bool; never an
    int: flag=1 is more likely a slip than "True"."""
    # NumPy's bool by name: NumPy is not a dependency, and a numpy.bool_ exists only with it.
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool) or numpy_bool):
        raise TypeError(f"{name} must be a bool (Python or NumPy), got {_type_name(value)}: {value!r}")
    return bool(value)


def check_choice(name: str, value, choices: Tuple[str, ...]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(choices)}; got {_type_name(value)}: {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)  # a NumPy str compares equal: kept as a plain str


def check_mode(mode) -> str:
    return check_choice("mode", mode, MERGE_MODES)


def check_metric(metric) -> Tuple[int, int]:
    """Validate a metric (B, N, D) or keys (B, H, N, Dh); return (B, N)."""
    check_tensor("metric", metric, (3, 4), "(B, N, D) or keys (B, H, N, Dh)")
    if metric.dim() == 4 and metric.shape[1] == 0:
        raise ValueError(f"metric given as keys (B, H, N, Dh) must have H >= 1 heads, got shape {tuple(metric.shape)}")
    # Without features every similarity is 0 and the matching a pure tie-break: a metric of
    # width 0 is a caller's slip, refused like H = 0 (whatever B and N are, so that the rule
    # does not depend on the batch).
    if metric.shape[-1] == 0:
        features = "Dh >= 1 features per head" if metric.dim() == 4 else "D >= 1 features"
        raise ValueError(f"metric must have {features} to measure similarity on, got shape {tuple(metric.shape)}")
    return metric.shape[0], metric.shape[-2]


def check_tokens(name: str, value, batch: int, tokens: int, device: torch.device, expected: str,
                 source: str = "from the metric", tokens_name: str = "N") -> Tensor:
    """A (B, N, C)-like tensor whose B and N (``tokens_name``: "N - r" for an unmerge's input)
    must agree with ``source`` (the metric, or a plan), on its device."""
    check_tensor(name, value, (3,), expected)
    if value.shape[0] != batch or value.shape[1] != tokens:
        raise ValueError(f"{name} must have shape {expected} with B={batch} and {tokens_name}={tokens} ({source}), "
                         f"got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the metric is on {device}: all tensors must be on one "
                         "device")
    return value


def _size_values_readable(size: Tensor) -> bool:
    """Whether reading the values of ``size`` is free: a CPU tensor, run eagerly. A GPU
    tensor would need a host sync; a tracer's fake or functional tensor (torch.compile, or
    any other tracer) has no values to read."""
    return size.device.type == "cpu" and type(size) is Tensor and not torch.compiler.is_compiling()


def check_size(size: Optional[Tensor], batch: int, tokens: int, device: torch.device,
               source: str = "from the metric") -> None:
    """Sizes (B, N, 1) of a float dtype, each positive and finite.

    The values are checked where that is free (``_size_values_readable``: CPU tensors in
    eager mode). Elsewhere they are not, and a size that is 0, negative, inf or NaN goes
    through the merge's formula on every backend alike: a group whose sizes sum to 0 or to a
    non-finite value gets NaN rows (docs/semantics.md, "Edge values").
    """
    if size is None:
        return
    check_tokens("size", size, batch, tokens, device, "(B, N, 1)", source)
    if size.shape[2] != 1:
        raise ValueError(f"size must have shape (B, N, 1), got {tuple(size.shape)}")
    # min and max (NaN propagates through both) are the cheapest test: about 10 us for a
    # (8, 197, 1) size, against a few ms for the merge; the slow search only on failure.
    if _size_values_readable(size) and size.numel():
        with torch.no_grad():
            if not (size.min().item() > 0 and size.max().item() < math.inf):
                bad = ~(torch.isfinite(size) & (size > 0))
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(f"size must be positive and finite (how many patches a token stands for), "
                                 f"got {size[where].item()} at index {where}")


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
