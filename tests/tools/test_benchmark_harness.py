"""The benchmark harness measures what it says: bytes, peak memory, results file, table."""

import json
import os
import statistics

import pytest
import torch

from benchmarks import providers, run
from benchmarks.measure import peak_extra_bytes, rel_err
from benchmarks.providers import applies, same_group
from benchmarks.report import MAX_WIDTH
from benchmarks.shapes import CPU_SHAPES, GPU_SHAPES, Shape
from benchmarks.spread import RETRIES
from tests.helpers import widest_report_line


def test_min_bytes_by_hand():
    shape = Shape("tiny", batch=2, tokens=10, channels=4, r=3, heads=2, feature_dim=5, class_token=True)
    # float16: x 2*10*4*2 = 160, keys 2*2*10*5*2 = 400, size 2*10*4 = 80; outputs 2*7*4*2 = 112 and 2*7*4 = 56.
    assert shape.min_bytes(torch.float16, backward=False) == 160 + 400 + 80 + 112 + 56
    # backward: read grads 112 + 56, x 160, size 80; write grad_x 160, grad_size 80.
    assert shape.min_bytes(torch.float16, backward=True) == 808 + 112 + 56 + 160 + 80 + 160 + 80
    # The grid step takes no size: x 160 and metric 400 read; merged 2*7*4*2 = 112 and its
    # unmerge 160 written.
    grid = Shape("tiny_grid", batch=2, tokens=10, channels=4, r=3, heads=2, feature_dim=5, class_token=False,
                 method="grid")
    assert grid.min_bytes(torch.float16, backward=False) == 160 + 400 + 112 + 160


def test_named_shapes():
    full = {s.name: s for s in GPU_SHAPES}
    assert (full["vit_b16_224"].batch, full["vit_b16_224"].metric_shape) == (256, (256, 12, 197, 64))
    assert full["vit_b16_224_b1"].batch == 1
    assert full["vit_l16_512"].metric_shape == (64, 16, 1025, 64) and full["vit_l16_512"].r == 40
    assert full["vit_h14_518"].metric_shape == (32, 16, 1370, 80) and full["vit_h14_518"].channels == 1280
    assert full["diffusion"].metric_shape == (2, 4096, 320) and full["diffusion"].r == 2048
    for cpu in CPU_SHAPES:
        assert cpu.tokens == full[cpu.name].tokens and cpu.batch <= full[cpu.name].batch
    # The other methods at the ViT-B/16 and diffusion sizes, forward only.
    for method in ("pitome", "kth", "random"):
        vit, diffusion = full[f"vit_b16_224_{method}"], full[f"diffusion_{method}"]
        assert vit.metric_shape == full["vit_b16_224"].metric_shape and vit.channels == 768
        assert diffusion.metric_shape == full["diffusion"].metric_shape and diffusion.channels == 320
    assert full["diffusion_grid"].grid_size == (64, 64) and full["diffusion_grid"].r == 2048
    assert full["vit_b16_224_kth"].r == 98  # k = 2 of the 196 tokens after the class token
    assert {s.passes for s in GPU_SHAPES if s.method != "tome"} == {("fwd",)}


def test_same_group_ignores_row_numbers():
    plan = torch.tensor([[0, 1, 1, 2, 3]])
    # Token 0 merged elsewhere: rows 1.. shift, yet tokens 3 and 4 keep their groups.
    other = torch.tensor([[0, 0, 1, 1, 2]])
    assert same_group(plan, plan).all()
    assert same_group(plan, other).tolist() == [[False, False, False, False, True]]
    assert same_group(plan, torch.tensor([[0, 1, 2, 2, 3]])).tolist() == [[True, False, False, False, True]]


def test_peak_memory_sees_a_temporary():
    n = 4 * 1024 * 1024  # a 16 MiB float32 temporary, freed before returning a small output

    def step():
        temp = torch.ones(n)
        return (temp[:10].clone(),)

    peak, error = peak_extra_bytes(step, torch.device("cpu"))
    assert error is None
    assert 4 * n <= peak <= 4 * n + 4096


