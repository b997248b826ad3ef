"""benchmarks.e2e_dit (SD3 and Flux transformers, unpatched and through patch.diffusion with each
scheme) measures what it says, on its --tiny configs: 64 image tokens at a 16 x 16 latent, 5 text
tokens, 2 heads."""

import json

import pytest

from benchmarks import e2e_dit, e2e_vit
from benchmarks.report import MAX_WIDTH
from tests.helpers import widest_report_line

pytest.importorskip("diffusers")

FAST = ["--tiny", "--device", "cpu", "--reps", "2", "--warmup", "0", "--retries", "0", "--ratios", "0.5"]


def test_the_models_are_the_named_ones():
    """SD3-medium's width with 3 joint blocks; Flux's head_dim and rotary axes, 1 double + 2 single
    blocks, 24 heads on a GPU and 8 on a CPU; both at a 64 x 64 latent: 1024 image tokens."""
    sd3, flux = e2e_dit.MODELS["sd3"], e2e_dit.MODELS["flux"]
    c = sd3.resolved(on_gpu=False)
    assert c["num_attention_heads"] * c["attention_head_dim"] == 1536 == c["caption_projection_dim"]
    assert (c["joint_attention_dim"], c["pooled_projection_dim"], c["qk_norm"], c["num_layers"]) == (4096, 2048, None,
                                                                                                     3)
    assert sd3.image_tokens() == flux.image_tokens() == 1024
    assert (sd3.text_tokens, flux.text_tokens) == (333, 512)
    assert flux.resolved(on_gpu=True)["num_attention_heads"] * 128 == 3072
    assert flux.resolved(on_gpu=False)["attention_head_dim"] == 128
    assert tuple(flux.config["axes_dims_rope"]) == (16, 56, 56) and flux.num_blocks() == 3


def test_main_on_tiny_models(tmp_path, capsys):
    results = e2e_dit.main(FAST + ["--schemes", "merge", "kv", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert widest_report_line(printed) <= MAX_WIDTH
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("e2e_dit_cpu_")
    saved = json.loads(path.read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"])) and saved["complete"]
    assert saved["benchmark"] == "e2e_dit" and saved["device"]["type"] == "cpu"
    assert {"versions", "commit", "machine", "settings"} <= set(saved)
    assert saved["machine"]["load_after"] is None or len(saved["machine"]["load_after"]) == 3
    for model, blocks in (("sd3", 2), ("flux", 3)):
        rows = {r["variant"]: r for r in saved["rows"] if r["model"] == model}
        assert list(rows) == ["unpatched", "merge", "kv"] and all(r["status"] == "ok" for r in rows.values())
        unpatched = rows["unpatched"]
        assert unpatched["rel_l2_vs_unpatched"] == 0 and unpatched["r_per_block"] == [0] * blocks
        assert unpatched["attn_keys_per_block"] == [5 + 64] * blocks
        for r in rows.values():
            assert len(r["times_s"]) >= 2 and r["median_s"] > 0 and r["spread"]["n"] == len(r["times_s"])
            assert r["speedup_vs_unpatched"] == pytest.approx(unpatched["median_s"] / r["median_s"])
            assert r["sdpa_calls"] == blocks and 0 < r["attn_share"] <= 1
        for variant in ("merge", "kv"):
            r = rows[variant]
            assert r["ratio"] == 0.5 and r["scheme"] == variant and r["r_per_block"] == [32] * blocks
            assert r["attn_keys_per_block"] == [5 + 64 - 32] * blocks
            assert r["attn_queries_per_block"] == [5 + 64 - (32 if variant == "merge" else 0)] * blocks
            assert 0 < r["rel_l2_vs_unpatched"] < 1
            assert f"| {model} | 2 | {variant} | 0.5 | 32 |" in printed


def test_rows_past_the_deadline_are_recorded_as_skipped(capsys):
    results = e2e_dit.main(FAST + ["--models", "sd3", "--schemes", "kv", "--deadline-s", "0", "--no-save"])
    assert [(r["variant"], r["status"]) for r in results["rows"]] == [("unpatched", "skipped"), ("kv", "skipped")]
    assert "| sd3 | 2 | unpatched | 0 | skipped [1] |" in " ".join(capsys.readouterr().out.split())


def test_reachable_from_e2e_vit(capsys):
    results = e2e_vit.main(["--dit"] + FAST + ["--models", "sd3", "--schemes", "kv", "--deadline-s", "0",
                                               "--no-save"])
    assert results["benchmark"] == "e2e_dit" and len(results["rows"]) == 2


def test_attention_share_on_a_gpu_counts_each_kernel_once():
    """A profile on a GPU lists each kernel twice: as a device event, and attached to the CPU op that
    launched it. The share counts the SDPA op's kernels over the device events only."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, device_type, device_us, cpu_us=0.0):
        return SimpleNamespace(name=name, device_type=device_type, device_time_total=device_us, cpu_time_total=cpu_us)

    events = [event(e2e_dit.SDPA_OP, DeviceType.CPU, 30.0, 40.0), event("flash_kernel", DeviceType.CUDA, 30.0),
              event("aten::mm", DeviceType.CPU, 70.0, 10.0), event("gemm_kernel", DeviceType.CUDA, 70.0)]
    gpu = e2e_dit.attention_share(events, wall=1.0, on_gpu=True)
    assert gpu["attn_share"] == pytest.approx(0.3) and gpu["sdpa_calls"] == 1
    cpu = e2e_dit.attention_share(events, wall=1e-4, on_gpu=False)
    assert cpu["attn_share"] == pytest.approx(0.4) and cpu["profiled_total_s"] == 1e-4


def test_help_prints(capsys):
    """argparse formats every help string with %: a bare percent sign made --help crash."""
    with pytest.raises(SystemExit) as done:
        e2e_dit.parse_args(["--help"])
    assert done.value.code == 0 and "--model-warmup" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--batch", "0"], ["--reps", "0"], ["--ratios", "0"], ["--models", "nope"]])
def test_bad_arguments_are_usage_errors(bad, capsys):
    """Refused, not replaced by a default (--batch 0 once ran the default batch)."""
    with pytest.raises(SystemExit) as done:
        e2e_dit.parse_args(bad)
    assert done.value.code == 2 and bad[0] in capsys.readouterr().err
