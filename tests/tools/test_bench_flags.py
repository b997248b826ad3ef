"""The benchmark tables stay honest: a wide spread is measured again, then flagged; an
impossible bandwidth and a ratio over an unsteady baseline are flagged; a steady row is not;
every table fits 120 columns; a provider that cannot run is named once; a plain run's results
go where git does not see them."""

import os
import subprocess

import pytest

from benchmarks import e2e_vit, minilm, report, run, spread
from benchmarks.providers import TRITON_PATHS, applies, provider_names
from benchmarks.shapes import GPU_SHAPES
from benchmarks.spread import BUSY_SHARE, FUTILE_STREAK, RETRIES, SLOW_MEDIAN, WIDE_IQR, measure_steadily

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Ten calls of about 1 ms, the middle half within 4% of each other: a quiet machine.
STEADY = [1.00e-3, 1.01e-3, 0.99e-3, 1.02e-3, 1.00e-3, 0.98e-3, 1.03e-3, 1.01e-3, 0.99e-3, 1.00e-3]
# Half the calls slowed 3x by something else: wide by both measures.
BUSY = [1e-3, 3e-3, 1e-3, 3e-3, 1e-3, 3e-3, 1e-3, 3e-3, 3e-3, 3e-3]


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """No other process takes CPU time, unless a test says otherwise: the busy check reads
    the real machine, which may be busy while these tests run."""
    monkeypatch.setattr(spread, "others_cpu_share", lambda before, after: 0.0)


def replay(*attempts):
    """A measure() that returns one attempt's timings per call, counting the calls."""
    calls = []

    def measure():
        calls.append(None)
        return [list(attempts[len(calls) - 1])]

    return measure, calls


