"""tome_kernels.patch.llava, image_token_count and fit_image_tokens on a tiny random-weight
transformers LLaVA (a CLIP or SigLIP vision tower of 3 layers, a 2-layer Llama), built here
(nothing is downloaded): the language model receives the merged visual tokens."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import tome_kernels.patch as tome_patch  # noqa: E402
from tome_kernels.patch.schedule import dsm_r_per_block, r_per_block  # noqa: E402

IMAGE, PATCH, LAYERS = 32, 4, 3
GRID = (IMAGE // PATCH) ** 2
IMAGE_ID, PAD_ID, VOCAB = 99, 0, 100
PREFIX = {"clip": 1, "siglip": 0}


def make(tower="clip", strategy="default", layer=-2):
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  image_size=IMAGE, patch_size=PATCH)
    vision = (transformers.CLIPVisionConfig(**vision) if tower == "clip"
              else transformers.SiglipVisionConfig(vision_use_head=False, **vision))
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=PAD_ID)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                      vision_feature_select_strategy=strategy, vision_feature_layer=layer)
    model = transformers.LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


def processor_count(tower="clip", strategy="default", size=(IMAGE, IMAGE)):
    """What LlavaProcessor writes per image: one id per patch, [CLS] too with "full"."""
    return (size[0] // PATCH) * (size[1] // PATCH) + PREFIX[tower] - (strategy == "default")


def prompt(images_per_row=(1, 1), per_image=None, seed=3):
    """Processor-style ids: text, each image as a run of ``per_image`` image ids, text; rows
    of one length (images_per_row equal) unless said otherwise, then right-padded."""
    per_image = processor_count() if per_image is None else per_image
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in images_per_row:
        text = torch.randint(2, IMAGE_ID, (5,), generator=g)
        rows.append(torch.cat([text[:3], torch.full((k * per_image,), IMAGE_ID), text[3:]]))
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), PAD_ID)
    mask = torch.zeros(len(rows), longest, dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def pixels(images=2, size=(IMAGE, IMAGE), seed=1):
    return torch.randn(images, 3, *size, generator=torch.Generator().manual_seed(seed))


def logits(model, ids, mask, px, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=px, **kwargs).logits


def snapshot(model):
    """What a refused patch must leave as it was: parameters, classes, hooks, attributes."""
    return ({name: t.clone() for name, t in model.state_dict().items()},
            [type(m) for m in model.modules()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
            [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")],
            sorted(name for m in model.modules() for name in vars(m) if name.startswith("_tome")))


def assert_same_snapshot(before, after):
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


# ---------------------------------------------------------------------------------------------
# (a) r = 0 is the unpatched model; (f) remove restores it


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_r0_is_the_unpatched_model(tower, strategy):
    model = make(tower, strategy)
    ids, mask = prompt(per_image=processor_count(tower, strategy))
    expected = logits(model, ids, mask, pixels())
    tome_patch.llava(model, 0)
    assert tome_patch.image_token_count(model) == processor_count(tower, strategy)
    fitted = tome_patch.fit_image_tokens(model, ids, mask)
    assert torch.equal(fitted["input_ids"], ids) and torch.equal(fitted["attention_mask"], mask)
    assert torch.equal(logits(model, fitted["input_ids"], fitted["attention_mask"], pixels()), expected)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_remove_restores_the_model(tower):
    model = make(tower)
    ids, mask = prompt(per_image=processor_count(tower))
    expected = logits(model, ids, mask, pixels())
    # After a first pass: transformers adds its own output-capturing hooks then.
    before = snapshot(model)
    tome_patch.llava(model, 5)
    assert tome_patch.is_patched(model) and tome_patch.get_state(model).r == [5] * LAYERS
    fitted = tome_patch.fit_image_tokens(model, ids, mask)
    logits(model, fitted["input_ids"], fitted["attention_mask"], pixels())
    assert tome_patch.remove(model) is model
    assert not tome_patch.is_patched(model)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(logits(model, ids, mask, pixels()), expected)
    assert tome_patch.image_token_count(model) == processor_count(tower)


# ---------------------------------------------------------------------------------------------
# (b) the language model receives the merged tokens


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("r", [5, [0, 9, 2]])
def test_the_language_model_receives_the_merged_tokens(tower, strategy, r):
    model = make(tower, strategy)
    full = processor_count(tower, strategy)
    ids, mask = prompt(per_image=full)
    seen = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.update(projected=out))
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    logits(model, ids, mask, pixels())
    unpatched_length = seen["embeds"].shape[1]

    tome_patch.llava(model, r)
    count = tome_patch.image_token_count(model)
    assert count < full
    fitted = tome_patch.fit_image_tokens(model, ids, mask)
    out = logits(model, fitted["input_ids"], fitted["attention_mask"], pixels())
    is_image = fitted["input_ids"] == IMAGE_ID
    # Per image: the projector made `count` rows, the prompt holds `count` image ids.
    assert seen["projected"].shape[:2] == (2, count)
    assert is_image.sum(dim=1).tolist() == [count, count]
    # The language model's sequence is shorter by exactly what the merges removed, and holds
    # the projected merged rows, in order, at the image positions.
    assert seen["embeds"].shape[1] == unpatched_length - (full - count) == out.shape[1]
    assert torch.equal(seen["embeds"][is_image], seen["projected"].reshape(-1, seen["projected"].shape[-1]))
    # Those rows are the tower's merged hidden states of the feature layer ([CLS] dropped by "default").
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels(), output_hidden_states=True).hidden_states[-2]
        expected = model.model.multi_modal_projector(hidden[:, 1:] if strategy == "default" else hidden)
    assert torch.equal(seen["projected"], expected)
    # Text around the image is kept, in order; the attention mask follows the ids.
    assert torch.equal(fitted["input_ids"][~is_image], ids[ids != IMAGE_ID])
    assert torch.equal(fitted["attention_mask"], torch.ones_like(fitted["input_ids"]))


def test_generate_with_merged_image_tokens():
    """generate() with its KV cache: the image features enter at the prefill only, so the
    fitted prompt is all it needs. r = 0: the unpatched model's tokens; r > 0: the first new
    token is the forward pass's greedy choice, and decoding continues from the fitted prompt."""
    model = make()
    ids, mask = prompt()
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD_ID)
    expected = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels(), **settings)
    tome_patch.llava(model, 0)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels(), **settings), expected)
    tome_patch.llava(model, 5)
    fitted = tome_patch.fit_image_tokens(model, ids, mask)
    out = model.generate(**fitted, pixel_values=pixels(), **settings)
    length = fitted["input_ids"].shape[1]
    assert out.shape == (2, length + 4)
    assert torch.equal(out[:, :length], fitted["input_ids"])
    first = logits(model, fitted["input_ids"], fitted["attention_mask"], pixels())[:, -1].argmax(-1)
    assert torch.equal(out[:, length], first)


