"""Proportional attention for patched models: attention over merged tokens where a key that
stands for s tokens counts s times, i.e. log(s) added to its logit (ToMe, Bolya et al. 2023).

    size_attention(module, query, key, value, attention_mask, log_size, base, *, scaling, dropout, **kwargs)

has the signature of an attention function in ``transformers.AttentionInterface`` (query, key
and value (B, H, N, Dh); it returns the output (B, N, H, Dh) and the weights or None) plus
``log_size`` and ``base``, the model's own attention function (transformers' "sdpa" or its
"eager"). A patch registers a closure over it and hands over the log(size) of the current
tokens.

Implementations (``IMPLEMENTATIONS``):
    bias  log_size[:, None, None, :] in query's dtype, added to the model's attention mask if
          it has one, as the additive mask of ``base``: works everywhere, weights included.
    flex  FlexAttention (``torch.nn.attention.flex_attention``, compiled) with a score_mod
          adding log_size[b, kv_idx]: no (B, 1, 1, N) mask is made, so SDPA's mask handling
          is skipped; only for base "sdpa", no mask, no dropout and no weights requested.
Which one runs is ``choose(device, ...)``, from the table ``CHOICES``, each entry citing the
measurement behind it (docs/prop_attention.md). Both compute the same function: they agree
to rounding (tests/patch/test_prop_attention.py), so the choice changes speed, not numbers.

With ``log_size`` None (no token merged yet) ``base`` runs unchanged: r = 0 stays bit-exact.
"""

import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

IMPLEMENTATIONS = ("bias", "flex")
# Overrides the table for every call (e.g. to time one implementation in a whole model); a
# choice the call cannot take (flex with a mask, eager or dropout) is an error, not a fallback.
ENV_VAR = "TOME_PROP_ATTENTION"


@dataclass(frozen=True)
class Choice:
    """The implementation a device gets, and the measurement (file and command) behind it."""

    implementation: str
    evidence: str


# Per device type. Every entry names what justifies it; a new entry needs a measurement.
CHOICES: Dict[str, Choice] = {
    "cpu": Choice("bias", "python -m benchmarks.e2e_vit --prop-attn --threads 1 (two runs, 2026-12-01, "
                          "benchmarks/results/prop_attn_cpu_amd-epyc_20261201T014549Z.json and ..T014712Z.json; "
                          "table in docs/prop_attention.md): compiled flex took 1.13-2.01x the bias path's time at "
                          "every ViT-B/16 token count in float32 but one row timed beside other work, plus a 16-32 s "
                          "compile; the CPU's SDPA keeps its flash kernel with the mask"),
    "cuda": Choice("bias", "no GPU measurement yet: the safe choice until scripts/gpu_checks.py's prop_attn step "
                           "(python -m benchmarks.prop_attn on CUDA) decides it"),
}


# Read once, at import: dynamo refuses to trace torch.cpu._is_avx2_supported, and choose() runs
# inside compiled models.
_CPU_HAS_AVX2 = torch.cpu._is_avx2_supported()


def flex_unavailable_reason(device) -> Optional[str]:
    """Why compiled FlexAttention cannot run on ``device`` (a torch.device or its type name),
    or None. On the CPU inductor lowers it only with AVX2 in use, not on macOS
    (``torch/_inductor/kernel/flex/flex_cpu.py``, ``check_cpu_supported``, torch 2.11): elsewhere
    the compile fails with "not supported for CPU"."""
    kind = device if isinstance(device, str) else getattr(device, "type", None)
    if kind is None or kind.split(":")[0] != "cpu":
        return None
    if sys.platform == "darwin":
        return "compiled FlexAttention does not run on the CPU on macOS (torch's inductor)"
    if not _CPU_HAS_AVX2 or os.environ.get("ATEN_CPU_CAPABILITY") == "default":
        return ("compiled FlexAttention on the CPU needs AVX2 in use (this CPU lacks it, or ATEN_CPU_CAPABILITY="
                "default turns it off)")
    return None


def check_prop_attention_switch() -> str:
    """The implementation ``TOME_PROP_ATTENTION`` forces ("" when unset), checked. ``choose``
    reads it through this; patches call it too, since ``choose`` runs only once a token has
    merged and a typo would otherwise pass every r = 0 run unnoticed.

    Raises:
        ValueError: the variable is set to something other than an implementation's name.
    """
    forced = os.environ.get(ENV_VAR, "")
    if forced and forced not in IMPLEMENTATIONS:
        raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(IMPLEMENTATIONS)} (or unset)")
    return forced


