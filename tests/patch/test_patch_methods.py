"""The merging methods beyond ToMe in the model patches: PiToMe (timm and BERT) and DSM
(timm), against hand-written loops over the public matching functions."""

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = pytest.importorskip("timm")
try:
    import transformers
except ImportError:  # the BERT tests below are skipped, the timm ones still run
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

import tome_kernels.patch as tome_patch  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_within_twice_reference_error,  # noqa: E402
    cpu_backend_cases,
    logits,
    tokens_seen_by_blocks,
)
from tome_kernels import bipartite_match, pitome_match, window_match  # noqa: E402
from tome_kernels.patch.schedule import dsm_r_per_block, r_per_block  # noqa: E402
from tome_kernels.patch.state import VALID_SIZE  # noqa: E402
from tome_kernels.reference import clamp_r  # noqa: E402
from tome_kernels.reference import energy as energy_module  # noqa: E402

# Small members of each family: a class token, class + distillation token, no prefix token.
VARIANTS = {
    "vit": ("vit_tiny_patch16_224", {}, 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, 2),
    "avg_pool": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),
}


_BUILT = {}


def make_model(variant="vit", depth=4, img_size=96, **extra):
    """A fresh copy of the seeded model (built once: copying is much faster than building)."""
    key = (variant, depth, img_size, tuple(sorted(extra.items())))
    if key not in _BUILT:
        name, kwargs, _ = VARIANTS[variant]
        torch.manual_seed(0)
        _BUILT[key] = timm.create_model(name, pretrained=False, depth=depth, img_size=img_size, **kwargs, **extra)
    return copy.deepcopy(_BUILT[key]).eval()


def images(batch=2, height=96, width=None):
    return torch.randn(batch, 3, height, width or height, generator=torch.Generator().manual_seed(1))