def test_rows_with_different_numbers_of_images():
    """One row with two adjacent images (one run of two images' ids), one with one: each image
    keeps its count, the rows are padded again, and the padding is masked."""
    model = make()
    tome_patch.llava(model, 5)
    count, full = tome_patch.image_token_count(model), processor_count()
    ids, mask = prompt(images_per_row=(2, 1))
    with pytest.raises(ValueError, match="padding_side"):
        tome_patch.fit_image_tokens(model, ids, mask)
    fitted = tome_patch.fit_image_tokens(model, ids, mask, padding_side="left")
    assert (fitted["input_ids"] == IMAGE_ID).sum(dim=1).tolist() == [2 * count, count]
    assert fitted["input_ids"].shape[1] == ids.shape[1] - 2 * (full - count)
    for row in range(2):
        alone = tome_patch.fit_image_tokens(model, ids[row:row + 1, mask[row] == 1])["input_ids"][0]
        real = fitted["attention_mask"][row] == 1
        assert torch.equal(fitted["input_ids"][row, real], alone)
        assert bool((fitted["input_ids"][row, ~real] == PAD_ID).all()) and bool(real[-1])
    seen = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.update(projected=out))
    logits(model, fitted["input_ids"], fitted["attention_mask"], pixels(3))
    assert seen["projected"].shape[:2] == (3, count)


