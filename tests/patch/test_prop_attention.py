"""tome_kernels.patch.prop_attention: proportional attention for transformers-style attention
functions. Each implementation computes attention with log(size) on the keys, which is
attention over the keys and values repeated ``size`` times; they agree to rounding (the
tolerance rule of tests/helpers.py), and log_size None is the base call itself.

The flex path compiles FlexAttention on first use (dynamic shapes; 35-40 s per test on the
shared 2-core CPU, inductor's compile of the C++ template): its two tests are marked ``slow``,
out of the fast loop, in the full suite.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_within_twice_reference_error
from tome_kernels.patch import prop_attention
from tome_kernels.patch.prop_attention import CHOICES, ENV_VAR, IMPLEMENTATIONS, choose, size_attention

# The flex tests' one shape: batch 2, 3 heads, 13 tokens (odd: no block multiple), head dim 16.
B, H, N, DH = 2, 3, 13, 16
SCALE = DH ** -0.5


class Attention(torch.nn.Module):
    """Stands for the module transformers passes to an attention function."""

    is_causal = False


def sdpa_base(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """transformers' sdpa_attention_forward contract: output (B, N, H, Dh), no weights."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def eager_base(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager_attention_forward contract: output and the weights."""
    scores = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def inputs(dtype=torch.float32, b=B, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, H, n, DH, generator=g).to(dtype) for _ in range(3))
    size = torch.randint(1, 5, (b, n), generator=g)
    return q, k, v, size


