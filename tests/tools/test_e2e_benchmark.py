"""The end-to-end ViT benchmark measures what it says, on a two-block ViT small enough for CI."""

import json
import os
import statistics

import pytest
import torch

import tome_kernels
import tome_kernels.patch
from benchmarks import e2e_vit
from benchmarks.report import MAX_WIDTH
from benchmarks.spread import RETRIES
from tests.helpers import widest_report_line
from tome_kernels.backends import select_backend

# 64 x 64 images in 16 x 16 patches: 16 patches + the class token = 17 tokens. r = 4 merges
# 17 -> 13 in block 0 and 13 -> 9 in block 1 (neither clamped: (13 - 1) // 2 = 6 >= 4).
TINY = e2e_vit.ModelSpec("vit_tiny_patch16_224", 64, r=4, gpu_batch=3, cpu_batch=3,
                         kwargs={"img_size": 64, "depth": 2})


@pytest.fixture
def tiny_table(monkeypatch):
    monkeypatch.setattr(e2e_vit, "MODELS", {"tiny": TINY})


def test_expected_tokens():
    # ViT-B/16@224 with r = 16: the last block is clamped to (21 - 1) // 2 = 10.
    assert e2e_vit.expected_tokens(197, [16] * 12, protected=1) == 11
    # ViT-L/16@512 with r = 40: 24 unclamped merges of 40.
    assert e2e_vit.expected_tokens(1025, [40] * 24, protected=1) == 65
    assert e2e_vit.expected_tokens(17, [4, 4], protected=1) == 9
    assert e2e_vit.expected_tokens(5, [0, 3, 3], protected=1) == 2  # 5 -> 3 -> 2 -> 2 (r clamped to 0)


def test_recorded_merge_inputs_reproduce_the_forward_pass():
    model = e2e_vit.build_model(TINY, torch.device("cpu"), torch.float32, seed=0)
    tome_kernels.patch.timm(model, TINY.r, backend="reference")
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        output, calls = e2e_vit.record_merges(model, images)
        state = tome_kernels.patch.get_state(model)
        assert "merge" not in vars(state)  # the recording wrapper is gone
        assert torch.equal(output, model(images))  # recording leaves the forward pass as it was
        assert [c["x"].shape[1] for c in calls] == [17, 13] and [c["r"] for c in calls] == [4, 4]
        assert calls[0]["size"] is None and calls[0]["keys"].shape == (2, 3, 17, 64)
        # Re-running block 0's merge alone gives the sizes block 1 received.
        _, size = tome_kernels.bipartite_merge(calls[0]["x"], calls[0]["keys"], 4, None, class_token=True,
                                               backend="reference")
        assert torch.equal(size, calls[1]["size"])
        times = e2e_vit.time_merges(calls, state, "reference", torch.device("cpu"), warmup=0, reps=2)
    assert len(times) == 2 and all(len(t) >= 2 and min(t) > 0 for t in times)