def test_peak_memory_excludes_outputs():
    peak, error = peak_extra_bytes(lambda: (torch.ones(1024, 1024),), torch.device("cpu"))
    assert error is None and peak < 4096


def test_rel_err():
    a = torch.tensor([3.0, 4.0])
    assert rel_err((a,), (a,)) == 0.0
    assert rel_err((a + torch.tensor([0.0, 0.5]),), (a,)) == pytest.approx(0.1)


def test_run_saves_raw_results(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    argv = ["--shapes", "vit_b16_224_b1", "--providers", "reference", "--reps", "3", "--warmup", "1",
            "--min-seconds", "0", "--copy-mib", "8", "--out", str(tmp_path)]
    run.main(argv)
    printed = capsys.readouterr().out
    assert "vit_b16_224_b1" in printed and "fwd+bwd" in printed
    assert widest_report_line(printed) <= MAX_WIDTH
    (path,) = tmp_path.iterdir()
    results = json.loads(path.read_text())
    assert results["benchmark"] == "kernels"
    assert results["device"]["type"] == "cpu" and results["versions"]["torch"] == torch.__version__
    assert "sha" in results["commit"] and results["copy_bandwidth"]["gbps"] > 0
    # The copy is measured before and after the rows; the faster is the ceiling.
    assert results["copy_bandwidth"]["gbps"] == max(c["gbps"] for c in results["copy_bandwidth_measurements"])
    assert len(results["copy_bandwidth_measurements"]) == 2
    m = results["machine"]
    assert m["cpu_count"] == os.cpu_count() and len(m["load_before"]) == len(m["load_after"]) == 3
    assert m["threads"] == {"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                            "env": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": None}}
    assert results["settings"]["spread"]["retries"] == RETRIES
    rows = results["rows"]
    assert [(r["pass"], r["status"]) for r in rows] == [("fwd", "ok"), ("fwd+bwd", "ok")]
    for r in rows:
        assert len(r["times_s"]) >= 3 and all(t > 0 for t in r["times_s"])
        assert r["median_s"] == statistics.median(r["times_s"])
        s = r["spread"]
        assert s["min_s"] == min(r["times_s"]) and s["max_s"] == max(r["times_s"]) and s["median_s"] == r["median_s"]
        assert s["min_s"] <= s["q1_s"] <= s["median_s"] <= s["q3_s"] <= s["max_s"]
        assert 1 <= r["attempts"] <= RETRIES + 1 and len(r["discarded_times_s"]) == r["attempts"] - 1
        assert isinstance(r["flags"], list) and r["first_call_s"] > 0
        assert r["speedup_vs_reference"] == 1.0 and r["rel_err_vs_reference"] == 0.0
        assert r["gbps"] == pytest.approx(r["min_bytes"] / r["median_s"] / 1e9)
        assert r["peak_extra_bytes"] is not None


def test_run_method_rows(tmp_path):
    """A method's shape gets the providers that apply to it (backends by name), forward
    only, checked against the reference's plan."""
    argv = ["--shapes", "vit_b16_224_kth", "--providers", "cpu", "reference", "reference_compiled", "triton_one_pass",
            "--reps", "3", "--warmup", "1", "--min-seconds", "0", "--copy-mib", "8", "--out", str(tmp_path)]
    results = run.run(run.parse_args(argv))
    assert [(r["shape"], r["method"], r["pass"], r["provider"], r["status"]) for r in results["rows"]] == [
        ("vit_b16_224_kth", "kth", "fwd", "cpu", "ok"), ("vit_b16_224_kth", "kth", "fwd", "reference", "ok")]
    cpu, ref = results["rows"]
    assert cpu["plan_agreement"] == 1.0 and cpu["rel_err_same_plan"] < 1e-6 and cpu["rel_err_vs_reference"] < 1e-6
    assert "plan_agreement" not in ref and ref["speedup_vs_reference"] == 1.0
    assert "100.00%" in run.format_table(results)
    shape = next(s for s in CPU_SHAPES if s.name == "vit_b16_224_kth")
    assert applies("cpu", shape) and not applies("reference_compiled", shape)


