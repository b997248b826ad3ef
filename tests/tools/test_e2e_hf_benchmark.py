"""The end-to-end benchmark's transformers rows (CLIP's vision tower, DINOv2 with registers) measure
what they say, on two-layer models small enough for CI. FlexAttention runs eagerly here: its
compile takes tens of seconds on the 2-core CPU (tests/patch/test_prop_attention.py covers it)."""

import json
import statistics

import pytest
import torch

import tome_kernels.patch
from benchmarks import e2e_vit
from benchmarks.e2e_models import HF_MODELS, HFModelSpec, forced_prop_attention
from benchmarks.report import MAX_WIDTH
from tests.helpers import widest_report_line
from tome_kernels.backends import select_backend
from tome_kernels.patch import prop_attention

pytest.importorskip("transformers")

# 64 x 64 images in 16 x 16 patches: 16 patches + [CLS] = 17 tokens (DINOv2: + 4 registers, which
# never merge). r = 4 merges 17 -> 13 -> 9 matched tokens in the two layers, no clamp.
TINY = {
    "tiny_clip": HFModelSpec("CLIPVisionModel", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                 "num_attention_heads": 2, "patch_size": 16, "image_size": 64},
                             64, r=4, gpu_batch=3, cpu_batch=3),
    "tiny_dinov2_reg": HFModelSpec("Dinov2WithRegistersModel", {"hidden_size": 32, "num_hidden_layers": 2,
                                                                "num_attention_heads": 2, "patch_size": 16,
                                                                "image_size": 64, "num_register_tokens": 4},
                                   64, r=4, gpu_batch=3, cpu_batch=3),
}
FAST = ["--device", "cpu", "--reps", "2", "--merge-reps", "2", "--min-seconds", "0", "--retries", "0"]
# Compiled FlexAttention runs on this CPU (AVX2 in use): else the benchmark leaves its rows out.
FLEX_RUNS = prop_attention.flex_unavailable_reason("cpu") is None


@pytest.fixture
def tiny_table(monkeypatch):
    monkeypatch.setattr(e2e_vit, "MODELS", dict(TINY))


