"""ToMe in the vision tower of a vision-language model: transformers 5.x LLaVA
(``LlavaForConditionalGeneration`` / ``LlavaModel`` over a CLIP or SigLIP vision tower), so
that its language model receives the merged visual tokens: fewer image tokens per image.

(Named ``vlm``: the vision-language side of the patches; other LLaVA-style models, each
with its own feature selection, would go here too.)

LLaVA reads ``hidden_states[vision_feature_layer]`` of its tower (strategy "default" drops
row 0, [CLS] for CLIP; "full" keeps it), projects every row and scatters the rows, in order,
into the positions of the image-token id in the sequence, after checking that the two counts
agree. The processor writes that id once per unmerged patch. So a merging tower needs a
prompt with fewer image ids: ``image_token_count`` says how many per image (from the patch
state and the configs, without running the model), ``fit_image_tokens`` shortens the
processor's runs of image ids to it. The tower itself is patched by ``patch.transformers``.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..checks import check_choice, check_int, check_int_pair, is_int
from ..reference import clamp_r
from .hf_vision import modeling_module, patch_transformers, remove_transformers
from .hooks import original_class, remove_hooks
from .schedule import dsm_r_per_block, r_per_block
from .state import ToMeState

# The vision towers LLaVA checkpoints use that patch.transformers merges, with the tokens in
# front of the patch grid (CLIP's [CLS]; SigLIP has none).
_TOWERS = {"CLIPVisionModel": ("clip", 1), "SiglipVisionModel": ("siglip", 0)}
_STRATEGIES = ("default", "full")

SEVERAL_LAYERS = ("LLaVA with several vision_feature_layer concatenates the hidden states of those layers on the "
                  "channels, row by row; while the tower merges, the layers have different token counts and their rows "
                  "stand for different patches, so they cannot be concatenated: give one int layer (e.g. -2)")
IMAGE_SIZES = ("image_sizes makes LLaVA split the image features by the unmerged patch count of each image; with a "
               "merging tower the counts differ: leave image_sizes out")
# Per-token inputs fit_image_tokens does not shorten, and what to do instead.
_NOT_SHORTENED = {
    "position_ids": "positions must be counted again over the shortened sequence: leave them out (the language model "
                    "counts them) or make them after fit_image_tokens",
    "inputs_embeds": "embed the ids fit_image_tokens returns instead",
    "pixel_values": "pixel_values are per image, not per token: pass them to the model unchanged",
}


def llava_model_of(model) -> Optional[nn.Module]:
    """The ``LlavaModel`` of ``model`` (itself, or a ``LlavaForConditionalGeneration``'s
    ``.model``), or None: the classes themselves, not subclasses, whose forward may read the
    features otherwise."""
    llava = modeling_module("llava")
    if llava is None or not isinstance(model, nn.Module):
        return None
    if type(model) is llava.LlavaForConditionalGeneration:
        model = getattr(model, "model", None)
    return model if type(model) is llava.LlavaModel else None


def llava_vision_tower(model) -> Optional[nn.Module]:
    """The vision tower of a LLaVA model (the module the patch changes and keeps its state on),
    or None for anything else."""
    inner = llava_model_of(model)
    tower = None if inner is None else getattr(inner, "vision_tower", None)
    return tower if isinstance(tower, nn.Module) else None


def _check_llava(model) -> Tuple[nn.Module, nn.Module, int]:
    """The LlavaModel, its vision tower and the tower's prefix tokens, checked."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = llava_model_of(model)
    if inner is None:
        raise TypeError("model must be a transformers LlavaForConditionalGeneration or LlavaModel (the classes "
                        f"themselves), got {original_class(model).__name__}")
    tower = llava_vision_tower(model)
    name = original_class(tower).__name__ if tower is not None else type(tower).__name__
    entry = _TOWERS.get(name)
    modeling = None if entry is None else modeling_module(entry[0])
    if entry is None or modeling is None or original_class(tower) is not getattr(modeling, name, None):
        raise ValueError(f"model's vision tower is a {name}; ToMe for LLaVA merges in a "
                         f"{' or '.join(sorted(_TOWERS))} tower")
    return inner, tower, entry[1]