def window_sources(grid, window):
    (h, w), (wy, wx) = grid, window
    return (h // wy) * (w // wx) * (wy * wx - 1)


def expected_counts(n, schedule, protected, *, onset=None, grid=None, window=(2, 2)):
    """Tokens after each block: ToMe's and PiToMe's clamp, (N - protected) // 2, except at
    DSM's onset block, which can merge every window token but the top-left ones."""
    counts = []
    for block, r in enumerate(schedule):
        if block == onset:
            n -= min(r, window_sources(grid, window))
        else:
            n -= clamp_r(r, n, protected >= 1, protected >= 2)
        counts.append(n)
    return counts


def handwritten_vit(model, x, schedule, match, prop_attn=True):
    """The oracle: timm's blocks written out with the merge between attention and MLP;
    ``match(keys, r, block)`` makes each merging block's plan. Returns (logits, sizes)."""
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        size = None
        for index, (block, r) in enumerate(zip(model.blocks, schedule)):
            attn = block.attn
            a = block.norm1(h)
            qkv = attn.qkv(a).reshape(a.shape[0], a.shape[1], 3, attn.num_heads, attn.head_dim)
            keys = attn.k_norm(qkv.permute(2, 0, 3, 1, 4)[1])
            bias = size[..., 0].log()[:, None, None, :] if prop_attn and size is not None else None
            h = h + block.ls1(attn(a, attn_mask=bias))
            if r > 0:
                h, size = match(keys, r, index).merge_wavg(h, size)
            h = h + block.ls2(block.mlp(block.norm2(h)))
        h = model.norm(h)
        if model.global_pool == "avg":
            pooled = (h * size).sum(1) / size.sum(1)
            return model.head(model.head_drop(model.fc_norm(pooled))), size
        return model.forward_head(h), size


# ---------------------------------------------------------------------------------------------
# schedules and token counts


def test_dsm_schedule():
    # ToMe's budget r * L spread over the blocks after the delay, remainder to the earliest.
    assert dsm_r_per_block(13, 12, 2) == [0, 0] + [16] * 6 + [15] * 4
    assert dsm_r_per_block(16, 12, 4) == [0] * 4 + [24] * 8
    assert dsm_r_per_block(3, 4, 0) == [3, 3, 3, 3]
    assert dsm_r_per_block(0, 4, 3) == [0, 0, 0, 0]
    for r, depth, delay in [(13, 12, 2), (7, 5, 3), (1, 6, 5)]:
        schedule = dsm_r_per_block(r, depth, delay)
        assert sum(schedule) == r * depth and max(schedule) - min(schedule[delay:]) <= 1
    for bad, error, match in [((4, 4, 4), ValueError, "delay"), ((4, 4, -1), ValueError, "delay"),
                              ((4, 4, 1.0), TypeError, "delay"), ((4, 4, True), TypeError, "delay"),
                              ((-1, 4, 1), ValueError, "^r "), (([1, 2], 4, 1), TypeError, "^r "),
                              (((4, 0.5), 4, 1), TypeError, "^r ")]:
        with pytest.raises(error, match=match):
            dsm_r_per_block(*bad)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("r", [3, [0, 10, 2], (6, 1.0), 1000])
def test_pitome_token_counts(variant, r):
    model = make_model(variant)
    protected = VARIANTS[variant][2]
    tome_patch.timm(model, r, method="pitome")
    schedule = r_per_block(r, 4)
    assert tome_patch.get_state(model).r == schedule
    assert tokens_seen_by_blocks(model, images()) == expected_counts(36 + protected, schedule, protected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("r, delay, window", [(2, 1, (2, 2)), (5, 2, (2, 2)), (3, 0, (3, 2)), (9, 3, (2, 2))])
def test_dsm_token_counts(variant, r, delay, window):
    model = make_model(variant)
    protected = VARIANTS[variant][2]
    tome_patch.timm(model, r, method="dsm", delay=delay, window=window)
    schedule = dsm_r_per_block(r, 4, delay)
    assert tome_patch.get_state(model).r == schedule
    counts = tokens_seen_by_blocks(model, images())
    n0 = 36 + protected
    assert counts == expected_counts(n0, schedule, protected, onset=delay, grid=(6, 6), window=window)
    assert counts[:delay] == [n0] * delay, "no merge before the delay"
    if r <= 5:  # nothing clamped: the whole budget of ToMe's r per block is spent
        assert n0 - counts[-1] == r * 4


# ---------------------------------------------------------------------------------------------
# against hand-written loops


@pytest.mark.parametrize("variant", ["vit", "avg_pool"])
def test_tome_method_is_the_default(variant):
    model = make_model(variant)
    x = images()
    for trace_source in (False, True):
        tome_patch.timm(model, 4, trace_source=trace_source)
        default = logits(model, x)
        tome_patch.timm(model, 4, method="tome", trace_source=trace_source)
        assert torch.equal(logits(model, x), default)
    # ... and that is ToMe: bipartite matching in every block.
    flags = dict(class_token=variant == "vit", distill_token=False, backend="reference")
    expected, size = handwritten_vit(make_model(variant), x, [4] * 4, lambda k, r, _: bipartite_match(k, r, **flags))
    # The truth: the oracle on a float64 copy, with the same merges (the same sizes). Unfused
    # attention: torch's SDPA mishandles the oracle's float32 bias next to float64 inputs.
    model64 = make_model(variant).double()
    for block in model64.blocks:
        block.attn.fused_attn = False
    exact, exact_size = handwritten_vit(model64, x.double(), [4] * 4, lambda k, r, _: bipartite_match(k, r, **flags))
    assert torch.equal(exact_size, size), "float64 merges differently: choose other inputs"
    tome_patch.timm(model, 4, method="tome", backend="reference")
    assert_within_twice_reference_error(logits(model, x), expected, exact)
    torch.testing.assert_close(tome_patch.get_state(model).size, size, rtol=0, atol=0)


# name -> (patch options, first margin m0, split per block, energy form, alpha, proportional
# attention): what each preset, and options given over one, must make the 4 blocks do.
PITOME_CONFIGS = {
    "authors_vit": ({}, 0.75, ["bipartite"] * 2 + ["alternate"] * 2, "elu", 1.0, False),
    "authors_mae": ({"preset": "authors_mae"}, 0.75, ["alternate"] * 2 + ["bipartite"] * 2, "elu", 1.0, False),
    "paper": ({"preset": "paper"}, 0.9, ["alternate"] * 4, "paper", 1.0, True),
    "overridden": ({"preset": "paper", "margin": 0.5, "alpha": 0.3, "energy_form": "elu", "split": "halves",
                    "prop_attn": False}, 0.5, ["halves"] * 4, "elu", 0.3, False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("config", sorted(PITOME_CONFIGS))
def test_pitome_matches_a_handwritten_loop(variant, config, monkeypatch):
    """Each block runs pitome_match with its preset's margin m0 (1 - l / L), split and energy
    form, and proportional attention as the preset says; options given override the preset."""
    options, margin, splits, form, alpha, prop_attn = PITOME_CONFIGS[config]
    protected = VARIANTS[variant][2]
    schedule = [3, 0, 5, 4]
    x = images()
    flags = dict(class_token=protected >= 1, distill_token=protected >= 2, backend="reference")

    def match(keys, r, block):
        return pitome_match(keys, r, margin=margin * (1 - block / 4), alpha=alpha, energy_form=form,
                            split=splits[block], **flags)

    expected, size = handwritten_vit(make_model(variant), x, schedule, match, prop_attn)
    # The truth: the oracle on a float64 copy, unfused as above, with the same merges.
    model64 = make_model(variant).double()
    for block in model64.blocks:
        block.attn.fused_attn = False
    exact, exact_size = handwritten_vit(model64, x.double(), schedule, match, prop_attn)
    assert torch.equal(exact_size, size), "float64 merges differently: choose other inputs"
    model = make_model(variant)
    tome_patch.timm(model, schedule, method="pitome", backend="reference", **options)
    assert tome_patch.get_state(model).prop_attn is prop_attn
    out = logits(model, x)
    assert_within_twice_reference_error(out, expected, exact)
    torch.testing.assert_close(tome_patch.get_state(model).size, size, rtol=0, atol=0)
    # The margin falls with depth, m0 (1 - l / L), in the blocks that merge (not block 1).
    margins = []
    real_energy = energy_module.energy

    def recording_energy(metric, m, *args):
        margins.append(m)
        return real_energy(metric, m, *args)

    monkeypatch.setattr(energy_module, "energy", recording_energy)
    logits(model, x)
    assert margins == pytest.approx([margin, margin * 0.5, margin * 0.25], rel=1e-12)


def test_pitome_options_say_what_runs():
    """``get_state(model).options`` holds the proportional attention in force (the preset's
    unless given) and each block's margin: a number sets the first block's, the preset's
    schedule scaled to it."""
    model = make_model()
    tome_patch.timm(model, 2, method="pitome", prop_attn=True)
    state = tome_patch.get_state(model)
    assert state.prop_attn is True and state.options.prop_attn is True
    tome_patch.timm(model, 2, method="pitome")
    assert tome_patch.get_state(model).options.prop_attn is False
    tome_patch.timm(model, 2, method="pitome", margin=0.6)
    assert tome_patch.get_state(model).options.margins == pytest.approx([0.6, 0.45, 0.3, 0.15], rel=1e-12)
    tome_patch.timm(model, 2, method="pitome", preset="authors_mae", energy_form="gaussian")
    assert tome_patch.get_state(model).options.alpha is None  # the Gaussian energy has none


@needs_transformers
def test_bert_text_preset_margin_scales_its_schedule():
    """authors_text's margins fall from 0.9 by 0.25 over the layers; a number m0 scales that
    schedule to start at m0."""
    model = tiny_bert()
    schedule = [0.9 - 0.25 * layer / 4 for layer in range(4)]
    tome_patch.bert(model, 1, method="pitome")
    assert tome_patch.get_state(model).options.margins == pytest.approx(schedule)
    tome_patch.bert(model, 1, method="pitome", margin=0.45)
    assert tome_patch.get_state(model).options.margins == pytest.approx([m / 2 for m in schedule])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dsm_matches_a_handwritten_loop(variant):
    protected = VARIANTS[variant][2]
    flags = dict(class_token=protected >= 1, distill_token=protected >= 2, backend="reference")
    schedule = dsm_r_per_block(4, 4, 1)

    def match(keys, r, block):
        if block == 1:
            return window_match(keys, r, (6, 6), window=(2, 2), **flags)
        return bipartite_match(keys, r, **flags)

    x = images()
    expected, size = handwritten_vit(make_model(variant), x, schedule, match)
    # The truth: the oracle on a float64 copy, unfused as above, with the same merges.
    model64 = make_model(variant).double()
    for block in model64.blocks:
        block.attn.fused_attn = False
    exact, exact_size = handwritten_vit(model64, x.double(), schedule, match)
    assert torch.equal(exact_size, size), "float64 merges differently: choose other inputs"
    model = make_model(variant)
    tome_patch.timm(model, 4, method="dsm", delay=1, backend="reference")
    assert_within_twice_reference_error(logits(model, x), expected, exact)
    torch.testing.assert_close(tome_patch.get_state(model).size, size, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# what merges with what


@pytest.mark.parametrize("method, options", [("pitome", {}), ("dsm", {"delay": 0}), ("dsm", {"delay": 2})])
@pytest.mark.parametrize("variant", ["vit", "deit_distilled"])
def test_prefix_tokens_are_never_merged(method, options, variant):
    model = make_model(variant)
    tome_patch.timm(model, 6, method=method, trace_source=True, **options)
    logits(model, images())
    state = tome_patch.get_state(model)
    protected = VARIANTS[variant][2]
    for token in range(protected):
        assert (state.token_map[:, token] == token).all()
        assert (state.token_map == token).sum(dim=1).tolist() == [1, 1]
        assert state.size[:, token, 0].tolist() == [1.0, 1.0]
    # Each final token stands for exactly the input tokens that map to it.
    for row in range(2):
        counts = torch.bincount(state.token_map[row], minlength=state.size.shape[1])
        assert torch.equal(counts.float(), state.size[row, :, 0])


def onset_groups(model, x, delay):
    """The token map right after DSM's first merging block: its groups."""
    seen = []
    hook = model.blocks[delay].register_forward_hook(
        lambda m, i, o: seen.append(tome_patch.get_state(model).token_map.clone()))
    logits(model, x)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("variant, window, height, width, dynamic", [
    ("vit", (2, 2), 96, 96, False),
    ("deit_distilled", (2, 3), 96, 96, False),
    ("avg_pool", (4, 4), 96, 96, False),       # 6x6 patches: one whole window, the rest kept
    ("vit", (2, 2), 64, 128, True),            # a 4x8 grid from a model built for 6x6
])
def test_dsm_onset_merges_window_neighbours_only(variant, window, height, width, dynamic):
    extra = {"dynamic_img_size": True} if dynamic else {}
    model = make_model(variant, **extra)
    protected = VARIANTS[variant][2]
    grid = (height // 16, width // 16)
    delay, r = 1, 10
    tome_patch.timm(model, r, method="dsm", delay=delay, window=window, trace_source=True)
    token_map = onset_groups(model, images(2, height, width), delay)
    assert tome_patch.get_state(model).grid_size == grid
    wy, wx = window
    patch = torch.arange(grid[0] * grid[1])
    y, xx = torch.div(patch, grid[1], rounding_mode="floor"), patch % grid[1]
    whole = (y < grid[0] // wy * wy) & (xx < grid[1] // wx * wx)
    # prefix tokens get windows of their own (-1, -2), patches outside whole windows -99
    window_id = torch.cat([torch.arange(-protected, 0),
                           torch.where(whole, (y // wy) * (grid[1] // wx) + xx // wx, -99)])
    top_left = torch.cat([torch.zeros(protected, dtype=torch.bool), whole & (y % wy == 0) & (xx % wx == 0)])
    removed = min(dsm_r_per_block(r, 4, delay)[delay], window_sources(grid, window))
    for row in range(2):
        groups = [torch.nonzero(token_map[row] == g)[:, 0] for g in range(int(token_map[row].max()) + 1)]
        assert sum(len(g) - 1 for g in groups) == removed
        for members in groups:
            if len(members) > 1:
                assert len(set(window_id[members].tolist())) == 1, f"group {members.tolist()} spans windows"
                assert window_id[members[0]] >= 0 and top_left[members].sum() == 1, members.tolist()


def test_dsm_refuses_a_broken_grid_at_forward_time():
    model = make_model(patch_drop_rate=0.25).train()
    tome_patch.timm(model, 2, method="dsm", delay=1)
    with pytest.raises(ValueError, match="patch grid"):
        model(images())


# ---------------------------------------------------------------------------------------------
# backends, removal, bad options


@pytest.mark.parametrize("backend", cpu_backend_cases())
@pytest.mark.parametrize("method, options", [("pitome", {}), ("dsm", {"delay": 1})])
def test_every_backend_gives_the_same_logits(method, options, backend):
    model = make_model("deit_distilled", depth=3, img_size=64)
    x = images(2, 64)
    # The truth: the reference on a float64 copy, with the same merges.
    model64 = make_model("deit_distilled", depth=3, img_size=64).double()
    tome_patch.timm(model64, 3, method=method, backend="reference", trace_source=True, **options)
    exact, exact_map = logits(model64, x.double()), tome_patch.get_state(model64).token_map
    results = {}
    for name in ("reference", backend):
        tome_patch.timm(model, 3, method=method, backend=name, trace_source=True, **options)
        results[name] = (logits(model, x), tome_patch.get_state(model).token_map)
    assert torch.equal(exact_map, results["reference"][1]), "float64 merges differently: choose other inputs"
    out, token_map = results[backend]
    assert_within_twice_reference_error(out, results["reference"][0], exact, msg=backend)
    assert torch.equal(token_map, results["reference"][1]), backend


def test_remove_restores_a_dsm_model():
    model = make_model()
    x = images()
    expected = logits(model, x)
    tome_patch.timm(model, 4, method="dsm", delay=1)
    assert model.patch_embed._forward_hooks
    assert not torch.equal(logits(model, x), expected)
    tome_patch.timm(model, 4, method="pitome")  # patching again drops the DSM hook
    assert not model.patch_embed._forward_hooks
    tome_patch.timm(model, 4, method="dsm", delay=1)
    tome_patch.remove(model)
    assert not model.patch_embed._forward_hooks and not tome_patch.is_patched(model)
    assert not any(name.startswith("_tome") for name in vars(model))
    assert torch.equal(logits(model, x), expected)


BAD_OPTIONS = [
    ({"method": "nope"}, ValueError, "method must be one of tome, pitome, dsm"),
    ({"method": 3}, TypeError, "method must be a str"),
    ({"method": "pitome", "margin": "0.9"}, TypeError, "margin"),
    ({"method": "pitome", "margin": float("nan")}, ValueError, "margin"),
    ({"method": "pitome", "alpha": float("inf")}, ValueError, "alpha"),
    ({"method": "pitome", "energy_form": "softmax"}, ValueError, "energy_form must be one of paper, elu, gaussian"),
    ({"method": "pitome", "split": 2}, TypeError, "split must be a str"),
    ({"method": "pitome", "split": ["halves"] * 3}, ValueError, "one value per block"),
    ({"method": "pitome", "preset": "deit"}, ValueError, "preset must be one of"),
    ({"method": "pitome", "margin": [0.5, 0.4, 0.3, 2.0]}, ValueError, "block 3: margin"),
    ({"method": "pitome", "energy_form": "gaussian", "margin": 1}, ValueError, r"margin must be in \[-1, 1\)"),
    ({"method": "pitome", "prop_attn": 1}, TypeError, "prop_attn"),
    ({"method": "tome", "preset": "paper"}, ValueError, "preset applies to method='pitome' only"),
    ({"method": "pitome", "energy_form": "gaussian", "alpha": 2.0}, ValueError, "alpha applies to energy_form"),
    ({"method": "pitome", "alpha": -1.0, "split": ["halves"] * 4}, ValueError, "^alpha must be > 0"),
    ({"method": "pitome", "r": 0.9}, TypeError, "keep_ratio_r"),
    ({"method": "tome", "margin": 0.5}, ValueError, "margin applies to method='pitome' only"),
    ({"method": "tome", "margin": 0.5, "alpha": 2.0}, ValueError, "margin, alpha apply to method='pitome' only"),
    ({"method": "pitome", "delay": 2}, ValueError, "delay applies to method='dsm' only"),
    ({"method": "dsm", "alpha": 2.0}, ValueError, "alpha applies to method='pitome' only"),
    ({"method": "dsm", "delay": -1}, ValueError, "delay"),
    ({"method": "dsm", "delay": 4}, ValueError, r"delay must be in \[0, 4\)"),
    ({"method": "dsm", "delay": 1.0}, TypeError, "delay"),
    ({"method": "dsm", "window": (0, 2)}, ValueError, "window"),
    ({"method": "dsm", "window": "2x2"}, TypeError, "window"),
    ({"method": "dsm", "r": [2, 2]}, TypeError, "r"),
    ({"method": "dsm", "r": (2, 0.5)}, TypeError, "r"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_OPTIONS)
def test_bad_options_leave_the_model_as_it_was(kwargs, error, match):
    kwargs = {"r": 2, **kwargs}
    model = tome_patch.timm(make_model(), 3, method="pitome")
    state = tome_patch.get_state(model)
    with pytest.raises(error, match=match):
        tome_patch.timm(model, **kwargs)
    assert tome_patch.get_state(model) is state and state.r == [3] * 4 and state.options.method == "pitome"
    fresh = make_model()
    with pytest.raises(error, match=match):
        tome_patch.timm(fresh, **kwargs)
    assert not tome_patch.is_patched(fresh) and not fresh.patch_embed._forward_hooks


# ---------------------------------------------------------------------------------------------
# BERT


def tiny_bert(layers=4):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128)
    model = transformers.BertModel(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def encode(model, ids, mask=None):
    """(pooled embedding, token map) of one forward pass of the patched model."""
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return tome_patch.mean_pool(model, hidden), tome_patch.get_state(model).token_map


def assert_rows_merge_as_alone(model, ids, mask):
    together, together_map = encode(model, ids, mask)
    for row, length in enumerate(mask.sum(1).tolist()):
        alone, alone_map = encode(model, ids[row:row + 1, :length])
        assert torch.equal(together_map[row, :length], alone_map[0]), f"row {row} ({length} tokens)"
        torch.testing.assert_close(together[row], alone[0], atol=2e-5, rtol=1e-5)


@needs_transformers
@pytest.mark.parametrize("r", [1, (4, -1.0), 20])
def test_bert_pitome_rows_of_a_padded_batch_merge_as_alone(r):
    """Rows from 1 to 30 real tokens: short rows run out of real pairs (their padding then
    merges, with no weight) and a row of [CLS] alone has no real candidate at all."""
    model = tiny_bert()
    ids = torch.randint(1, 97, (6, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(6, 30, dtype=torch.long)
    for row, length in enumerate([30, 17, 8, 3, 2, 1]):
        mask[row, length:] = 0
    tome_patch.bert(model, r, method="pitome", trace_source=True)
    assert tome_patch.get_state(model).r == r_per_block(r, 4)
    assert_rows_merge_as_alone(model, ids, mask)


SENTENCES = [
    "Hi.",
    "The committee postponed its decision until the auditors had finished reviewing the accounts.",
    "A dog ran across the wet field.",
    "Could you tell me which platform the late train to the coast leaves from tonight?",
]


@needs_transformers
@pytest.mark.parametrize("r", [2, 10])
def test_minilm_pitome_sentence_merges_as_alone_and_pools(minilm, r):
    model, tokenizer = minilm
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    try:
        tome_patch.bert(model, r, method="pitome", trace_source=True)
        assert_rows_merge_as_alone(model, batch["input_ids"], batch["attention_mask"])
        # mean_pool: the mean of the real input tokens, each carried by the token it ended in.
        with torch.no_grad():
            out = model(**batch).last_hidden_state
        state = tome_patch.get_state(model)
        real = batch["attention_mask"].bool()
        real_count = torch.zeros(len(SENTENCES), out.shape[1]).scatter_add_(1, state.token_map, real.float())
        assert torch.equal(state.size[..., 0] >= VALID_SIZE, real_count > 0)
        expected = (out * real_count[..., None]).sum(1) / real.sum(1, keepdim=True)
        torch.testing.assert_close(tome_patch.mean_pool(model, out), expected, atol=1e-5, rtol=1e-5)
    finally:
        tome_patch.remove(model)


@needs_transformers
@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "dsm"}, ValueError, "vision models only"),
    ({"method": "pitome", "margin": "0.9"}, TypeError, "margin"),
    ({"method": "tome", "energy_form": "elu"}, ValueError, "energy_form applies to method='pitome' only"),
    ({"method": "pitome", "preset": "authors_txt"}, ValueError, "preset must be one of"),
    ({"method": "pitome", "delay": 1}, TypeError, "delay"),
])
def test_bert_bad_options_leave_the_model_as_it_was(kwargs, error, match):
    model = tiny_bert()
    tome_patch.bert(model, 2)
    state = tome_patch.get_state(model)
    with pytest.raises(error, match=match):
        tome_patch.bert(model, 1, **kwargs)
    assert tome_patch.get_state(model) is state and state.options.method == "tome"
    fresh = tiny_bert()
    with pytest.raises(error, match=match):
        tome_patch.bert(fresh, 1, **kwargs)
    assert not tome_patch.is_patched(fresh) and not fresh._forward_pre_hooks


# ---------------------------------------------------------------------------------------------
# FLOPs: what the counter sees of each method's matching (benchmarks/flops_table.py)


@pytest.mark.parametrize("method, options", [("pitome", {}), ("dsm", {"delay": 1})])
def test_merge_flops_of_the_other_methods(method, options):
    from tome_kernels.flops import flop_report

    # 32x32 images of 8x8 patches: 16 patches + the class token, 2 heads of 16 dims.
    model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3,
                                                             num_heads=2, mlp_ratio=2.0, num_classes=10)
    tome_patch.timm(model, 3, method=method, **options)
    report = flop_report(model)
    expected = []
    for index, block in enumerate(report.blocks):
        n = block.tokens_in
        if block.tokens_out == n:
            expected.append(0)
        elif method == "pitome":
            # the energy over the N - 1 tokens after the class token and the assignment over
            # all N: each a similarity over the head-averaged keys, as the reference computes them
            expected.append(((n - 1) * (n - 1) + n * n) * 16 / 1e9)
        elif index == options.get("delay"):
            expected.append(n * n * 16 / 1e9)  # the assignment: an N x N similarity
        else:
            expected.append((n + 1) // 2 * (n // 2) * 16 / 1e9)
    assert [b.merge_gflops for b in report.blocks] == pytest.approx(expected, rel=1e-12)
    assert sum(expected) > 0