def choose(device, *, base_is_sdpa: bool = True, has_mask: bool = False, dropout: float = 0.0,
           weights: bool = False) -> str:
    """The implementation ``size_attention`` uses on ``device`` (a torch.device or its type
    name) for a call with those properties: the table's entry (or ``TOME_PROP_ATTENTION``),
    "flex" only where it can run (base sdpa, no mask, no dropout, no weights)."""
    kind = device if isinstance(device, str) else getattr(device, "type", None)
    if not isinstance(kind, str):
        raise TypeError(f"choose: device must be a torch.device or a device type name, got {type(device).__name__}")
    kind = kind.split(":")[0]
    flex_ok = base_is_sdpa and not has_mask and not dropout and not weights
    forced = check_prop_attention_switch()
    if forced:
        if forced == "flex" and not flex_ok:
            raise ValueError(f"{ENV_VAR}=flex, but this call cannot use FlexAttention (it needs base 'sdpa', no "
                             f"attention_mask, no dropout, no attention weights; got base_is_sdpa={base_is_sdpa}, "
                             f"has_mask={has_mask}, dropout={dropout}, weights={weights})")
        unavailable = flex_unavailable_reason(kind) if forced == "flex" else None
        if unavailable is not None:
            raise ValueError(f"{ENV_VAR}=flex, but {unavailable}")
        return forced
    entry = CHOICES.get(kind)
    implementation = entry.implementation if entry is not None else "bias"
    flex_ok = flex_ok and flex_unavailable_reason(kind) is None
    return implementation if implementation == "bias" or flex_ok else "bias"


def _is_sdpa(base: Callable) -> bool:
    """Whether ``base`` is transformers' SDPA attention function. Looked up in sys.modules:
    a base that came from transformers has it imported already, and nothing is imported here."""
    module = sys.modules.get("transformers.integrations.sdpa_attention")
    return module is not None and base is getattr(module, "sdpa_attention_forward", None)


def _check(query: Tensor, key: Tensor, value: Tensor, log_size: Tensor) -> None:
    if not all(isinstance(t, Tensor) for t in (query, key, value, log_size)):
        raise TypeError("size_attention: query, key, value and log_size must be tensors")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"size_attention: query, key and value must be (B, H, N, Dh); got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    b, n_kv = key.shape[0], key.shape[2]
    if tuple(log_size.shape) != (b, n_kv):
        raise ValueError(f"size_attention: log_size must be (B, N) = ({b}, {n_kv}) for key of shape "
                         f"{tuple(key.shape)}; got {tuple(log_size.shape)}")
    if not log_size.is_floating_point():
        raise TypeError(f"size_attention: log_size must be a floating-point tensor, got {log_size.dtype}")


def size_bias(log_size: Tensor, attention_mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """The additive mask of the bias path: log_size as (B, 1, 1, N) in ``dtype``, plus the
    model's mask (a float mask is added; a boolean one, True = attend, keeps the bias where
    True and the most negative ``dtype`` value elsewhere)."""
    bias = log_size.to(dtype)[:, None, None, :]
    if attention_mask is None:
        return bias
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, bias, torch.finfo(dtype).min)
    return bias + attention_mask.to(dtype)


def bias_attention(module, query, key, value, attention_mask, log_size, base, *, scaling, dropout, **kwargs):
    """The bias path: ``base`` with log(size) in its additive mask."""
    mask = size_bias(log_size, attention_mask, query.dtype)
    return base(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


# torch.compile(flex_attention), made on first use (no compile work at import), with dynamic
# shapes from the start: one kernel serves every token count. Static shapes would compile once
# per count, and past dynamo's recompile limit (8) a ViT-B/16 at r = 16 (12 counts) ran the
# rest eagerly, 10-20x slower (measured: benchmarks/prop_attn.py, first CPU run); the automatic
# switch to dynamic shapes on a later count failed to build on CPU in torch 2.11 (inductor's
# C++ error "cur_qSplitSize5 was not declared").
_COMPILED_FLEX = None


def _flex():
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if torch.compiler.is_compiling():
        # Inside a compiled model the outer compile traces the higher-order op itself.
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


def flex_attention_bhnd(query: Tensor, key: Tensor, value: Tensor, log_size: Tensor, *,
                        scaling: Optional[float]) -> Tensor:
    """FlexAttention with log_size[b, kv_idx] added to each score, in float32 (FlexAttention's
    own score type); (B, H, N, Dh) as SDPA returns it (the benchmark times this)."""
    bias = log_size.to(torch.float32)

    def add_log_size(score, b, h, q_idx, kv_idx):
        return score + bias[b, kv_idx]

    return _flex()(query, key, value, score_mod=add_log_size, scale=scaling)


def flex_size_attention(query: Tensor, key: Tensor, value: Tensor, log_size: Tensor, *,
                        scaling: Optional[float]) -> Tensor:
    """The flex path, output (B, N, H, Dh) as transformers' attention functions return it."""
    return flex_attention_bhnd(query, key, value, log_size, scaling=scaling).transpose(1, 2).contiguous()


def size_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                   log_size: Optional[Tensor], base: Callable, *, scaling: Optional[float], dropout: float = 0.0,
                   **kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """Attention with log(size) added to each key's logits, by the implementation ``choose``
    picks for query's device. Returns (attn_output (B, N, H, Dh), attn_weights or None), as
    ``base`` does; with ``log_size`` None it is ``base``'s call, unchanged."""
    if not callable(base):
        raise TypeError(f"size_attention: base must be the model's attention function, got {type(base).__name__}")
    if log_size is None:
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    _check(query, key, value, log_size)
    weights = bool(kwargs.get("output_attentions", False))
    implementation = choose(query.device, base_is_sdpa=_is_sdpa(base), has_mask=attention_mask is not None,
                            dropout=dropout, weights=weights)
    if implementation == "flex":
        return flex_size_attention(query, key, value, log_size, scaling=scaling), None
    return bias_attention(module, query, key, value, attention_mask, log_size, base, scaling=scaling,
                          dropout=dropout, **kwargs)