def truth(q, k, v, log_size, mask=None):
    """Attention with log(size) (and ``mask``) in float64, output (B, N, H, Dh)."""
    q, k, v, log_size = (t.to(torch.float64) for t in (q, k, v, log_size))
    scores = q @ k.transpose(-1, -2) * SCALE + log_size[:, None, None, :]
    if mask is not None:
        scores = scores + mask.to(torch.float64)
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.mark.parametrize("base", [sdpa_base, eager_base])
@pytest.mark.parametrize("masked", [False, True])
def test_no_log_size_is_the_base_call(base, masked, no_override):
    q, k, v, _ = inputs()
    mask = torch.randn(B, 1, N, N) if masked else None
    want = base(Attention(), q, k, v, mask, scaling=SCALE, dropout=0.0)
    got = size_attention(Attention(), q, k, v, mask, None, base, scaling=SCALE, dropout=0.0)
    assert torch.equal(got[0], want[0])
    assert (got[1] is None) == (want[1] is None) and (got[1] is None or torch.equal(got[1], want[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", [sdpa_base, eager_base])
def test_bias_path_is_proportional_attention(dtype, base, no_override):
    q, k, v, size = inputs(dtype)
    log_size = size.float().log()
    out, weights = size_attention(Attention(), q, k, v, None, log_size, base, scaling=SCALE, dropout=0.0)
    assert out.shape == (B, N, H, DH) and out.dtype == dtype
    assert (weights is None) == (base is sdpa_base)
    # The reference path: the plain eager formula with the bias added in the same dtype.
    ref, _ = eager_base(Attention(), q, k, v, log_size.to(dtype)[:, None, None, :], scaling=SCALE)
    assert_within_twice_reference_error(out, ref, truth(q, k, v, log_size))


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_bias_path_keeps_the_models_mask(kind, no_override):
    q, k, v, size = inputs()
    log_size = size.float().log()
    keep = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # every query keeps a key
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    mask = keep if kind == "bool" else additive + torch.randn(B, 1, N, N)
    out, _ = size_attention(Attention(), q, k, v, mask, log_size, sdpa_base, scaling=SCALE, dropout=0.0)
    float_mask = additive if kind == "bool" else mask
    ref, _ = eager_base(Attention(), q, k, v, float_mask + log_size[:, None, None, :], scaling=SCALE)
    assert_within_twice_reference_error(out, ref, truth(q, k, v, log_size, float_mask))


def _repeated(q, k, v, size, b):
    """Row b's keys and values each repeated size times (the tokens a merged key stands for)."""
    return q[b:b + 1], k[b:b + 1].repeat_interleave(size[b], dim=2), v[b:b + 1].repeat_interleave(size[b], dim=2)


def _repeated_truth_and_ref(q, k, v, size):
    truths, refs = [], []
    for b in range(q.shape[0]):
        qb, kb, vb = _repeated(q, k, v, size, b)
        truths.append(truth(qb, kb, vb, torch.zeros(1, kb.shape[2])))
        refs.append(sdpa_base(Attention(), qb, kb, vb, None, scaling=SCALE)[0])
    return torch.cat(refs), torch.cat(truths)


def test_log_size_is_repeating_each_key_size_times(no_override):
    q, k, v, size = inputs(seed=3)
    ref, want = _repeated_truth_and_ref(q, k, v, size)
    out, _ = size_attention(Attention(), q, k, v, None, size.float().log(), sdpa_base, scaling=SCALE, dropout=0.0)
    assert_within_twice_reference_error(out, ref, want)


# Compiled FlexAttention runs on this CPU only with AVX2 in use (scripts/test_isa.sh's "sse" run has it off).
needs_flex = pytest.mark.skipif(prop_attention.flex_unavailable_reason("cpu") is not None,
                                reason=str(prop_attention.flex_unavailable_reason("cpu")))


@pytest.mark.slow
@needs_flex
def test_flex_path_agrees_with_the_bias_path_and_repetition(no_override):
    q, k, v, size = inputs(seed=3)
    log_size = size.float().log()
    flex = prop_attention.flex_size_attention(q, k, v, log_size, scaling=SCALE)
    bias, _ = size_attention(Attention(), q, k, v, None, log_size, sdpa_base, scaling=SCALE, dropout=0.0)
    assert flex.shape == bias.shape and flex.dtype == bias.dtype
    assert_within_twice_reference_error(flex, bias, truth(q, k, v, log_size))
    ref, want = _repeated_truth_and_ref(q, k, v, size)
    assert_within_twice_reference_error(flex, ref, want)


def test_choice_table_covers_cpu_and_cuda():
    assert {"cpu", "cuda"} <= set(CHOICES)
    for kind, entry in CHOICES.items():
        assert entry.implementation in IMPLEMENTATIONS, kind
        # Each entry names the measurement behind it (a results file or the command to make one).
        assert "benchmarks/" in entry.evidence or "python -m" in entry.evidence, (kind, entry.evidence)


def test_choose(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    for kind in ("cpu", "cuda"):
        assert choose(kind) == CHOICES[kind].implementation
        assert choose(torch.device(kind)) == choose(f"{kind}:0") == choose(kind)
        # Where flex cannot run, the bias path: the same numbers, by the model's own attention.
        for blocked in (dict(base_is_sdpa=False), dict(has_mask=True), dict(dropout=0.1), dict(weights=True)):
            assert choose(kind, **blocked) == "bias"
    assert choose("mps") == "bias"  # a device with no entry gets the path that runs anywhere
    with pytest.raises(TypeError, match="device"):
        choose(3)
    monkeypatch.setenv(ENV_VAR, "flex")
    assert choose("cuda") == "flex"
    with pytest.raises(ValueError, match="has_mask=True"):
        choose("cuda", has_mask=True)
    if prop_attention.flex_unavailable_reason("cpu") is None:
        assert choose("cpu") == "flex"
    else:
        with pytest.raises(ValueError, match="AVX2|macOS"):
            choose("cpu")
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ENV_VAR):
        choose("cpu")


def test_flex_needs_avx2_on_the_cpu(monkeypatch):
    """Where inductor cannot lower FlexAttention on the CPU, the table never picks it and
    forcing it says why, before any compile."""
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert "AVX2" in prop_attention.flex_unavailable_reason("cpu")
    assert prop_attention.flex_unavailable_reason("cuda") is None
    monkeypatch.setitem(CHOICES, "cpu", prop_attention.Choice("flex", "a test's entry"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert choose("cpu") == "bias"
    monkeypatch.setenv(ENV_VAR, "flex")
    with pytest.raises(ValueError, match="needs AVX2"):
        choose("cpu")


def test_bad_arguments_are_named(no_override):
    q, k, v, size = inputs()
    with pytest.raises(ValueError, match="log_size"):
        size_attention(Attention(), q, k, v, None, size.float().log()[:, :-1], sdpa_base, scaling=SCALE, dropout=0.0)
    with pytest.raises(TypeError, match="log_size"):
        size_attention(Attention(), q, k, v, None, size, sdpa_base, scaling=SCALE, dropout=0.0)
    with pytest.raises(ValueError, match="query, key and value"):
        size_attention(Attention(), q[0], k, v, None, size.float().log(), sdpa_base, scaling=SCALE, dropout=0.0)
    with pytest.raises(TypeError, match="base"):
        size_attention(Attention(), q, k, v, None, size.float().log(), "sdpa", scaling=SCALE, dropout=0.0)


@pytest.mark.slow
@needs_flex
def test_flex_path_in_a_model_compiled_whole(monkeypatch):
    """transformers' sdpa as base, the flex path forced: a block calling size_attention
    compiles with fullgraph=True and agrees with the bias path."""
    sdpa_attention = pytest.importorskip("transformers.integrations.sdpa_attention")
    base = sdpa_attention.sdpa_attention_forward

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

        def forward(self, q, k, v, log_size):
            return size_attention(self.attn, q, k, v, None, log_size, base, scaling=SCALE, dropout=0.0)[0] * 2

    q, k, v, size = inputs(seed=5)
    log_size = size.float().log()
    monkeypatch.delenv(ENV_VAR, raising=False)
    bias = Block()(q, k, v, log_size)
    monkeypatch.setenv(ENV_VAR, "flex")
    torch._dynamo.reset()
    got = torch.compile(Block(), fullgraph=True)(q, k, v, log_size)
    assert_within_twice_reference_error(got, bias, truth(q, k, v, log_size) * 2)
    assert os.environ[ENV_VAR] == "flex"
