"""The end-to-end ViT benchmark measures what it says, on a two-block ViT small enough for CI."""

import json
import statistics

import pytest
import torch

import tome_kernels
import tome_kernels.patch
from benchmarks import e2e_vit
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

    (path,) = tmp_path.iterdir()
    assert path.name.startswith("e2e_cpu_") and path.suffix == ".json"
    saved = json.loads(path.read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert saved["versions"]["torch"] == torch.__version__ and "sha" in saved["commit"]
    assert saved["settings"]["reps"] == 2 and saved["arguments"]["models"] == ["tiny"]

    rows = {r["provider"]: r for r in saved["rows"]}
    # "auto" and "tome_<its pick>" are one provider; triton cannot run CPU tensors for timing.
    expected = ["unpatched", "tome_reference"] + ([f"tome_{auto}"] if auto != "reference" else []) + ["tome_triton"]
    assert list(rows) == expected
    assert rows["tome_triton"]["status"] == "unavailable" and rows["tome_triton"]["reason"]
    ok = [r for r in saved["rows"] if r["status"] == "ok"]
    assert [r["provider"] for r in ok] == expected[:-1]

    unpatched, ref = rows["unpatched"], rows["tome_reference"]
    for r in ok:
        assert r["batch"] == 3 and len(r["times_s"]) >= 2 and min(r["times_s"]) > 0
        assert r["median_s"] == statistics.median(r["times_s"])
        assert r["images_per_s"] == pytest.approx(3 / r["median_s"])
        assert r["speedup_vs_unpatched"] == pytest.approx(unpatched["median_s"] / r["median_s"])
        assert r["speedup_vs_tome_reference"] == pytest.approx(ref["median_s"] / r["median_s"])
        assert f"| tiny | 3 | {r['provider']} |" in printed
    assert "merge_s" not in unpatched and unpatched["speedup_vs_unpatched"] == 1.0

    for r in ok[1:]:
        assert r["r_per_block"] == [4, 4] and r["tokens_per_block"] == [17, 13]
        assert r["tokens_in"] == 17 and r["tokens_last_block"] == r["tokens_expected"] == 9
        assert len(r["merge_times_s"]) == 2
        assert r["merge_s"] == pytest.approx(sum(statistics.median(t) for t in r["merge_times_s"]))
        assert 0 < r["merge_share"] < 1
        assert r["merge_share"] == pytest.approx(r["merge_s"] / r["median_s"])
        assert r["logits_max_abs"] > 0
        # The kernels compute the reference's contract: float32 logits agree to rounding.
        assert r["logits_max_abs_diff_vs_tome_reference"] <= 1e-4 * r["logits_max_abs"]
    assert ref["logits_max_abs_diff_vs_tome_reference"] == 0.0
    assert ref["logits_max_abs_diff_vs_unpatched"] > 0  # merging tokens changes the output


def test_rejects_unknown_names(tiny_table):
    with pytest.raises(SystemExit, match="unknown provider"):
        e2e_vit.run(e2e_vit.parse_args(["--device", "cpu", "--providers", "nope"]))
    with pytest.raises(SystemExit, match="unknown model"):
        e2e_vit.run(e2e_vit.parse_args(["--device", "cpu", "--models", "vit_b16_224"]))