def _one_feature_layer(value, name: str) -> Optional[int]:
    """The hidden-state index LLaVA reads, or None for several (concatenated) layers."""
    if isinstance(value, (list, tuple)):
        if not value or not all(is_int(v) for v in value):
            raise TypeError(f"{name} must be an int or a non-empty list of ints, got {value!r}")
        return int(value[0]) if len(value) == 1 else None
    if not is_int(value):
        raise TypeError(f"{name} must be an int or a list of ints, got {type(value).__name__}: {value!r}")
    return int(value)


def _selection(inner: nn.Module, layer, strategy, merging: bool) -> Tuple[Optional[int], str]:
    """The feature layer (None: several) and strategy a call uses: the config's unless given."""
    config = inner.config
    name = "vision_feature_layer" if layer is not None else "model.config.vision_feature_layer"
    index = _one_feature_layer(config.vision_feature_layer if layer is None else layer, name)
    name = "vision_feature_select_strategy" if strategy is not None else "model.config.vision_feature_select_strategy"
    strategy = check_choice(name, config.vision_feature_select_strategy if strategy is None else strategy,
                            _STRATEGIES)
    if index is None and merging:
        raise ValueError(SEVERAL_LAYERS)
    return index, strategy


def _num_layers(tower: nn.Module) -> int:
    return len(tower.encoder.layers)


class OneFeatureLayer:
    """Forward pre-hook on a patched LLaVA tower: refuses, while it merges, the calls whose
    features LLaVA would assemble by the unmerged layout. LLaVA passes its
    vision_feature_layer to the tower as output_hidden_states, so a call with several layers
    (from the config or from the call) is seen here, whichever way the features are asked for."""

    def __init__(self, state: ToMeState):
        self.state = state

    def __call__(self, _module: nn.Module, _args: tuple, kwargs: dict) -> None:
        if not self.state.any_merging:
            return
        selected = kwargs.get("output_hidden_states")
        if isinstance(selected, (list, tuple)) and len(selected) > 1:
            raise ValueError(SEVERAL_LAYERS)
        if kwargs.get("image_sizes") is not None:
            raise ValueError(IMAGE_SIZES)


def patch_llava(model: nn.Module, r, *, method: str = "tome", delay: int = 0, **options) -> nn.Module:
    """Patch a transformers LLaVA's vision tower in place to merge tokens; returns ``model``.

    ``model`` is a ``LlavaForConditionalGeneration`` or ``LlavaModel`` whose vision tower is a
    ``CLIPVisionModel`` or ``SiglipVisionModel``. The tower is patched by
    ``patch.transformers(tower, r, method=..., delay=..., **options)`` (same arguments, same
    schedules); the language model and the projector are untouched. The language model then
    receives ``image_token_count(model)`` rows per image instead of the processor's count, so
    the prompt's image-token runs must be shortened with ``fit_image_tokens`` (without it
    LLaVA's own check raises "Image features and image tokens do not match").

    What the language model sees: the rows of ``hidden_states[vision_feature_layer]`` after
    the merges of the layers before it ([CLS] first and, with strategy "default", dropped);
    the merged rows are size-weighted means in the merge's order, not the raster order of
    the patches, and the language model gets no sizes (a merged row counts once in its
    attention). Layers after the feature layer still run, as unpatched (LLaVA runs the whole
    tower); their merges change nothing the language model sees.

    Refused, before anything changes: another model or tower; a strategy other than
    "default" / "full"; several ``vision_feature_layer`` (a list) while any layer merges (the
    layers' token counts differ; also refused at call time, as is ``image_sizes``); any
    argument ``patch.transformers`` refuses. ``remove(model)`` restores the tower.

    Raises:
        TypeError: ``model`` is not a LLaVA, or an argument of the wrong type.
        ValueError: an unsupported tower or feature selection, or a wrong argument value.
    """
    inner, tower, _ = _check_llava(model)
    # The schedule decides whether the tower merges, which the feature selection depends on:
    # computed here (with its own checks) so that a refusal comes before the tower is touched.
    layers = _num_layers(tower)
    schedule = dsm_r_per_block(r, layers, delay) if method == "dsm" else r_per_block(r, layers)
    _selection(inner, None, None, any(v > 0 for v in schedule))
    patch_transformers(tower, r, method=method, delay=delay, **options)
    state: ToMeState = tower._tome_state
    state.undo = remove_llava
    tower.register_forward_pre_hook(OneFeatureLayer(state), with_kwargs=True)
    return model


def remove_llava(tower: nn.Module) -> None:
    """Undo ``patch_llava`` on the vision tower that holds the state."""
    remove_hooks(tower, OneFeatureLayer)
    remove_transformers(tower)