def test_main_on_a_tiny_vit(tiny_table, tmp_path, capsys):
    auto = select_backend("auto", [torch.empty(1, 4, 8)]).name
    results = e2e_vit.main(["--device", "cpu", "--models", "tiny", "--reps", "2", "--merge-reps", "2",
                            "--min-seconds", "0", "--providers", "unpatched", "reference", "auto", f"tome_{auto}",
                            "triton", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert widest_report_line(printed) <= MAX_WIDTH

    (path,) = tmp_path.iterdir()
    assert path.name.startswith("e2e_cpu_") and path.suffix == ".json"
    saved = json.loads(path.read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert saved["versions"]["torch"] == torch.__version__ and "sha" in saved["commit"]
    assert saved["settings"]["reps"] == 2 and saved["arguments"]["models"] == ["tiny"]
    assert saved["benchmark"] == "e2e_vit" and saved["settings"]["spread"]["retries"] == RETRIES
    m = saved["machine"]
    assert m["cpu_count"] == os.cpu_count() and len(m["load_before"]) == 3 and m["threads"]["torch"] > 0
    assert set(m["threads"]["env"]) == {"OMP_NUM_THREADS", "MKL_NUM_THREADS"}

    rows = {r["provider"]: r for r in saved["rows"]}
    # "auto" and "tome_<its pick>" are one provider; triton cannot run CPU tensors for timing.
    expected = ["unpatched", "tome_reference"] + ([f"tome_{auto}"] if auto != "reference" else []) + ["tome_triton"]
    assert list(rows) == expected
    assert rows["tome_triton"]["status"] == "unavailable" and rows["tome_triton"]["reason"]
    # Named once, under the table, not on a row.
    assert f"Not run here: tome_triton: {rows['tome_triton']['reason']}" in " ".join(printed.splitlines())
    assert "| tome_triton |" not in printed
    ok = [r for r in saved["rows"] if r["status"] == "ok"]
    assert [r["provider"] for r in ok] == expected[:-1]

    unpatched, ref = rows["unpatched"], rows["tome_reference"]
    for r in ok:
        assert r["batch"] == 3 and len(r["times_s"]) >= 2 and min(r["times_s"]) > 0
        assert r["median_s"] == statistics.median(r["times_s"])
        assert r["spread"]["min_s"] == min(r["times_s"]) and r["spread"]["max_s"] == max(r["times_s"])
        assert isinstance(r["flags"], list) and 1 <= r["attempts"] <= RETRIES + 1
        assert r["images_per_s"] == pytest.approx(3 / r["median_s"])
        assert r["speedup_vs_unpatched"] == pytest.approx(unpatched["median_s"] / r["median_s"])
        assert f"| tiny | 3 | {r['provider']} | {r['r']} |" in printed
    for r in ok[1:]:
        assert r["speedup_vs_tome_reference"] == pytest.approx(ref["median_s"] / r["median_s"])
    assert "merge_s" not in unpatched and unpatched["speedup_vs_unpatched"] == 1.0
    assert unpatched["r"] == 0 and unpatched["speedup_vs_tome_reference"] is None

    for r in ok[1:]:
        assert r["r_per_block"] == [4, 4] and r["tokens_per_block"] == [17, 13]
        assert r["tokens_in"] == 17 and r["tokens_last_block"] == r["tokens_expected"] == 9
        assert len(r["merge_times_s"]) == 2
        assert r["merge_s"] == pytest.approx(sum(statistics.median(t) for t in r["merge_times_s"]))
        # On a tiny model on a busy machine the merges timed alone can take longer than the
        # whole pass: flagged then, never printed as a plain share over 100%.
        assert r["merge_share"] > 0 and (r["merge_share"] < 1) == ("merge_share" not in r["flags"])
        assert r["merge_share"] == pytest.approx(r["merge_s"] / r["median_s"])
        assert r["logits_max_abs"] > 0
        # The kernels compute the reference's contract: float32 logits agree to rounding.
        assert r["logits_max_abs_diff_vs_tome_reference"] <= 1e-4 * r["logits_max_abs"]
    assert ref["logits_max_abs_diff_vs_tome_reference"] == 0.0
    assert ref["logits_max_abs_diff_vs_unpatched"] > 0  # merging tokens changes the output


def test_r_sweep(tiny_table, tmp_path):
    """Each ToMe provider runs at every r of the sweep, compared with ToMe through reference at
    the same r; the unpatched model is the r = 0 point, once."""
    args = ["--device", "cpu", "--models", "tiny", "--reps", "2", "--merge-reps", "2", "--min-seconds", "0",
            "--retries", "0", "--providers", "unpatched", "reference", "cpu", "--no-save"]
    assert e2e_vit.r_values(TINY, e2e_vit.parse_args(args)) == [4]
    assert e2e_vit.r_values(TINY, e2e_vit.parse_args(args + ["--sweep", "0", "2"])) == [2, 4]
    assert e2e_vit.r_values(e2e_vit.MODELS["tiny"], e2e_vit.parse_args(args + ["--r", "3", "--sweep"])) == [3]
    results = e2e_vit.run(e2e_vit.parse_args(args + ["--sweep", "2"]))
    rows = [(r["provider"], r["r"]) for r in results["rows"]]
    assert rows == [("unpatched", 0), ("tome_reference", 2), ("tome_cpu", 2), ("tome_reference", 4), ("tome_cpu", 4)]
    by = {(r["provider"], r["r"]): r for r in results["rows"]}
    for r in (2, 4):
        cpu, ref = by[("tome_cpu", r)], by[("tome_reference", r)]
        assert cpu["speedup_vs_tome_reference"] == pytest.approx(ref["median_s"] / cpu["median_s"])
        assert cpu["r_per_block"] == [r, r] and cpu["tokens_last_block"] == 17 - 2 * r


def test_default_r_values():
    """ViT-B/16 at r = 4, 8, 12 and its own 16 (the plot's sweep); ViT-L/16 at its r alone."""
    default = e2e_vit.parse_args([])
    assert e2e_vit.r_values(e2e_vit.MODELS["vit_b16_224"], default) == [4, 8, 12, 16]
    assert e2e_vit.r_values(e2e_vit.MODELS["vit_l16_512"], default) == [40]


def test_rejects_unknown_names(tiny_table):
    with pytest.raises(SystemExit, match="unknown provider"):
        e2e_vit.run(e2e_vit.parse_args(["--device", "cpu", "--providers", "nope"]))
    with pytest.raises(SystemExit, match="unknown model"):
        e2e_vit.run(e2e_vit.parse_args(["--device", "cpu", "--models", "vit_b16_224"]))