def test_labels_follow_the_ids():
    model = make()
    tome_patch.llava(model, 5)
    ids, mask = prompt()
    labels = torch.where(ids == IMAGE_ID, -100, ids)
    fitted = tome_patch.fit_image_tokens(model, ids, mask, labels=labels)
    assert torch.equal(fitted["labels"], torch.where(fitted["input_ids"] == IMAGE_ID, -100, fitted["input_ids"]))
    with torch.no_grad():
        loss = model(**fitted, pixel_values=pixels()).loss
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# (c) the count formula against the tower


@pytest.mark.parametrize("method", ["tome", "pitome", "dsm"])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_count_matches_the_tower(tower, method):
    """image_token_count against what the patched tower makes, for several schedules, image
    sizes (other sizes through interpolate_pos_encoding, which LLaVA hands on to the tower),
    feature layers (every hidden state of one tower pass) and both strategies (the features
    LLaVA's get_image_features makes at its default layer, -2)."""
    model = make(tower)
    schedules = [5, [0, 9, 2], [20, 0, 0], (4, 1.0), 1000] if method == "tome" else [5, 1000]
    for r in schedules:
        tome_patch.llava(model, r, method=method, **({"delay": 1} if method == "dsm" else {}))
        schedule = dsm_r_per_block(r, LAYERS, 1) if method == "dsm" else r_per_block(r, LAYERS)
        assert tome_patch.get_state(model).r == schedule
        for size in ((IMAGE, IMAGE), (24, 40)):
            x = pixels(2, size)
            with torch.no_grad():
                hidden = model.model.vision_tower(x, output_hidden_states=True, interpolate_pos_encoding=True)
            rows = [h.shape[1] for h in hidden.hidden_states]
            assert rows[0] == processor_count(tower, "full", size)
            counts = [tome_patch.image_token_count(model, size, vision_feature_layer=layer,
                                                   vision_feature_select_strategy="full")
                      for layer in range(-LAYERS - 1, LAYERS + 1)]
            assert counts == rows + rows, (r, size)
            for strategy in ("default", "full"):
                with torch.no_grad():
                    features = model.model.get_image_features(x, vision_feature_select_strategy=strategy,
                                                              interpolate_pos_encoding=True).pooler_output
                count = tome_patch.image_token_count(model, size, vision_feature_select_strategy=strategy)
                assert [f.shape[0] for f in features] == [count, count] == [rows[-2] - (strategy == "default")] * 2


def test_count_by_hand():
    """The clamping rule worked by hand: 64 patches + [CLS], r = 40 in every layer:
    layer 0 removes min(40, 64 // 2) = 32 (33 left), layer 1 min(40, 32 // 2) = 16 (17 left)."""
    model = make()
    tome_patch.llava(model, 40)
    assert tome_patch.image_token_count(model, vision_feature_layer=1) == 33 - 1
    assert tome_patch.image_token_count(model) == 17 - 1
    assert tome_patch.image_token_count(model, vision_feature_layer=-1) == 9 - 1
    assert tome_patch.image_token_count(model, vision_feature_select_strategy="full") == 17


# ---------------------------------------------------------------------------------------------
# (d) without fit_image_tokens the library's own check refuses


def test_unfitted_prompt_is_refused_by_llava():
    model = make()
    ids, mask = prompt()
    tome_patch.llava(model, 5)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        logits(model, ids, mask, pixels())


# ---------------------------------------------------------------------------------------------
# (e) bad arguments


def test_several_feature_layers_are_refused_while_merging():
    model = make(layer=[-2, -1])
    ids, mask = prompt()
    expected = logits(model, ids, mask, pixels())
    before = snapshot(model)
    with pytest.raises(ValueError, match="several vision_feature_layer"):
        tome_patch.llava(model, 5)
    assert_same_snapshot(before, snapshot(model))
    # At r = 0 nothing merges, and the concatenation is the model's own.
    tome_patch.llava(model, 0)
    assert torch.equal(logits(model, ids, mask, pixels()), expected)
    assert tome_patch.image_token_count(model) == processor_count()

    model = make()
    tome_patch.llava(model, 5)
    fitted = tome_patch.fit_image_tokens(model, ids, mask)
    with pytest.raises(ValueError, match="several vision_feature_layer"):
        logits(model, fitted["input_ids"], fitted["attention_mask"], pixels(), vision_feature_layer=[-2, -1])
    with pytest.raises(ValueError, match="several vision_feature_layer"):
        model.get_image_features(pixels(), vision_feature_layer=[-3, -2])
    with pytest.raises(ValueError, match="several vision_feature_layer"):
        tome_patch.image_token_count(model, vision_feature_layer=[-2, -1])
    with pytest.raises(ValueError, match="image_sizes"):
        logits(model, fitted["input_ids"], fitted["attention_mask"], pixels(), image_sizes=torch.tensor([[32, 32]] * 2))


