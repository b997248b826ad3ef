"""tome_kernels.patch.transformers on transformers 5.x vision models: tiny random-weight
configs of every supported class, built here (nothing is downloaded)."""

import copy
import os
import re
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import tome_kernels.patch as tome_patch  # noqa: E402
from tests.helpers import assert_within_twice_reference_error  # noqa: E402
from tome_kernels import reference  # noqa: E402
from tome_kernels.patch.hf_vision_layers import NoMaskWhileMerging, PatchGridRecorder, tome_attention  # noqa: E402
from tome_kernels.patch.schedule import dsm_r_per_block, r_per_block  # noqa: E402
from tome_kernels.reference import clamp_r  # noqa: E402

IMAGE, PATCH, LAYERS = 32, 4, 3
GRID = (IMAGE // PATCH) ** 2
REGISTERS = 3
VISION = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _configs():
    t = transformers
    return {
        "vit": lambda: t.ViTModel(t.ViTConfig(intermediate_size=64, **VISION)),
        "vit_classifier": lambda: t.ViTForImageClassification(t.ViTConfig(intermediate_size=64, num_labels=5,
                                                                           **VISION)),
        "deit": lambda: t.DeiTModel(t.DeiTConfig(intermediate_size=64, **VISION)),
        "deit_classifier": lambda: t.DeiTForImageClassification(t.DeiTConfig(intermediate_size=64, num_labels=5,
                                                                              **VISION)),
        "deit_teacher": lambda: t.DeiTForImageClassificationWithTeacher(
            t.DeiTConfig(intermediate_size=64, num_labels=5, **VISION)),
        "clip_vision": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(intermediate_size=64, **VISION)),
        "clip_projection": lambda: t.CLIPVisionModelWithProjection(
            t.CLIPVisionConfig(intermediate_size=64, projection_dim=16, **VISION)),
        "clip": lambda: t.CLIPModel(t.CLIPConfig(text_config=TEXT, vision_config=dict(intermediate_size=64, **VISION),
                                                 projection_dim=16)),
        "siglip_vision": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(intermediate_size=64, **VISION)),
        "siglip": lambda: t.SiglipModel(t.SiglipConfig(text_config=TEXT, vision_config=dict(intermediate_size=64,
                                                                                             **VISION))),
        "dinov2": lambda: t.Dinov2Model(t.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **VISION)),
        "dinov2_registers": lambda: t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(
            mlp_ratio=2, layerscale_value=0.5, num_register_tokens=REGISTERS, **VISION)),
    }


KINDS = sorted(_configs())
# Tokens each kind keeps out of the merge, in front: [CLS], DeiT's distillation token, registers.
PROTECTED = {"deit": 2, "deit_classifier": 2, "deit_teacher": 2, "siglip_vision": 0, "siglip": 0,
             "dinov2_registers": 1 + REGISTERS}


def make(kind, attn="sdpa"):
    torch.manual_seed(0)
    model = _configs()[kind]()
    model.set_attn_implementation(attn)
    return model.eval()


