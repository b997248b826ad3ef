"""Helpers shared by several test modules (test modules never import one another): the
repository root, the tolerance rule and its float64 truths, poisoned Triton buffers,
small model runners, and the width of a benchmark's printed report.

What "close enough" means when a test compares two numerical paths: BLAS, SDPA and ATen's
vector kernels choose their code path from the CPU (SSE, AVX2, AVX-512) and the thread
count, so float results of two paths differ in their last bits by amounts no fixed tolerance
fits on every machine. The project's rule instead:

    the path under test may differ from a float64 ground truth (same plan, same merge
    decisions) by at most twice what the reference path, in the same dtype, differs from
    it, plus a floor of a few ulps of the dtype at the output's scale.

The reference's own error is measured on the machine that runs the test, so the budget
follows the machine. A logic error (a wrong group, a missing weight, a stale row) is far
outside it: it is an error of the size of the values, not of their rounding.
"""

import math
import os

import pytest
import torch

from tome_kernels import reference
from tome_kernels.backends import registry
from tome_kernels.reference import energy

# The repository (tests/ is one folder down).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")
# The tests run on the GPU (TOME_TEST_DEVICE=cuda) rather than the CPU.
ON_GPU = os.environ.get("TOME_TEST_DEVICE", "cpu") == "cuda"
# Why the tests on the device (the ``device`` fixture) cannot run here, or None: a GPU run on
# a machine without a GPU, which CI makes to check the GPU mode of the tests themselves.
NO_DEVICE = ("TOME_TEST_DEVICE=cuda, but this machine has no GPU (torch.cuda.is_available() is False)"
             if ON_GPU and not torch.cuda.is_available() else None)
# The marks of a module of GPU-only checks: marked "gpu", and skipped (reported as skipped,
# never as passed) without a GPU and TOME_TEST_DEVICE=cuda.
GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_GPU or not torch.cuda.is_available(),
                       reason="needs a GPU and TOME_TEST_DEVICE=cuda"),
]