@pytest.fixture
def eager_flex(monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(prop_attention, "_COMPILED_FLEX", flex_attention)


def test_the_models_are_the_named_ones():
    """CLIP ViT-B/16's vision tower and DINOv2-S/14 with 4 registers at 224, both at r = 16,
    in the default run beside the timm ViTs."""
    clip, dino = HF_MODELS["clip_b16_224"], HF_MODELS["dinov2_s14_reg_224"]
    assert clip.hf_class == "CLIPVisionModel" and dino.hf_class == "Dinov2WithRegistersModel"
    assert {k: clip.config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                                        "image_size")} == {"hidden_size": 768, "num_hidden_layers": 12,
                                                           "num_attention_heads": 12, "patch_size": 16,
                                                           "image_size": 224}
    assert dino.config == {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 14,
                           "image_size": 224, "num_register_tokens": 4}
    assert clip.r == dino.r == 16 and set(HF_MODELS) <= set(e2e_vit.parse_args([]).models or e2e_vit.MODELS)
    # 197 tokens -> 11 (the last layer clamped); 256 patches + [CLS] -> 65, plus the 4 registers.
    assert e2e_vit.expected_tokens((224 // 16) ** 2 + 1, [16] * 12, protected=1) == 11
    assert 4 + e2e_vit.expected_tokens((224 // 14) ** 2 + 1, [16] * 12, protected=1) == 69


def test_plan_runs_forces_each_attention():
    auto = select_backend("auto", [torch.empty(1, 4, 8)]).name
    providers = e2e_vit._resolve_providers(["unpatched", "reference", "auto"], torch.device("cpu"), torch.float32)
    spec = TINY["tiny_clip"]
    runs = e2e_vit.plan_runs(spec, providers, e2e_vit.parse_args([]))
    tome = ["tome_reference"] + ([f"tome_{auto}"] if auto != "reference" else [])
    # Where compiled FlexAttention cannot run (a CPU without AVX2 in use), its row is left out.
    flex = [(f"tome_{auto}_flex", 4)] if FLEX_RUNS else []
    assert [(p["name"], r) for p, r in runs] == [("unpatched", 0)] + [(n, 4) for n in tome] + flex
    assert [p.get("prop_attn") for p, _ in runs] == [None] + ["bias"] * len(tome) + ["flex"] * len(flex)
    bias_only = e2e_vit.plan_runs(spec, providers, e2e_vit.parse_args(["--attention", "bias"]))
    assert [p["name"] for p, _ in bias_only] == ["unpatched"] + tome
    timm_runs = e2e_vit.plan_runs(e2e_vit.MODELS["vit_l16_512"], providers, e2e_vit.parse_args([]))
    assert all("prop_attn" not in p for p, _ in timm_runs) and len(timm_runs) == 1 + len(tome)


def test_forced_prop_attention_restores_the_environment(monkeypatch):
    monkeypatch.delenv(prop_attention.ENV_VAR, raising=False)
    if not FLEX_RUNS:  # forcing it is refused, naming why
        with pytest.raises(ValueError, match="needs AVX2"), forced_prop_attention("flex"):
            prop_attention.choose("cpu")
        assert prop_attention.ENV_VAR not in __import__("os").environ
        return
    with forced_prop_attention("flex"):
        assert prop_attention.choose("cpu") == "flex"
        with forced_prop_attention("bias"):
            assert prop_attention.choose("cpu") == "bias"
        assert prop_attention.choose("cpu") == "flex"
    assert prop_attention.ENV_VAR not in __import__("os").environ
    with pytest.raises(ValueError, match="unknown"):
        with forced_prop_attention("nope"):
            pass


def test_registers_merge_replayed_as_the_layer_runs_it():
    """Each recorded merge re-run alone goes through the state's own merge: DINOv2's registers
    set aside and put back with size 1, so block 0's replay gives the sizes block 1 received;
    the state's pass is as it was after the timing."""
    spec = TINY["tiny_dinov2_reg"]
    model = spec.build(torch.device("cpu"), torch.float32, seed=0)
    spec.patch(model, spec.r, "reference")
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        output, calls = e2e_vit.record_merges(model, images)
        state = tome_kernels.patch.get_state(model)
        assert torch.equal(output.pooler_output, model(images).pooler_output)
        assert [c["x"].shape[1] for c in calls] == [21, 17] and [c["block"] for c in calls] == [0, 1]
        size_after = state.size
        times = e2e_vit.time_merges(calls, state, "reference", torch.device("cpu"), warmup=0, reps=2)
        assert state.size is size_after and state.backend == "reference"
        state.size, state.keys, state.block = calls[0]["size"], calls[0]["keys"], 0
        merged = state.merge(calls[0]["x"], 4)
    assert merged.shape[1] == 17 and torch.equal(state.size, calls[1]["size"])
    assert state.size[:, 1:5].eq(1).all()  # the registers keep size 1
    assert len(times) == 2 and all(len(t) >= 2 and min(t) > 0 for t in times)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_main_on_tiny_transformers_models(tiny_table, eager_flex, tmp_path, capsys):
    auto = select_backend("auto", [torch.empty(1, 4, 8)]).name
    results = e2e_vit.main(FAST + ["--providers", "unpatched", "reference", "auto", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert widest_report_line(printed) <= MAX_WIDTH
    (path,) = tmp_path.iterdir()
    saved = json.loads(path.read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert saved["settings"]["prop_attn_choice"] == {"device": "cpu", "implementation": prop_attention.choose("cpu")}

    kernels = [f"tome_{auto}"] if auto != "reference" else []
    expected = ["unpatched", "tome_reference"] + kernels + ([f"tome_{auto}_flex"] if FLEX_RUNS else [])
    for model, spec in TINY.items():
        rows = {r["provider"]: r for r in saved["rows"] if r["model"] == model}
        assert list(rows) == expected and all(r["status"] == "ok" for r in rows.values())
        assert all(r["hf_class"] == spec.hf_class and r["config"] == spec.config for r in rows.values())
        unpatched, ref = rows["unpatched"], rows["tome_reference"]
        assert "prop_attn" not in unpatched and unpatched["r"] == 0 and "merge_s" not in unpatched
        assert ref["prop_attn"] == "bias"
        if FLEX_RUNS:
            flex = rows[f"tome_{auto}_flex"]
            assert flex["prop_attn"] == "flex" and flex["backend"] == auto
        registers = spec.config.get("num_register_tokens", 0)
        for r in list(rows.values())[1:]:
            assert r["first_pass_s"] > 0 and r["r_per_block"] == [4, 4]
            assert r["tokens_in"] == 17 + registers and r["tokens_per_block"] == [17 + registers, 13 + registers]
            assert r["tokens_last_block"] == r["tokens_expected"] == 9 + registers
            assert len(r["merge_times_s"]) == 2
            assert r["merge_s"] == pytest.approx(sum(statistics.median(t) for t in r["merge_times_s"]))
            assert r["merge_share"] == pytest.approx(r["merge_s"] / r["median_s"])
            assert r["images_per_s"] == pytest.approx(3 / r["median_s"])
            assert r["speedup_vs_unpatched"] == pytest.approx(unpatched["median_s"] / r["median_s"])
            assert r["speedup_vs_tome_reference"] == pytest.approx(ref["median_s"] / r["median_s"])
            # Every backend and both attentions compute the same function: float32 outputs agree to rounding.
            assert r["logits_max_abs_diff_vs_tome_reference"] <= 1e-4 * r["logits_max_abs"]
            assert f"| {model} | 3 | {r['provider']} | 4 |" in printed
        assert ref["logits_max_abs_diff_vs_unpatched"] > 0  # merging changes the pooled output
    assert "those ending _flex by compiled FlexAttention" in " ".join(printed.split())


def test_rows_past_the_deadline_are_recorded_as_skipped(tiny_table, capsys):
    results = e2e_vit.main(FAST + ["--providers", "unpatched", "reference", "--models", "tiny_clip",
                                   "--deadline-s", "0", "--no-save"])
    assert [(r["provider"], r["status"]) for r in results["rows"]] == [("unpatched", "skipped"),
                                                                       ("tome_reference", "skipped")]
    assert results["settings"]["deadline_s"] == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "| tiny_clip | 3 | unpatched | 0 | skipped [1] |" in printed and "past --deadline-s 0" in printed