def images(batch=2, height=IMAGE, width=IMAGE, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def text_ids():
    return torch.randint(2, 99, (2, 5), generator=torch.Generator().manual_seed(3))


def outputs(model, x, **kwargs):
    """Every tensor the model returns for images ``x`` (CLIP and SigLIP: with a text batch,
    whose embeddings the patch must leave alone)."""
    # A compiled model is a wrapper: its own class is not the model's.
    dual = isinstance(getattr(model, "_orig_mod", model), (transformers.CLIPModel, transformers.SiglipModel))
    text = {"input_ids": text_ids()} if dual else {}
    with torch.no_grad():
        out = model(pixel_values=x, **text, **kwargs)
    return tuple(value for key, value in out.items() if isinstance(value, torch.Tensor))


def vision(model):
    return tome_patch.vision_model_of(model)


def layers(model):
    inner = vision(model)
    return list(inner.layers if hasattr(inner, "layers") else getattr(inner.encoder, "layers", None)
                or inner.encoder.layer)


def hidden_counts(model, x):
    """The token count of the embeddings and after every layer (output_hidden_states)."""
    with torch.no_grad():
        out = vision(model)(pixel_values=x, output_hidden_states=True)
    return [h.shape[1] for h in out.hidden_states]


def snapshot(model):
    """What a refused patch must leave as it was: parameters and buffers, every module's
    class, the attention implementation of every config, the hooks and the patch attributes."""
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    return (
        {name: t.clone() for name, t in model.state_dict().items()},
        [type(m) for m in model.modules()],
        [c._attn_implementation for c in configs],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        sorted(name for m in model.modules() for name in vars(m) if name.startswith("_tome")),
    )


def assert_same_snapshot(before, after):
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


def expected_counts(kind, schedule, n0):
    protected = PROTECTED.get(kind, 1)
    registers = REGISTERS if kind == "dinov2_registers" else 0
    counts, n = [n0], n0
    for r in schedule:
        n -= clamp_r(r, n - registers, protected >= 1, protected == 2)
        counts.append(n)
    return counts


# ---------------------------------------------------------------------------------------------
# r = 0, token counts, protected tokens


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_r0_is_the_unpatched_model(kind, attn):
    model = make(kind, attn)
    x = images()
    expected = outputs(model, x)
    for prop_attn in (True, False):
        tome_patch.transformers(model, 0, prop_attn=prop_attn)
        got = outputs(model, x)
        assert len(got) == len(expected)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), prop_attn


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["vit", "clip_vision", "siglip_vision", "dinov2_registers"])
def test_layers_before_the_first_merge_are_the_models_own(kind, attn):
    model = make(kind, attn)
    x = images()
    with torch.no_grad():
        expected = vision(model)(pixel_values=x, output_hidden_states=True).hidden_states
    tome_patch.transformers(model, [0, 0, 6])
    with torch.no_grad():
        got = vision(model)(pixel_values=x, output_hidden_states=True).hidden_states
    # The embeddings and the first two layers, bit for bit; the last one merged.
    assert all(torch.equal(g, e) for g, e in zip(got[:3], expected[:3]))
    assert got[3].shape[1] == expected[3].shape[1] - 6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r", [5, [0, 9, 2], 1000])
def test_token_count_after_every_layer(kind, r):
    model = make(kind)
    tome_patch.transformers(model, r)
    n0 = GRID + PROTECTED.get(kind, 1)
    assert hidden_counts(model, images()) == expected_counts(kind, r_per_block(r, LAYERS), n0)
    assert tome_patch.get_state(model).size.shape[1] == expected_counts(kind, r_per_block(r, LAYERS), n0)[-1]


@pytest.mark.parametrize("method", ["tome", "pitome", "dsm"])
@pytest.mark.parametrize("kind", ["vit", "deit_teacher", "clip", "siglip", "dinov2_registers"])
def test_protected_tokens_are_never_merged(kind, method):
    """[CLS], DeiT's distillation token and DINOv2's registers each map to themselves, with size
    1, and no other token maps to them; every kept token stands for the inputs mapped to it."""
    model = make(kind)
    tome_patch.transformers(model, 8, method=method, trace_source=True)
    outputs(model, images())
    state = tome_patch.get_state(model)
    protected = PROTECTED.get(kind, 1)
    n_out = state.size.shape[1]
    assert state.token_map.shape == (2, GRID + protected)
    assert torch.equal(state.token_map[:, :protected], torch.arange(protected).expand(2, protected))
    assert bool((state.token_map[:, protected:] >= protected).all())
    assert torch.equal(state.size[:, :protected], torch.ones(2, protected, 1))
    for row in range(2):
        counts = torch.bincount(state.token_map[row], minlength=n_out)
        assert torch.equal(counts.float(), state.size[row, :, 0])
    assert n_out < GRID + protected


def test_registers_come_out_of_the_layers_in_place():
    """Merging in the last layer (after its attention) leaves [CLS] and the registers what the
    unpatched model makes of them, in rows 0 .. R: set aside, not merged, put back in place."""
    model = make("dinov2_registers")
    x = images()
    model64 = copy.deepcopy(model).double()
    kept = slice(0, 1 + REGISTERS)
    with torch.no_grad():
        unpatched = model(pixel_values=x).last_hidden_state[:, kept]
        exact = model64(pixel_values=x.double()).last_hidden_state[:, kept]
    tome_patch.transformers(model, [0, 0, 9])
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    assert got.shape[1] == GRID + 1 + REGISTERS - 9
    assert_within_twice_reference_error(got[:, kept], unpatched, exact)