def _removed(state: ToMeState, layer: int, tokens: int, grid: Tuple[int, int]) -> int:
    """The tokens layer ``layer`` of a patched tower removes from ``tokens``, by the rule its
    merge applies: DSM's window stage clamps r to the window tokens, every other merge to
    (N - protected) // 2 of the tokens it matches (registers are set aside)."""
    r = state.r[layer]
    if r <= 0:
        return 0
    options = state.options
    if options.method == "dsm" and layer == options.delay:
        wy, wx = options.window
        return min(r, (grid[0] // wy) * (grid[1] // wx) * (wy * wx - 1))
    return clamp_r(r, tokens - state.register_tokens, state.class_token, state.distill_token)


def image_token_count(model: nn.Module, image_size=None, *, vision_feature_layer=None,
                      vision_feature_select_strategy=None) -> int:
    """The number of visual tokens LLaVA's language model receives per image: the rows of
    the tower's ``hidden_states[vision_feature_layer]`` after the merges of the layers before
    it, less [CLS] with strategy "default". Unpatched (or r = 0), the processor's count:
    (H // patch) * (W // patch), plus 1 with "full".

    Computed from the patch state (r per layer, method, protected tokens) and the configs,
    not by running the model: layer l removes min(r_l, (N_l - protected) // 2) of its N_l.

    Args:
        model: a ``LlavaForConditionalGeneration`` or ``LlavaModel``, patched or not.
        image_size: the pixel_values' (height, width), or one int for a square; None: the
            vision config's image_size.
        vision_feature_layer, vision_feature_select_strategy: what the forward call passes,
            when it overrides the config.

    Raises:
        TypeError / ValueError: a wrong argument, or several feature layers while merging.
    """
    inner, tower, prefix = _check_llava(model)
    config = tower.config
    height, width = check_int_pair("image_size", config.image_size if image_size is None else image_size)
    patch = check_int_pair("the vision config's patch_size", config.patch_size)
    state: Optional[ToMeState] = getattr(tower, "_tome_state", None)
    merging = state is not None and state.any_merging
    index, strategy = _selection(inner, vision_feature_layer, vision_feature_select_strategy, merging)
    grid = (height // patch[0], width // patch[1])
    if grid[0] * grid[1] == 0:
        raise ValueError(f"image_size {height}x{width} is smaller than the patch size {patch[0]}x{patch[1]}")
    # hidden_states has the embeddings (the input of layer 0) and every layer's output.
    states = _num_layers(tower) + 1
    if index is None:
        index = 0  # several layers, no merging: every one has the count of the embeddings
    if not -states <= index < states:
        raise ValueError(f"vision_feature_layer must be in [{-states}, {states}) for a tower of {states - 1} layers, "
                         f"got {index}")
    tokens = prefix + grid[0] * grid[1]
    if merging:
        for layer in range(index % states):
            tokens -= _removed(state, layer, tokens, grid)
    return tokens - (strategy == "default")


def _image_runs(is_image: Tensor) -> List[List[Tuple[int, int]]]:
    """Each row's runs of image ids, as (start, end) positions."""
    border = torch.zeros(is_image.shape[0], 1, dtype=torch.int8, device=is_image.device)
    edges = torch.diff(is_image.to(torch.int8), dim=1, prepend=border, append=border)
    runs = []
    for row in edges.cpu():
        starts = (row == 1).nonzero().flatten().tolist()
        ends = (row == -1).nonzero().flatten().tolist()
        runs.append(list(zip(starts, ends)))
    return runs


def fit_image_tokens(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                     labels: Optional[Tensor] = None, image_size=None, vision_feature_layer=None,
                     vision_feature_select_strategy=None, padding_side: Optional[str] = None,
                     pad_token_id: Optional[int] = None, **others) -> Dict[str, Tensor]:
    """Shorten the processor's image-token runs to what a ToMe-patched LLaVA feeds its
    language model; returns ``{"input_ids", "attention_mask", "labels"}`` (those given).

    Each run of ``model.config.image_token_id`` in a row must be k images of the processor's
    count (``image_token_count`` of the unmerged tower, k >= 1: adjacent ``<image>``s make one
    run); each image keeps its first ``image_token_count(model, image_size)`` ids, and the
    same positions of ``attention_mask`` and ``labels`` are kept. Call it once per prompt,
    after the processor and after patching: ids already fitted are refused.

    Rows with different numbers of images lose different numbers of tokens; they are padded
    again to one length on ``padding_side`` ("left" for generation, "right"), which is then
    required, with ``pad_token_id`` (default: the text config's), 0 in the attention mask,
    -100 in the labels. ``attention_mask`` is required then, so that the padding is masked.

    Not shortened, so refused: ``position_ids`` (count them again), ``inputs_embeds``, and any
    other per-token input; ``pixel_values`` is per image and goes to the model unchanged.

    Raises:
        TypeError / ValueError: naming the argument, before anything is computed.
    """
    if others:
        reasons = "; ".join(f"{name}: {_NOT_SHORTENED.get(name, 'not a per-token input fit_image_tokens shortens')}"
                            for name in sorted(others))
        raise TypeError(f"fit_image_tokens shortens input_ids, attention_mask and labels only; got {reasons}")
    _check_llava(model)
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 or int32 torch.Tensor (B, S), got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
    per_token = {"attention_mask": attention_mask, "labels": labels}
    for name, value in per_token.items():
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, S) like input_ids, got {type(value).__name__}")
        if value.shape != input_ids.shape:
            raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(value.shape)}")
    if padding_side is not None:
        check_choice("padding_side", padding_side, ("left", "right"))
    if pad_token_id is not None:
        pad_token_id = check_int("pad_token_id", pad_token_id)
    selection = dict(vision_feature_layer=vision_feature_layer,
                     vision_feature_select_strategy=vision_feature_select_strategy)
    merged = image_token_count(model, image_size, **selection)
    full = _unmerged_count(model, image_size, **selection)

    image_id = llava_model_of(model).config.image_token_id
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for row, runs in enumerate(_image_runs(input_ids == image_id)):
        for start, end in runs:
            if (end - start) % full:
                hint = " (fitted already?)" if (end - start) % merged == 0 else ""
                raise ValueError(f"input_ids row {row} has a run of {end - start} image tokens at {start}, not a "
                                 f"multiple of the processor's {full} per image{hint}")
            for image in range(start, end, full):
                keep[row, image + merged:image + full] = False
    lengths = keep.sum(dim=1).tolist()
    given = {"input_ids": input_ids, **{name: value for name, value in per_token.items() if value is not None}}
    if len(set(lengths)) == 1:
        return {name: value[keep].view(input_ids.shape[0], lengths[0]) for name, value in given.items()}
    return _pad_rows(model, given, keep, lengths, padding_side, pad_token_id)


def _unmerged_count(model: nn.Module, image_size, **selection) -> int:
    """The processor's image tokens per image: the tower's count with no merge."""
    inner, tower, prefix = _check_llava(model)
    config = tower.config
    height, width = check_int_pair("image_size", config.image_size if image_size is None else image_size)
    patch = check_int_pair("the vision config's patch_size", config.patch_size)
    _, strategy = _selection(inner, selection["vision_feature_layer"], selection["vision_feature_select_strategy"],
                             False)
    return prefix + (height // patch[0]) * (width // patch[1]) - (strategy == "default")


def _pad_rows(model: nn.Module, given: Dict[str, Tensor], keep: Tensor, lengths: List[int],
              padding_side: Optional[str], pad_token_id: Optional[int]) -> Dict[str, Tensor]:
    """The kept positions of each row, padded again to the longest row."""
    why = "rows with different numbers of images lose different numbers of image tokens"
    if padding_side is None:
        raise ValueError(f"padding_side must be 'left' or 'right' here: {why} and are padded again")
    if "attention_mask" not in given:
        raise ValueError(f"attention_mask is needed here: {why}, and the padding added must be masked")
    if pad_token_id is None:
        pad_token_id = llava_model_of(model).config.text_config.pad_token_id
        if pad_token_id is None:
            raise ValueError(f"pad_token_id must be given: {why}, and the text config has none")
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    # The processor's padding goes too: each row is padded afresh to the new longest row.
    keep = keep & (given["attention_mask"] != 0)
    lengths = keep.sum(dim=1).tolist()
    longest = max(lengths)
    out = {}
    for name, value in given.items():
        padded = value.new_full((value.shape[0], longest), fill[name])
        for row, length in enumerate(lengths):
            kept = value[row][keep[row]]
            if padding_side == "left":
                padded[row, longest - length:] = kept
            else:
                padded[row, :length] = kept
        out[name] = padded
    return out