def test_run_rejects_unknown_names():
    with pytest.raises(SystemExit, match="unknown provider"):
        run.run(run.parse_args(["--providers", "nope"]))
    with pytest.raises(SystemExit, match="unknown shape"):
        run.run(run.parse_args(["--shapes", "nope", "--copy-mib", "1"]))


def compiled_rows(tmp_path, *shapes):
    """The reference_compiled rows of ``shapes``, forward, on the CPU (a few seconds each)."""
    argv = ["--device", "cpu", "--shapes", *shapes, "--providers", "reference_compiled", "--passes", "fwd",
            "--reps", "2", "--warmup", "0", "--min-seconds", "0", "--copy-mib", "1", "--out", str(tmp_path)]
    return run.run(run.parse_args(argv))


def test_compile_time_is_reported_apart(tmp_path, capsys):
    """Compiling takes minutes on a CPU: stderr says so while it runs, and the time goes to
    its own field and a line under the table, not into the timings."""
    results = compiled_rows(tmp_path, "vit_b16_224_b1")
    err = capsys.readouterr().err
    assert "compiling reference for vit_b16_224_b1 fwd ..." in err and "compiled in " in err
    (row,) = results["rows"]
    assert row["status"] == "ok" and row["first_call_s"] > 0
    # The compile is in the first call, not in any timed one.
    assert row["first_call_s"] > max(row["times_s"])
    table = run.format_table(results)
    cached = 1 if row["compile_cache_hits"] else 0
    assert f"Compile time of reference_compiled (its first call, not in the timings), {row['first_call_s']:.1f} s in " \
           f"all ({cached} of 1 from inductor's on-disk cache): vit_b16_224_b1 fwd {row['first_call_s']:.1f} s." \
           in " ".join(table.splitlines())


def test_each_compiled_row_is_timed_compiled(tmp_path):
    """Each row compiles its own graph. The CPU table's ten ToMe rows used to share one
    compiled function, and past dynamo's recompile limit (8) the diffusion rows ran eagerly
    while labelled "reference_compiled"; a limit of 1 makes that show from the second row."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=1):
        results = compiled_rows(tmp_path, "vit_b16_224_b1", "vit_h14_518")
    rows = [(r["shape"], r["status"], r.get("compiled_graphs")) for r in results["rows"]]
    assert rows == [("vit_b16_224_b1", "ok", 1), ("vit_h14_518", "ok", 1)]
    assert counters["stats"]["unique_graphs"] - before == 2


def test_a_compiled_row_run_eagerly_is_reported(tmp_path, monkeypatch):
    """A "compiled" step that compiles nothing (what dynamo does past its limit without
    fullgraph) is labelled an eager fallback, without timings."""
    monkeypatch.setattr(providers, "compiled_alone", lambda fn: fn)
    results = compiled_rows(tmp_path, "vit_b16_224_b1")
    (row,) = results["rows"]
    assert (row["status"], row["compiled_graphs"]) == ("eager fallback", 0) and "times_s" not in row
    table = run.format_table(results)
    assert "| reference_compiled | eager fallback [1] |" in table
    assert "[1] reference_compiled: torch.compile compiled 0 graphs" in table


def test_a_compiled_row_past_the_recompile_limit_fails(tmp_path):
    """With fullgraph, reaching dynamo's recompile limit is an error row, not eager timings."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=0):
        (row,) = compiled_rows(tmp_path, "vit_b16_224_b1")["rows"]
    assert row["status"] == "error" and "recompile" in row["reason"].lower() and "times_s" not in row