def test_spread_of_known_timings():
    s = spread.spread([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["min_s"], s["q1_s"], s["median_s"], s["q3_s"], s["max_s"]) == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert s["iqr_rel"] == pytest.approx(2 / 3) and s["median_over_min"] == 3.0 and s["n"] == 5


def test_thresholds_sit_between_steady_and_busy_timings():
    steady, busy = spread.spread(STEADY), spread.spread(BUSY)
    assert steady["iqr_rel"] < WIDE_IQR and steady["median_over_min"] < SLOW_MEDIAN
    assert busy["iqr_rel"] > WIDE_IQR and busy["median_over_min"] > SLOW_MEDIAN
    # Either measure alone flags: a few fast calls among slow ones (narrow IQR, median far
    # above the fastest), or a middle half spread widely.
    assert spread.timing_flags([1e-3] + [2.5e-3] * 9) == ["spread"]
    assert spread.timing_flags([1.0, 1.0, 1.0, 1.8, 1.8, 1.8]) == ["spread"]


def test_a_steady_row_is_measured_once_and_not_flagged():
    measure, calls = replay(STEADY)
    (timed,) = measure_steadily(measure)
    assert len(calls) == 1 and timed["flags"] == [] and timed["attempts"] == 1
    assert timed["times_s"] == STEADY and timed["discarded_times_s"] == []


def test_a_wide_row_is_measured_again_and_the_steady_attempt_kept():
    measure, calls = replay(BUSY, STEADY)
    (timed,) = measure_steadily(measure)
    assert len(calls) == 2 and timed["flags"] == [] and timed["times_s"] == STEADY
    assert timed["discarded_times_s"] == [BUSY]


def test_a_row_that_stays_wide_is_flagged_after_the_retries():
    measure, calls = replay(*[BUSY] * (RETRIES + 1))
    (timed,) = measure_steadily(measure)
    assert len(calls) == RETRIES + 1 and timed["flags"] == ["spread"] and timed["attempts"] == RETRIES + 1
    measure, calls = replay(BUSY)
    assert measure_steadily(measure, retries=0)[0]["flags"] == ["spread"] and len(calls) == 1


def test_other_processes_taking_the_cpus_flag_a_row(monkeypatch):
    monkeypatch.setattr(spread, "others_cpu_share", lambda before, after: BUSY_SHARE + 0.1)
    measure, calls = replay(*[STEADY] * (RETRIES + 1))
    (timed,) = measure_steadily(measure)
    # A narrow spread does not clear it: a row timed beside other work ran 100x slower, steadily.
    assert timed["flags"] == ["busy"] and len(calls) == RETRIES + 1
    assert timed["others_cpu_share"] == pytest.approx(BUSY_SHARE + 0.1)
    # Where the share cannot be told (no /proc/stat, a window too short), nothing is flagged.
    monkeypatch.setattr(spread, "others_cpu_share", lambda before, after: None)
    assert measure_steadily(replay(STEADY)[0])[0]["flags"] == []


def test_a_machine_that_stays_busy_stops_the_retries_until_a_row_is_steady():
    steady = spread.Steadiness(RETRIES)
    for _ in range(FUTILE_STREAK):
        measure, calls = replay(*[BUSY] * (RETRIES + 1))
        (timed,) = steady.measure(measure)
        assert len(calls) == RETRIES + 1 and timed["retries_allowed"] == RETRIES
    # Measured once, and flagged: retrying would triple the run for nothing.
    measure, calls = replay(BUSY, STEADY)
    (timed,) = steady.measure(measure)
    assert len(calls) == 1 and timed["flags"] == ["spread"] and timed["retries_allowed"] == 0
    # A steady row ends the streak: the next wide row gets its retries again.
    measure, calls = replay(STEADY)
    assert steady.measure(measure)[0]["flags"] == [] and len(calls) == 1
    measure, calls = replay(BUSY, STEADY)
    (timed,) = steady.measure(measure)
    assert len(calls) == 2 and timed["flags"] == [] and timed["retries_allowed"] == RETRIES
    # An impossible bandwidth (a row in cache) is no sign of a busy machine: no streak from it.
    steady = spread.Steadiness(RETRIES)
    for _ in range(FUTILE_STREAK + 1):
        measure, calls = replay(*[STEADY] * (RETRIES + 1))
        steady.measure(measure, impossible=lambda median: ["bandwidth"])
        assert len(calls) == RETRIES + 1


def test_the_table_says_which_rows_were_measured_again():
    rows = [{"flags": [], "attempts": 2, "retries_allowed": RETRIES},
            {"flags": ["spread"], "attempts": 1, "retries_allowed": 0},
            {"flags": [], "attempts": 1, "retries_allowed": RETRIES}, {"status": "unavailable"}]
    lines = spread.legend(rows, spread.settings(RETRIES))
    assert lines[-1] == (f"Measured again: 1 of 3 timed rows (up to {RETRIES} more times each; the steadiest "
                         f"attempt is kept, the others are in the JSON); 1 measured once, after {FUTILE_STREAK} rows "
                         "in a row had stayed S or L through their retries.")
    assert spread.legend([{"flags": [], "attempts": 1, "retries_allowed": RETRIES}]) == []


def test_cases_timed_together_are_measured_again_together():
    attempts = [[STEADY, BUSY], [STEADY, STEADY]]
    calls = []

    def measure():
        calls.append(None)
        return attempts[len(calls) - 1]

    base, method = measure_steadily(measure)
    assert len(calls) == 2 and base["flags"] == method["flags"] == [] and method["times_s"] == STEADY


def kernels_row(provider, median_s, times=None, min_bytes=10**6, shape="vit_b16_224", batch=32, copy_gbps=4000.0,
                **extra):
    """A timed row as run._measure leaves it, with its bandwidth against ``copy_gbps``."""
    times = times or [median_s * t / 1e-3 for t in STEADY]
    row = {"shape": shape, "batch": batch, "pass": "fwd", "provider": provider, "status": "ok", "times_s": times,
           "median_s": median_s, "spread": spread.spread(times), "flags": spread.timing_flags(times),
           "min_bytes": min_bytes, "peak_extra_bytes": 2 * 10**6, "rel_err_vs_reference": 0.0, **extra}
    run._add_bandwidth(row, {"gbps": copy_gbps})
    return row


def test_impossible_bandwidth_is_flagged_and_a_normal_one_is_not():
    fast = kernels_row("cpu", 50e-6, copy_gbps=10.0)  # 1 MB in 50 us: 20 GB/s, twice the copy
    normal = kernels_row("cpu", 1e-3, copy_gbps=10.0)  # 1 GB/s
    assert fast["flags"] == ["bandwidth"] and fast["fraction_of_copy_bw"] == pytest.approx(2.0)
    assert normal["flags"] == [] and normal["fraction_of_copy_bw"] == pytest.approx(0.1)
    # Decided against the final copy ceiling: a faster copy measured at the end clears the flag.
    run._add_bandwidth(fast, {"gbps": 40.0})
    assert fast["flags"] == []


def test_impossible_bandwidth_is_measured_again_first():
    measure, calls = replay(STEADY, STEADY, STEADY)
    (timed,) = measure_steadily(measure, impossible=lambda median: ["bandwidth"])
    assert len(calls) == RETRIES + 1 and timed["flags"] == ["bandwidth"]


def test_a_speedup_over_an_unsteady_reference_is_flagged():
    rows = [kernels_row("cpu", 1e-3), kernels_row("reference", 5e-3, times=[t * 5 for t in BUSY])]
    run._add_speedups(rows, "vit_b16_224", "fwd")
    cpu, ref = rows
    assert ref["flags"] == ["spread"] and cpu["flags"] == ["baseline"]
    low, high = cpu["speedup_iqr_range"]
    assert low < cpu["speedup_vs_reference"] < high
    steady = [kernels_row("cpu", 1e-3), kernels_row("reference", 5e-3)]
    run._add_speedups(steady, "vit_b16_224", "fwd")
    assert steady[0]["flags"] == [] and steady[0]["speedup_vs_reference"] == pytest.approx(5.0)


def kernels_results(rows):
    return {"device": {"name": "NVIDIA H200", "type": "cuda"}, "versions": {"torch": "2.13.0+cu130"},
            "settings": {"dtype": "bfloat16", "spread": spread.settings(RETRIES)},
            "copy_bandwidth": {"gbps": 4000.0, "times_s": [1.0] * 100},
            "machine": {"cpu_count": 16, "usable_cpus": 16, "load_before": [12.25, 1, 1], "load_after": [15.5, 1, 1],
                        "threads": {"torch": 16, "interop": 16,
                                    "env": {"OMP_NUM_THREADS": None, "MKL_NUM_THREADS": "1"}}},
            "rows": rows}


def unavailable(provider, shape, reason):
    return {"shape": shape, "batch": 256, "pass": "fwd", "provider": provider, "status": "unavailable",
            "reason": reason}


def widest_kernels_rows():
    """Rows with the longest names that meet (a ToMe shape with every provider and both passes;
    the other methods' shapes, forward, with the backends and a "same groups" share) and the
    widest figures: 12 s, 12346 GB/s at 1767% of the copy, a 1299x speed-up, 905 MB extra,
    a spread of 1089%, every flag a kernels row can carry."""
    rows = []
    for shape in GPU_SHAPES:
        for provider in [p for p in provider_names() if applies(p, shape)] + list(TRITON_PATHS):
            if not applies(provider, shape):
                continue
            times = [12.3456 * t for t in (0.1, 0.1, 1.0, 10.99, 10.99)]
            row = kernels_row(provider, 12.3456, times=times, min_bytes=int(12345.6e9 * 12.3456), shape=shape.name,
                              batch=256, copy_gbps=698.8, peak_extra_bytes=904.64e6, rel_err_vs_reference=1.2345e-7,
                              **({} if shape.method == "tome" else {"plan_agreement": 0.9999}))
            row.update(flags=["spread", "busy", "bandwidth", "baseline"], speedup_vs_reference=1299.25,
                       **{"pass": shape.passes[-1]})
            rows.append(row)
    error = {**rows[0], "provider": "reference_compiled", "status": "eager fallback",
             "reason": "torch.compile compiled 0 graphs for this row, not 1"}
    return rows + [error]


def assert_fits(text):
    for line in text.splitlines():
        assert len(line) <= report.MAX_WIDTH, f"{len(line)} columns: {line}"


def test_kernels_table_fits_and_explains_its_flags():
    rows = widest_kernels_rows() + [unavailable("cuda", "vit_b16_224_random", "x " * 100)]
    assert any(r["provider"] == "triton_multi_kernel" and r["pass"] == "fwd+bwd" for r in rows)
    text = run.format_table(kernels_results(rows))
    assert_fits(text)
    lines = text.splitlines()
    assert lines[0].startswith("device: NVIDIA H200")  # scripts/gpu_checks.py finds the table by it
    assert "load (1-minute average) 12.25 before, 15.50 after, on 16 CPUs" in text
    assert "OMP_NUM_THREADS=unset, MKL_NUM_THREADS=1" in text
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == len(rows) + 1 and all(line.count("|") == len(run.HEADER) + 1 for line in table)
    assert "| 1089% | 12346 (1767%) | 1299x |" in table[2] and "| SLBR |" in table[2]
    assert "eager fallback [1]" in table[-1]
    for flag in ("spread", "busy", "bandwidth", "baseline"):
        mark, meaning = spread.FLAGS[flag]
        assert any(line.startswith(f"{mark}: {meaning.format(**spread.settings(RETRIES))[:40]}") for line in lines)
    assert not any(line.startswith("M: ") for line in lines)  # only the flags some row carries are explained
    assert "[1] reference_compiled: torch.compile compiled 0 graphs" in text


def test_e2e_and_minilm_tables_fit():
    # The widest figures a row can have: 11.5 s a pass (ViT-L on a busy CPU), 1234.5 images/s
    # (a GPU), 12.34x, merges past the forward time (flagged M).
    row = {"model": "vit_b16_224", "batch": 256, "provider": "tome_reference", "r": 16, "status": "ok",
           "times_s": [11.4916] * 3, "median_s": 11.4916, "spread": spread.spread([11.4916] * 3),
           "images_per_s": 1234.5, "speedup_vs_unpatched": 12.34, "speedup_vs_tome_reference": 12.34,
           "merge_s": 14.18, "merge_share": 1.234, "tokens_last_block": 197,
           "logits_max_abs_diff_vs_tome_reference": 1.2345e-05, "flags": ["spread", "busy", "baseline", "merge_share"]}
    results = {"device": {"name": "NVIDIA H200", "type": "cuda"}, "versions": {"torch": "2.13.0+cu130"},
               "settings": {"dtype": "float16", "reps": 30, "compile": True}, "rows": [row]}
    assert_fits(e2e_vit.format_table(results))
    mini = {"r_per_layer": 16, "method": "pitome_paper", "width_last_layer": [130, 128],
            "real_tokens_last_layer_mean": 123.4,
            "cosine_mean": 0.1234, "cosine_min": -0.1234, "cosines": [0.5], "cosines_alone": [0.5],
            "times_s": [1.2345] * 3, "median_s": 12.345, "unpatched_times_s": [1.2345] * 3,
            "unpatched_median_s": 12.345, "speedup_vs_unpatched": 12.34, "flags": list(spread.FLAGS)}
    results = {"device": {"name": "NVIDIA H200", "type": "cuda"}, "versions": {"torch": "2.13.0+cu130"},
               "settings": {"backend_used": "triton"},
               "sentences": {"count": 64, "batch_widths": [30, 28], "real_tokens": [16.5]}, "rows": [mini]}
    assert_fits(minilm.format_table(results))


def test_a_provider_that_cannot_run_is_named_once():
    why_triton = "it runs CUDA tensors; CPU tensors only in Triton's interpreter"
    rows = [kernels_row("cpu", 1e-3, shape=s) for s in ("vit_b16_224", "vit_l16_512", "diffusion")]
    for s in ("vit_b16_224", "vit_l16_512", "diffusion"):
        rows += [unavailable(p, s, why_triton) for p in ("triton", "triton_one_pass")]
        rows.append(unavailable("cuda", s, "no CUDA"))
    text = run.format_table(kernels_results(rows))
    assert text.count(why_triton) == 1 and text.count("no CUDA") == 1
    assert f"Not run here: triton, triton_one_pass: {why_triton}." in text and "Not run here: cuda: no CUDA." in text
    assert not any(line.startswith("|") and ("triton" in line or "cuda" in line) for line in text.splitlines())
    # One that ran on some rows is named with the rows it missed.
    rows.append(unavailable("cpu", "diffusion_pitome", "too few tokens"))
    assert "Not run here: cpu (diffusion_pitome fwd): too few tokens." in run.format_table(kernels_results(rows))


@pytest.mark.parametrize("module", [run, minilm, e2e_vit])
def test_a_plain_run_saves_where_git_does_not_look(module):
    assert report.output_dir(module.parse_args([])) == report.LOCAL_DIR
    assert report.output_dir(module.parse_args(["--save-record"])) == report.RECORD_DIR
    assert report.output_dir(module.parse_args(["--out", "/tmp/x"])) == "/tmp/x"
    with pytest.raises(SystemExit):
        module.parse_args(["--save-record", "--out", "/tmp/x"])


def test_the_local_results_folder_is_ignored_and_the_record_is_not():
    def ignored(path):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True)
        assert proc.returncode in (0, 1), proc.stderr
        return proc.returncode == 0

    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    assert ignored(os.path.relpath(os.path.join(report.LOCAL_DIR, "cpu_x_20260101T000000Z.json"), ROOT))
    assert not ignored(os.path.relpath(os.path.join(report.RECORD_DIR, "cpu_x_20260101T000000Z.json"), ROOT))