# ---------------------------------------------------------------------------------------------
# The arithmetic: a hand-written ToMe ViT, proportional attention, sdpa against eager, SigLIP's head


def handwritten_tome_vit(model, x, schedule, prop_attn):
    """The oracle: transformers' ViTModel written out from its weights with
    tome_kernels.reference's bipartite merge on each layer's keys, and the attention as a
    plain softmax with log(size) added."""
    with torch.no_grad():
        h = model.embeddings(x)
        size = None
        for layer, r in zip(model.layers, schedule):
            attention = layer.attention
            (b, n, c), heads = h.shape, attention.num_attention_heads
            normed = layer.layernorm_before(h)
            q, k, v = (proj(normed).view(b, n, heads, c // heads).transpose(1, 2)
                       for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
            logits = q @ k.transpose(-1, -2) * attention.scaling
            if size is not None and prop_attn:
                logits = logits + size[..., 0].log().to(h.dtype)[:, None, None, :]
            mixed = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
            h = h + attention.o_proj(mixed)
            if r:
                h, size = reference.bipartite_merge(h, k, r, size, class_token=True)
            h = h + layer.mlp(layer.layernorm_after(h))
        return model.layernorm(h), size


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_a_handwritten_tome_vit(attn, prop_attn):
    model = make("vit", attn)
    x = images()
    schedule = [7, 0, 5]
    expected, expected_size = handwritten_tome_vit(model, x, schedule, prop_attn)
    model64 = copy.deepcopy(model).double()
    exact, exact_size = handwritten_tome_vit(model64, x.double(), schedule, prop_attn)
    assert torch.equal(exact_size, expected_size), "float64 merges differently: choose other inputs"
    tome_patch.transformers(model, schedule, prop_attn=prop_attn)
    got = outputs(model, x)[0]
    assert torch.equal(tome_patch.get_state(model).size, expected_size)
    assert_within_twice_reference_error(got, expected, exact)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_proportional_attention_counts_a_key_as_its_size(attn):
    """The registered attention function with integer sizes equals the model's own attention
    over the keys and values repeated ``size`` times, and hands the keys to the merge."""
    model = make("vit", attn)
    tome_patch.transformers(model, 2)
    attention = model.layers[0].attention
    state = tome_patch.get_state(model)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    sizes = torch.tensor([[1.0, 3.0, 1.0, 2.0, 4.0], [1.0, 1.0, 5.0, 1.0, 2.0]])
    state.begin(None)
    state.size, state.merged = sizes[..., None], True
    got, _ = tome_attention(attention, q, k, v, None, scaling=attention.scaling, dropout=0.0)
    assert state.keys is k
    ref, truth = [], []
    for row in range(2):
        counts = sizes[row].long()
        k_rep, v_rep = k[row:row + 1].repeat_interleave(counts, 2), v[row:row + 1].repeat_interleave(counts, 2)
        ref.append(attention._tome_base(attention, q[row:row + 1], k_rep, v_rep, None, scaling=attention.scaling,
                                        dropout=0.0)[0])
        logits = q[row:row + 1].double() @ k_rep.double().transpose(-1, -2) * attention.scaling
        truth.append((logits.softmax(-1) @ v_rep.double()).transpose(1, 2))
    assert_within_twice_reference_error(got, torch.cat(ref), torch.cat(truth))
    # Without prop_attn the sizes do not enter the attention.
    state.prop_attn = False
    plain, _ = tome_attention(attention, q, k, v, None, scaling=attention.scaling, dropout=0.0)
    assert torch.equal(plain, attention._tome_base(attention, q, k, v, None, scaling=attention.scaling,
                                                   dropout=0.0)[0])


@pytest.mark.parametrize("kind", ["vit", "deit_teacher", "clip_vision", "siglip_vision", "dinov2_registers"])
def test_sdpa_and_eager_agree(kind):
    x = images()
    results = {}
    for attn in ("sdpa", "eager"):
        model = tome_patch.transformers(make(kind, attn), 6, trace_source=True)
        results[attn] = (outputs(model, x), tome_patch.get_state(model).token_map)
    # The truth: a float64 copy through sdpa (eager's softmax is float32 in some model files).
    model64 = make(kind).double()
    unpatched = (outputs(make(kind, "sdpa"), x), outputs(model64, x.double()))
    tome_patch.transformers(model64, 6, trace_source=True)
    exact = outputs(model64, x.double())
    for attn in ("sdpa", "eager"):
        assert torch.equal(results[attn][1], tome_patch.get_state(model64).token_map), attn
    # Eager is the reference path; the unpatched model along sdpa may set the budget too.
    assert_within_twice_reference_error(results["sdpa"][0], results["eager"][0], exact, also=[unpatched])


@pytest.mark.parametrize("kind", ["siglip_vision", "siglip"])
def test_siglip_head_weights_tokens_by_size(kind):
    """The pooled output is the head's own forward over the merged tokens repeated size
    times: a merged token pools as the patches it stands for."""
    model = make(kind)
    x = images()
    tome_patch.transformers(model, 9, prop_attn=False)
    inner = vision(model)
    with torch.no_grad():
        out = inner(pixel_values=x)
    size = tome_patch.get_state(model).size[..., 0].long()
    assert int(size.max()) > 1
    repeated = torch.stack([out.last_hidden_state[row].repeat_interleave(size[row], 0) for row in range(2)])
    assert repeated.shape[1] == GRID
    head = inner.head
    own_forward = type(head)._tome_original_class.forward
    head64 = copy.deepcopy(head).double()
    with torch.no_grad():
        expected = own_forward(head, repeated)
        exact = own_forward(head64, repeated.double())
        unweighted = own_forward(head, out.last_hidden_state)
    assert_within_twice_reference_error(out.pooler_output, expected, exact)
    assert not torch.allclose(out.pooler_output, unweighted, rtol=1e-3, atol=1e-4)
    if kind == "siglip":
        # SiglipModel's image embeddings are that pooled output.
        with torch.no_grad():
            embeds = model(pixel_values=x, input_ids=text_ids()).image_embeds
        torch.testing.assert_close(embeds, out.pooler_output / out.pooler_output.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_the_text_side_is_untouched(kind):
    model = make(kind)
    x = images()
    with torch.no_grad():
        expected = model(pixel_values=x, input_ids=text_ids())
    tome_patch.transformers(model, 8)
    with torch.no_grad():
        got = model(pixel_values=x, input_ids=text_ids())
    assert torch.equal(got.text_embeds, expected.text_embeds)
    assert not torch.equal(got.image_embeds, expected.image_embeds)
    assert all(not hasattr(m, "_tome_state") for m in model.text_model.modules())
    assert model.config.text_config._attn_implementation == "sdpa"
    # The vision tower runs a copy of its config; the one CLIPModel / SiglipModel saves is as it was.
    assert model.vision_model.config._attn_implementation == "tome_kernels_sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert tome_patch.get_state(model) is model.vision_model._tome_state


@pytest.mark.parametrize("kind, backend", [("vit", "eager"), ("deit_teacher", "eager"), ("clip", "eager"),
                                           ("siglip", "eager"), ("dinov2_registers", "eager"),
                                           ("siglip_vision", "aot_eager")])
def test_torch_compile_fullgraph(kind, backend):
    """fullgraph=True traces the whole patched model, for every family (with dynamo's eager
    backend: the graph is what the patch decides; aot_eager once, through AOTAutograd too); the
    merges are the eager pass's."""
    model = tome_patch.transformers(make(kind), 6, trace_source=True)
    x = images()
    eager = outputs(model, x)
    token_map = tome_patch.get_state(model).token_map.clone()
    model64 = tome_patch.transformers(make(kind).double(), 6, trace_source=True)
    exact = outputs(model64, x.double())
    assert torch.equal(tome_patch.get_state(model64).token_map, token_map)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    assert_within_twice_reference_error(outputs(compiled, x), eager, exact)
    assert torch.equal(tome_patch.get_state(model).token_map, token_map)


# ---------------------------------------------------------------------------------------------
# PiToMe, DSM


@pytest.mark.parametrize("kind", ["vit", "siglip_vision", "dinov2_registers"])
def test_pitome_runs(kind):
    model = make(kind)
    tome_patch.transformers(model, 6, method="pitome", margin=0.5)
    state = tome_patch.get_state(model)
    assert state.options.method == "pitome" and state.prop_attn is False  # the authors_vit preset's
    n0 = GRID + PROTECTED.get(kind, 1)
    assert hidden_counts(model, images()) == expected_counts(kind, [6] * LAYERS, n0)
    assert all(torch.isfinite(t).all() for t in outputs(model, images()))


@pytest.mark.parametrize("kind, shape", [("vit", (IMAGE, IMAGE)), ("vit", (40, 24)),
                                         ("dinov2_registers", (40, 24)), ("deit_teacher", (IMAGE, IMAGE))])
def test_dsm_windows_the_patch_grid_of_the_pass(kind, shape):
    """DSM's first merging layer windows the grid of pixel_values (another size with
    interpolate_pos_encoding too); the registers and prefix tokens are not part of it."""
    model = make(kind)
    tome_patch.transformers(model, 4, method="dsm", delay=1, trace_source=True)
    x = images(2, *shape)
    kwargs = {"interpolate_pos_encoding": True} if kind != "dinov2_registers" else {}
    outputs(model, x, **kwargs)
    state = tome_patch.get_state(model)
    grid = (shape[0] // PATCH, shape[1] // PATCH)
    assert state.grid_size == grid
    protected = PROTECTED.get(kind, 1)
    n0 = grid[0] * grid[1] + protected
    assert state.size.shape[1] == expected_counts(kind, dsm_r_per_block(4, LAYERS, 1), n0)[-1]
    assert torch.equal(state.token_map[:, :protected], torch.arange(protected).expand(2, protected))
    # Only the last layer merges (delay 2), within 2x2 windows: each kept token stands for
    # tokens of one window.
    model_one = make(kind)
    tome_patch.transformers(model_one, 4, method="dsm", delay=2, trace_source=True)
    outputs(model_one, x, **kwargs)
    token_map = tome_patch.get_state(model_one).token_map[:, protected:]
    rows, cols = torch.arange(grid[0] * grid[1]) // grid[1], torch.arange(grid[0] * grid[1]) % grid[1]
    window = (rows // 2) * ((grid[1] + 1) // 2) + cols // 2
    assert tome_patch.get_state(model_one).size.shape[1] == n0 - 12
    for b in range(2):
        for token in token_map[b].unique():
            assert window[token_map[b] == token].unique().numel() == 1


# ---------------------------------------------------------------------------------------------
# Refusals, remove, patching again, BERT


def _subclass_with_forward(cls):
    return type("Custom" + cls.__name__, (cls,), {"forward": lambda self, *a, **k: cls.forward(self, *a, **k)})


@pytest.mark.parametrize(
    "case, error, words",
    [
        ("linear", TypeError, "got Linear"),
        ("dinov2_classifier", ValueError, "Dinov2ForImageClassification, which ToMe cannot patch: its head takes an "
                                          "unweighted mean"),
        ("vit_subclass", TypeError, "got CustomViTModel"),
        ("flex", ValueError, "attn_implementation 'flex_attention'; ToMe needs 'eager' or 'sdpa'"),
        ("flash", ValueError, "attn_implementation 'flash_attention_2'; ToMe needs 'eager' or 'sdpa'"),
        ("layer", ValueError, "layers[1] is a CustomViTLayer, not ViTLayer"),
        ("attention", ValueError, "layers[2] has attention CustomViTAttention"),
        ("checkpointing", ValueError, "gradient checkpointing"),
    ],
)
def test_bad_models_are_refused_before_any_change(case, error, words):
    if case == "linear":
        model = torch.nn.Linear(2, 2)
    elif case == "dinov2_classifier":
        model = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(mlp_ratio=2, num_labels=3,
                                                                                    **VISION)).eval()
    elif case == "vit_subclass":
        model = _subclass_with_forward(transformers.ViTModel)(transformers.ViTConfig(intermediate_size=64, **VISION))
    else:
        model = make("vit")
        if case == "flex":
            model.config._attn_implementation = "flex_attention"
        elif case == "flash":
            model.config._attn_implementation = "flash_attention_2"
        elif case == "layer":
            model.layers[1].__class__ = _subclass_with_forward(type(model.layers[1]))
        elif case == "attention":
            model.layers[2].attention.__class__ = _subclass_with_forward(type(model.layers[2].attention))
        elif case == "checkpointing":
            model.activation_checkpointing_enable()
    before = snapshot(model)
    with pytest.raises(error, match=re.escape(words)):
        tome_patch.transformers(model, 4)
    assert_same_snapshot(before, snapshot(model))
    assert not tome_patch.is_patched(model)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(r=-1), ValueError, "r must be >= 0"),
        (dict(r=[1, 2, 3, 4]), ValueError, "4 per-block values but the model has 3 blocks"),
        (dict(method="nope"), ValueError, "method must be one of tome, pitome, dsm"),
        (dict(backend="nope"), ValueError, "'nope' is not a backend"),
        (dict(trace_source="yes"), TypeError, "trace_source must be a bool"),
        (dict(prop_attn=1), TypeError, "prop_attn must be a bool"),
        (dict(margin=0.5), ValueError, "margin applies to method='pitome' only"),
        (dict(delay=1), ValueError, "delay applies to method='dsm' only"),
        (dict(method="dsm", r=[1, 2, 3]), TypeError, "r (an int for method='dsm'"),
        (dict(method="dsm", delay=3), ValueError, "delay must be in [0, 3)"),
    ],
)
def test_bad_arguments_leave_the_model_as_it_was(kwargs, error, words):
    model = make("clip")
    tome_patch.transformers(model, 2)
    before = snapshot(model)
    arguments = dict(r=4, **kwargs) if "r" not in kwargs else kwargs
    r = arguments.pop("r")
    with pytest.raises(error, match=re.escape(words)):
        tome_patch.transformers(model, r, **arguments)
    assert_same_snapshot(before, snapshot(model))
    assert tome_patch.get_state(model).r == [2, 2, 2]


def test_what_merging_breaks_is_refused_at_run_time():
    model = tome_patch.transformers(make("vit"), 4)
    x = images()
    with pytest.raises(ValueError, match="takes no attention_mask"):
        model(pixel_values=x, attention_mask=torch.ones(2, GRID + 1))
    with pytest.raises(ValueError, match="takes no attention_mask"):
        model(x, None, None, torch.ones(2, GRID + 1))
    # With r = 0 everywhere the model takes its mask as before.
    plain = make("vit")
    mask = torch.ones(2, GRID + 1)
    mask[:, -5:] = 0
    expected = outputs(plain, x, attention_mask=mask)
    assert all(torch.equal(g, e) for g, e in zip(outputs(tome_patch.transformers(plain, 0), x, attention_mask=mask),
                                                 expected))
    model.train()
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(pixel_values=x)
    model.activation_checkpointing_disable()
    model.eval()
    model.set_attn_implementation("eager")
    with pytest.raises(RuntimeError, match="changed to 'eager' after patching"):
        model(pixel_values=x)


@pytest.mark.parametrize("kind", KINDS)
def test_remove_restores_the_model(kind):
    model = make(kind)
    never_patched = copy.deepcopy(model)
    x = images()
    before = snapshot(model)
    tome_patch.transformers(model, 6, method="dsm", trace_source=True)
    assert tome_patch.is_patched(model)
    assert list(model.state_dict()) == list(before[0]), "patching must not rename parameters"
    assert not all(torch.equal(g, e) for g, e in zip(outputs(model, x), outputs(never_patched, x)))
    assert tome_patch.remove(model) is model
    assert not tome_patch.is_patched(model)
    assert_same_snapshot(before, snapshot(model))
    assert not any(isinstance(hook, (NoMaskWhileMerging, PatchGridRecorder)) for m in model.modules()
                   for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
    assert all(torch.equal(g, e) for g, e in zip(outputs(model, x), outputs(never_patched, x)))
    with pytest.raises(ValueError, match="not patched"):
        tome_patch.get_state(model)
    assert tome_patch.remove(model) is model


def test_remove_restores_the_exact_implementation_value():
    """Even a config whose implementation is None (eager by transformers' default) gets None back."""
    model = make("vit", "eager")
    model.config._attn_implementation = None
    tome_patch.transformers(model, 3)
    assert model.config._attn_implementation == "tome_kernels_eager"
    tome_patch.remove(model)
    assert model.config._attn_implementation is None


def test_patching_again_replaces_the_settings():
    model = make("clip")
    tome_patch.transformers(model, 2)
    tome_patch.transformers(model, 7, prop_attn=False, method="dsm", delay=1)
    state = tome_patch.get_state(model)
    assert (state.r, state.prop_attn, state.options.method) == (dsm_r_per_block(7, LAYERS, 1), False, "dsm")
    layer = model.vision_model.encoder.layers[0]
    assert type(layer)._tome_original_class is transformers.models.clip.modeling_clip.CLIPEncoderLayer
    assert layer.self_attn._tome_state is state
    assert len(model.vision_model._forward_pre_hooks) == 1
    assert len(model.vision_model.embeddings._forward_pre_hooks) == 1
    tome_patch.transformers(model, 3)
    assert not model.vision_model.embeddings._forward_pre_hooks
    tome_patch.remove(model)
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_a_copy_is_patched_on_its_own():
    model = tome_patch.transformers(make("dinov2_registers"), 5)
    x = images()
    expected = outputs(model, x)
    twin = copy.deepcopy(model)
    assert tome_patch.get_state(twin) is not tome_patch.get_state(model)
    assert twin.encoder.layer[0].attention._tome_state is tome_patch.get_state(twin)
    assert all(torch.equal(g, e) for g, e in zip(outputs(twin, x), expected))
    tome_patch.remove(twin)
    assert tome_patch.is_patched(model)


def test_models_built_from_one_config_stay_independent():
    """A student and its teacher from one config object: patching one leaves the other's
    attention alone, and both can be patched and removed in any order."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(intermediate_size=64, **VISION)
    config._attn_implementation = "sdpa"
    student, teacher = transformers.ViTModel(config).eval(), transformers.ViTModel(config).eval()
    x = images()
    expected = outputs(teacher, x)
    tome_patch.transformers(student, 4)
    assert config._attn_implementation == "sdpa" and teacher.config is config
    assert all(torch.equal(g, e) for g, e in zip(outputs(teacher, x), expected))
    tome_patch.transformers(teacher, 2)
    assert hidden_counts(teacher, x)[-1] < hidden_counts(teacher, x)[0]
    tome_patch.remove(student)
    assert student.config is config and layers(student)[0].attention.config is config
    assert tome_patch.is_patched(teacher)
    tome_patch.remove(teacher)
    assert all(torch.equal(g, e) for g, e in zip(outputs(teacher, x), expected))


def test_an_implementation_set_after_patching_is_kept_by_remove():
    model = tome_patch.transformers(make("vit"), 0)
    model.set_attn_implementation("eager")
    tome_patch.remove(model)
    assert model.config._attn_implementation == "eager"
    assert layers(model)[0].attention.config is model.config


def test_a_bad_prop_attention_switch_is_refused_at_patch_time(monkeypatch):
    model = make("vit")
    before = snapshot(model)
    monkeypatch.setenv("TOME_PROP_ATTENTION", "flash")
    with pytest.raises(ValueError, match="TOME_PROP_ATTENTION='flash'"):
        tome_patch.transformers(model, 0)
    assert_same_snapshot(before, snapshot(model))


def test_a_saved_patched_model_runs_in_a_new_process(tmp_path):
    """torch.load in a process that never patched a model: the attention names the saved
    config holds are registered again when the patched layers are unpickled."""
    model = tome_patch.transformers(make("vit"), 3)
    x = images()
    expected = outputs(model, x)[0]
    torch.save({"model": model, "x": x, "expected": expected}, tmp_path / "patched.pt")
    script = ("import sys, torch, tome_kernels.patch\n"
              "saved = torch.load(sys.argv[1], weights_only=False)\n"
              "with torch.no_grad():\n"
              "    got = saved['model'](pixel_values=saved['x']).last_hidden_state\n"
              "assert tome_kernels.patch.is_patched(saved['model'])\n"
              "print(got.shape[1], torch.equal(got, saved['expected']))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "patched.pt")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(expected.shape[1]), "True"]
    assert expected.shape[1] < GRID + 1


def test_a_bert_goes_to_patch_bert():
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    twin = copy.deepcopy(model)
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    tome_patch.transformers(model, 3, trace_source=True)
    tome_patch.bert(twin, 3, trace_source=True)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, twin(input_ids=ids).last_hidden_state)
    assert type(model.encoder.layer[0]) is type(twin.encoder.layer[0])
    with pytest.raises(ValueError, match="patch grid: not for BERT"):
        tome_patch.transformers(model, 3, method="dsm")