def _parts(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _error(value, truth):
    """max |value - truth| over the finite entries of truth (float64); inf if value is NaN
    or infinite there, or if it differs from a non-finite truth (inf, -inf, NaN)."""
    value = value.detach().to(torch.float64)
    finite = truth.isfinite()
    same = (value == truth) | (value.isnan() & truth.isnan())
    if not bool(same[~finite].all()):
        return math.inf
    diff = (value - truth)[finite].abs().nan_to_num(nan=math.inf)
    return diff.max().item() if diff.numel() else 0.0


def assert_within_twice_reference_error(got, ref, truth, *, ulps=4, also=(), msg=""):
    """err(got) <= 2 * err(ref) + ulps * eps(got.dtype) * max|truth|, err = max-abs error
    against ``truth``.

    got: the path under test. ref: the reference path, in got's dtype. truth: the same
    computation in float64 (or float32 where that is exact or rounded once from float64, as
    sizes are). Tuples such as (x, size) are compared part by part. ``also``: more
    (ref, truth) pairs whose error may set the budget, the largest one counting (e.g. the
    unmerged model along the path under test, when that path's attention kernel is not the
    reference's). Where truth is not finite, got must be the same value.
    """
    gots, refs, truths = _parts(got), _parts(ref), _parts(truth)
    assert len(gots) == len(refs) == len(truths), (len(gots), len(refs), len(truths))
    others = [(_parts(r), _parts(t)) for r, t in also]
    for i, (g, r, t) in enumerate(zip(gots, refs, truths)):
        where = f"{msg} [part {i}]" if len(gots) > 1 else msg
        t = t.detach().to(torch.float64)
        assert g.shape == r.shape == t.shape, f"{where}: shapes {tuple(g.shape)}, {tuple(r.shape)}, {tuple(t.shape)}"
        assert g.dtype == r.dtype, f"{where}: got is {g.dtype} but the reference path is {r.dtype}"
        ref_errors = [_error(r, t)] + [_error(o_r[i], o_t[i].detach().to(torch.float64)) for o_r, o_t in others]
        assert all(math.isfinite(e) for e in ref_errors), f"{where}: a reference path has NaN or inf unlike truth"
        scale = t[t.isfinite()].abs().max().item() if bool(t.isfinite().any()) else 0.0
        floor = ulps * torch.finfo(g.dtype).eps * scale
        err, ref_err = _error(g, t), max(ref_errors)
        assert err <= 2 * ref_err + floor, (
            f"{where}: error {err:.3e} against float64 > 2 x reference error {ref_err:.3e} + {ulps:.3g} ulps "
            f"{floor:.3e} (= {2 * ref_err + floor:.3e})"
        )


def normalized_float64(metric):
    """``reference.normalized_metric`` in float64 (the dtype it keeps): head mean, unit rows."""
    return reference.normalized_metric(metric.detach().to(torch.float64))


def energy_float64(metric, margin, alpha=1.0, form="elu"):
    """PiToMe's energy in float64 throughout: the reference's formula
    (``energy_of_similarity``) on float64 similarities, for the form of f ``form``. The truth
    of ``energy.energy`` on float16 / bfloat16 / float32 metrics, which it scores in float32;
    on a float64 metric it is that reference itself, so a float64 path needs a finer truth."""
    m = normalized_float64(metric)
    return energy.energy_of_similarity(m @ m.transpose(-1, -2), margin, alpha, form)


def best_float64(metric, best, dst):
    """The float64 cosine of each source with the destination ``dst`` it was given (the
    truth of ``partition.assign``'s ``best`` for those decisions); entries where ``best`` is
    -inf (no destination, or only NaN scores) stay -inf."""
    m = normalized_float64(metric)
    chosen = m.gather(1, dst.clamp_min(0)[..., None].expand_as(m))
    cosine = (m * chosen).sum(-1)
    return torch.where(best.isfinite(), cosine, best.to(torch.float64))


def widest_report_line(printed: str) -> int:
    """The widest line a benchmark printed, leaving out its "saved <path>" line: a path is not
    wrapped, and its length follows the temporary folder and the CPU's name in the file name
    (an Intel CPU's name took such a line past the width where an AMD one did not)."""
    return max(len(line) for line in printed.splitlines() if not line.startswith("saved "))


def poison_triton_buffers(monkeypatch):
    """Every buffer launch.py allocates starts as NaN (floats) or -7 (ints), so an output
    element a kernel forgets to write fails the comparison instead of passing by luck."""
    from tome_kernels.backends.triton import launch  # imports triton: only where it is used

    class PoisonedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*shape, **kwargs):
            t = torch.empty(*shape, **kwargs)
            return t.fill_(NAN if t.is_floating_point() else -7)

    monkeypatch.setattr(launch, "torch", PoisonedTorch())


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out


def tokens_seen_by_blocks(model, x):
    """Token count of each block's output, recorded by forward hooks."""
    counts = []
    hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for b in model.blocks]
    logits(model, x)
    for h in hooks:
        h.remove()
    return counts


def cpu_tensor_reasons(name, dtype=torch.float32):
    """Why the backend ``name`` does not take ``dtype`` CPU tensors here, empty when it does.
    Answered without loading it: a backend that takes them but cannot load is not excused, its
    test fails with the reason (a build error is a defect, not a skip)."""
    return registry._REGISTRY[name].unsupported_reasons([torch.zeros(1, dtype=dtype)])


def runs_cpu_tensors(name, dtype=torch.float32):
    """A mark that skips the test, saying why, where the backend ``name`` does not take ``dtype``
    CPU tensors: "triton" in a GPU run (TOME_TEST_DEVICE=cuda), which leaves Triton's
    interpreter off, so that its kernels need CUDA tensors."""
    reasons = cpu_tensor_reasons(name, dtype)
    return pytest.mark.skipif(bool(reasons), reason=f"the {name} backend does not run {dtype} CPU tensors here: "
                              + "; ".join(reasons))


def cpu_backend_cases(dtype=torch.float32):
    """The fast backends that a test of a CPU model compares with the reference, as pytest
    parameters: "cpu", and "triton" (in Triton's interpreter), each skipped with its reason
    where it does not take ``dtype`` CPU tensors. "cuda" never does and is not a case."""
    return [pytest.param(name, marks=runs_cpu_tensors(name, dtype)) for name in ("cpu", "triton")]