def test_bad_patch_arguments_leave_the_model_as_it_was():
    model = make()
    ids, mask = prompt()
    expected = logits(model, ids, mask, pixels())
    before = snapshot(model)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration or LlavaModel"):
        tome_patch.llava(model.model.vision_tower, 5)
    with pytest.raises(TypeError, match="r"):
        tome_patch.llava(model, 2.5)
    with pytest.raises(ValueError, match="backend"):
        tome_patch.llava(model, 5, backend="nope")
    with pytest.raises(ValueError, match="delay"):
        tome_patch.llava(model, 5, method="dsm", delay=LAYERS)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration or LlavaModel"):
        tome_patch.llava(model.model.language_model, 5)
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(logits(model, ids, mask, pixels()), expected)
    # The patch goes to the tower, whose own checks apply (here: its attention implementation).
    model.model.vision_tower.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="attn_implementation"):
        tome_patch.llava(model, 5)
    assert not tome_patch.is_patched(model)


def test_bad_count_and_fit_arguments():
    model = make()
    tome_patch.llava(model, 5)
    ids, mask = prompt()
    count = tome_patch.image_token_count
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        count(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="image_size"):
        count(model, torch.tensor(32))
    with pytest.raises(ValueError, match="image_size"):
        count(model, (0, 32))
    with pytest.raises(ValueError, match="smaller than the patch size"):
        count(model, (2, 32))
    with pytest.raises(ValueError, match="vision_feature_layer must be in"):
        count(model, vision_feature_layer=LAYERS + 1)
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        count(model, vision_feature_select_strategy="cls")

    fit = tome_patch.fit_image_tokens
    with pytest.raises(TypeError, match="input_ids"):
        fit(model, ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        fit(model, ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        fit(model, ids, mask[:, :-1])
    with pytest.raises(TypeError, match="labels"):
        fit(model, ids, mask, labels=ids.tolist())
    with pytest.raises(TypeError, match="position_ids: positions must be counted again"):
        fit(model, ids, mask, position_ids=torch.arange(ids.shape[1]).expand_as(ids))
    with pytest.raises(ValueError, match="padding_side"):
        fit(model, ids, mask, padding_side="middle")
    fitted = fit(model, ids, mask)
    with pytest.raises(ValueError, match="fitted already"):
        fit(model, fitted["input_ids"], fitted["attention_mask"])
    with pytest.raises(ValueError, match="not a multiple"):
        fit(model, ids[:, 1:-4])
    two, two_mask = prompt(images_per_row=(2, 1))
    with pytest.raises(ValueError, match="attention_mask is needed"):
        fit(model, two, padding_side="right")


def test_patch_transformers_takes_a_llava():
    """patch.transformers(llava, r) is patch.llava: the same checks (several feature layers
    refused while merging), the tower patched, the merged count fed to the language model."""
    model = make(layer=[-2, -1])
    with pytest.raises(ValueError, match="several vision_feature_layer"):
        tome_patch.transformers(model, 5)
    assert not tome_patch.is_patched(model)
    model = make()
    assert tome_patch.transformers(model.model, 5, method="pitome") is model.model
    assert tome_patch.is_patched(model) and tome_patch.get_state(model).options.method == "pitome"
    ids, mask = prompt()
    fitted = tome_patch.fit_image_tokens(model, ids, mask)
    assert (fitted["input_ids"] == IMAGE_ID).sum().item() == 2 * tome_patch.image_token_count(model) < 2 * GRID
    out = logits(model, fitted["input_ids"], fitted["attention_mask"], pixels())
    assert out.shape[1] == fitted["input_ids"].shape[1]
