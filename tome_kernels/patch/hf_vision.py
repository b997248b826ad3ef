"""ToMe for Hugging Face transformers 5.x vision encoders: ViT, DeiT, CLIP's and SigLIP's
vision towers, DINOv2 with and without registers; PiToMe's or DSM's matching as options.

(Named ``hf_vision``, not ``transformers``: ``tome_kernels.patch.transformers`` is the patch
function, and importing a submodule of that name would rebind the package's attribute to the
module, silently replacing the function.)

How the model is changed, all of it undone by ``remove``:
- attention: through transformers' own extension point. ``hf_vision_layers.tome_attention``
  is registered in ``transformers.AttentionInterface`` as "tome_kernels_sdpa" and
  "tome_kernels_eager" (and in ``AttentionMaskInterface`` with sdpa's and eager's mask
  functions, so a mask the model makes is made as before), and the vision config's
  ``_attn_implementation`` is pointed at the one of the model's implementation. Each attention
  module keeps its own implementation function (``_tome_base``: transformers' sdpa, or the
  model file's eager) and the shared ``ToMeState``. The vision model and its modules get a
  copy of their config for this: two models built from one config object (a student and its
  teacher) stay independent, and the config a wrapper saves (``CLIPModel.config``) never
  names the patch's implementation.
- layers: each becomes a subclass of its own class (``hooks.tome_subclass``) whose forward
  is the original with the merge between the attention residual and the MLP.
- SigLIP's attention-pooling head: a subclass whose probe weighs each token by its size.
- DSM: a forward pre-hook on the embeddings records the patch grid from pixel_values.
No parameter or buffer changes, so the state_dict keeps its names while patched.
"""

import copy
import inspect
import sys
from typing import List, NamedTuple, Optional, Tuple

from torch import nn

from ..backends import check_backend_name
from ..checks import check_flag
from .hf_vision_layers import (
    ATTENTION_NAMES,
    NO_CHECKPOINTING,
    CLIPLayerForward,
    Dinov2LayerForward,
    NoMaskWhileMerging,
    PatchGridRecorder,
    SizeWeightedPoolingHead,
    ViTLayerForward,
    register_attention,
)
from .hooks import original_class, remove_hooks, tome_subclass
from .options import check_vision_method
from .prop_attention import check_prop_attention_switch
from .schedule import RSchedule
from .state import ToMeState


class _Family(NamedTuple):
    """A supported vision model: where its layers are and what they are made of."""

    package: str  # transformers.models.<package>.modeling_<package>
    layers: str  # attribute path of the layer list
    layer: str  # the layer class
    attention: str  # the layer's attribute holding its attention
    attention_class: str
    forward: type  # the layer forward mixin (hf_vision_layers)
    class_token: bool
    distill_token: bool


# The modules whose layers are patched (and which hold the state), by class name.
_FAMILIES = {
    "ViTModel": _Family("vit", "layers", "ViTLayer", "attention", "ViTAttention", ViTLayerForward, True, False),
    "DeiTModel": _Family("deit", "layers", "DeiTLayer", "attention", "DeiTAttention", ViTLayerForward, True, True),
    "CLIPVisionModel": _Family("clip", "encoder.layers", "CLIPEncoderLayer", "self_attn", "CLIPAttention",
                               CLIPLayerForward, True, False),
    "SiglipVisionModel": _Family("siglip", "encoder.layers", "SiglipEncoderLayer", "self_attn", "SiglipAttention",
                                 CLIPLayerForward, False, False),
    "Dinov2Model": _Family("dinov2", "encoder.layer", "Dinov2Layer", "attention", "Dinov2Attention",
                           Dinov2LayerForward, True, False),
    "Dinov2WithRegistersModel": _Family("dinov2_with_registers", "encoder.layer", "Dinov2WithRegistersLayer",
                                        "attention", "Dinov2WithRegistersAttention", Dinov2LayerForward, True, False),
}
# Models that hold one of those and read its output in ways merging keeps: the class token
# (and DeiT's distillation token), or CLIP's / SigLIP's pooled output. The text side of
# CLIPModel / SiglipModel is not touched.
_WRAPPERS = {
    "ViTForImageClassification": ("vit", "vit"),
    "DeiTForImageClassification": ("deit", "deit"),
    "DeiTForImageClassificationWithTeacher": ("deit", "deit"),
    "CLIPVisionModelWithProjection": ("clip", "vision_model"),
    "CLIPModel": ("clip", "vision_model"),
    "SiglipModel": ("siglip", "vision_model"),
}
# Models refused with the reason: what they do with the tokens is not what merging keeps.
_REFUSED = {
    "Dinov2ForImageClassification": "its head takes an unweighted mean of the patch tokens",
    "Dinov2WithRegistersForImageClassification": "its head takes an unweighted mean of the patch tokens",
    "CLIPForImageClassification": "its head takes an unweighted mean of the patch tokens",
    "SiglipForImageClassification": "its head takes an unweighted mean of the tokens",
    "ViTForMaskedImageModeling": "its decoder reshapes the tokens into the patch grid",
    "DeiTForMaskedImageModeling": "its decoder reshapes the tokens into the patch grid",
    "Dinov2Backbone": "its feature maps reshape the tokens into the patch grid",
    "Dinov2WithRegistersBackbone": "its feature maps reshape the tokens into the patch grid",
}
_SUPPORTED = sorted(_FAMILIES) + sorted(_WRAPPERS)


def modeling_module(package: str):
    """transformers' modeling file of ``package``, if imported (a model of it exists only then)."""
    return sys.modules.get(f"transformers.models.{package}.modeling_{package}")


def _known_class(model: nn.Module, table: dict) -> Optional[str]:
    """The name under which ``model``'s class (before any patch) is in ``table``, or None: the
    class itself, not a subclass (whose forward may read the tokens otherwise)."""
    cls = original_class(model)
    entry = table.get(cls.__name__)
    if entry is None:
        return None
    modeling = modeling_module(entry[0] if isinstance(entry, tuple) else entry.package)
    return cls.__name__ if modeling is not None and getattr(modeling, cls.__name__, None) is cls else None


def vision_model_of(model: nn.Module) -> Optional[nn.Module]:
    """The module this patch changes and keeps its state on: ``model`` itself for a vision
    model, the vision model inside a supported wrapper (ViTForImageClassification.vit,
    CLIPModel.vision_model, ...), None for anything else."""
    if "transformers" not in sys.modules or not isinstance(model, nn.Module):
        return None
    if _known_class(model, _FAMILIES) is not None:
        return model
    name = _known_class(model, _WRAPPERS)
    if name is None:
        return None
    inner = getattr(model, _WRAPPERS[name][1], None)
    return inner if isinstance(inner, nn.Module) and _known_class(inner, _FAMILIES) is not None else None


def _path(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _check_model(model) -> Tuple[nn.Module, _Family, List[nn.Module], str]:
    """The vision model, its family, its layers and the attention implementation it runs
    (before any patch: "sdpa" or "eager"), checked; nothing is changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name = original_class(model).__name__
    if name in _REFUSED:
        raise ValueError(f"model is a {name}, which ToMe cannot patch: {_REFUSED[name]}, which merged tokens "
                         "would change; patch its vision model instead (e.g. model.dinov2) and pool by size")
    vision = vision_model_of(model)
    if vision is None:
        raise TypeError(f"model must be a transformers vision model of a supported class ({', '.join(_SUPPORTED)}; "
                        f"or a BertModel / SentenceTransformer, for patch.bert), got {name}")
    family = _FAMILIES[original_class(vision).__name__]
    modeling = modeling_module(family.package)
    config = vision.config
    implementation = config._attn_implementation
    if implementation in ATTENTION_NAMES.values() and hasattr(vision, "_tome_config"):
        # Patched already: the model's own implementation is in the config it had before.
        implementation = vision._tome_config._attn_implementation
    base = "eager" if implementation is None else implementation
    if base not in ATTENTION_NAMES:
        raise ValueError(f"model runs attn_implementation {implementation!r}; ToMe needs 'eager' or 'sdpa' (an "
                         "additive float mask carries the sizes), e.g. model.set_attn_implementation('sdpa')")
    layers = _path(vision, family.layers)
    if not isinstance(layers, (nn.ModuleList, list, tuple)) or not layers:
        raise ValueError(f"model's {family.layers} is not a non-empty list of layers")
    layer_class, attention_class = getattr(modeling, family.layer), getattr(modeling, family.attention_class)
    for i, layer in enumerate(layers):
        problem = _layer_problem(layer, layer_class, family.attention, attention_class, config)
        if problem is not None:
            raise ValueError(f"model's {family.layers}[{i}] {problem}: ToMe patches transformers' {family.layer} with "
                             f"its {family.attention_class}, whose forwards it reproduces")
        if layer.gradient_checkpointing:
            raise ValueError(f"model has gradient checkpointing on: {NO_CHECKPOINTING}")
    if getattr(vision, "use_head", False):
        head_class = modeling.SiglipMultiheadAttentionPoolingHead
        head = getattr(vision, "head", None)
        original = original_class(head)
        if (not issubclass(original, head_class) or original.forward is not head_class.forward
                or "forward" in vars(head) or not isinstance(head.attention, nn.MultiheadAttention)
                or not head.attention.batch_first):
            raise ValueError(f"model's head is a {original.__name__}, not transformers' "
                             "SiglipMultiheadAttentionPoolingHead over a batch-first nn.MultiheadAttention, whose "
                             "forward the patch reproduces to weight tokens by size")
    return vision, family, list(layers), base


def _layer_problem(layer: nn.Module, layer_class: type, attribute: str, attention_class: type,
                   config) -> Optional[str]:
    """Why ``layer`` is not a layer this patch reproduces exactly, or None. A subclass with a
    forward of its own is refused: the patched forward would replace it without a word."""
    original = original_class(layer)
    if not issubclass(original, layer_class) or original.forward is not layer_class.forward:
        return f"is a {original.__name__}, not {layer_class.__name__} (or a subclass with its own forward)"
    if "forward" in vars(layer):
        return "has a forward of its own, set on the instance"
    attention = getattr(layer, attribute, None)
    if not isinstance(attention, attention_class) or type(attention).forward is not attention_class.forward:
        return f"has attention {type(attention).__name__}, not {attention_class.__name__} with its forward"
    if "forward" in vars(attention):
        return "has an attention with a forward of its own, set on the instance"
    if attention.config is not config:
        # The patch points the model's config at its attention function; this one reads another.
        return "has an attention whose config is not the model's"
    return None


def _base_attention(family: _Family, base: str):
    """The function the model ran before: transformers' sdpa, or its own file's eager (each
    model file has its own, some with the softmax in float32)."""
    if base == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    return modeling_module(family.package).eager_attention_forward


def _patch_size(config) -> Tuple[int, int]:
    size = config.patch_size
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def patch_transformers(model: nn.Module, r: RSchedule, *, prop_attn: Optional[bool] = None, trace_source: bool = False,
                       method: str = "tome", backend: str = "auto", preset: Optional[str] = None, margin=None,
                       alpha: Optional[float] = None, energy_form: Optional[str] = None, split=None,
                       delay: int = 0, window: Tuple[int, int] = (2, 2)) -> nn.Module:
    """Patch a Hugging Face transformers (5.x) vision encoder in place to merge tokens in every
    layer; returns it.

    Supported (the classes themselves, not subclasses):
        - ``ViTModel``, ``ViTForImageClassification`` (its ``.vit``);
        - ``DeiTModel``, ``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``
          (class and distillation tokens both protected: nothing merges into token 1);
        - ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel`` (its vision
          tower; the text side is untouched);
        - ``SiglipVisionModel``, ``SiglipModel`` (vision tower): no class token; the
          attention-pooling head weighs each token by its size;
        - ``Dinov2Model``, ``Dinov2WithRegistersModel``: the register tokens, right after
          [CLS], are never merged nor merged into, and keep size 1.
        A transformers ``BertModel`` or a sentence-transformers ``SentenceTransformer`` goes to
        ``patch.bert`` with the same arguments (DSM's excepted).

    Each layer merges its tokens between the attention residual and the MLP, on the attention's
    keys (B, H, N, Dh); with ``prop_attn`` the attention adds log(size) to each key's logits.
    The model runs its own attention ("sdpa" or "eager", through transformers'
    ``AttentionInterface``): with r = 0, or in layers before the first merge, the outputs are
    the unpatched model's, bit for bit. Works under ``torch.compile(model, fullgraph=True)``.

    Outputs after merging: ``last_hidden_state`` (B, N_out, C), in the model's dtype, has fewer
    tokens than the input: [CLS] (and DeiT's distillation token, DINOv2's registers) first, in
    place, then the merged tokens, each the size-weighted mean of the patches it stands for;
    ``get_state(model).size`` (B, N_out, 1) float32 gives the sizes (and with ``trace_source``,
    ``token_map`` (B, N_input) int64 where each input token ended). ``hidden_states`` (when
    asked for) shrink layer by layer. The pooled outputs are computed as the model computes
    them: from [CLS] (ViT, DeiT, CLIP, DINOv2: never merged), or by SigLIP's head, which counts a
    token of size s s times. The model takes no ``attention_mask`` while any layer merges.

    Args:
        model: one of the models above, with attn_implementation "sdpa" or "eager".
        r: tokens removed per layer: an int, a per-layer list, or ``(r, inflection)``; with
            method="dsm", an int: the budget is r per layer over all layers.
        prop_attn: proportional attention (log(size) added to the attention logits); None: on,
            except where a PiToMe preset says otherwise.
        trace_source: keep, per image, the final token of every input token.
        method: "tome" (ToMe's bipartite matching, Bolya et al., ICLR 2023), "pitome" (PiToMe,
            Tran et al., NeurIPS 2024) or "dsm" (delayed spatial merging: windows of the patch
            grid at layer ``delay``, ToMe after), as in ``patch.timm``.
        backend: the merge backend, as in ``bipartite_merge``.
        preset, margin, alpha, energy_form, split: PiToMe's options (method="pitome" only), as
            in ``patch.timm``.
        delay, window: DSM's options (method="dsm" only). The patch grid of each pass is
            pixel_values' (height // patch, width // patch), so other image sizes
            (interpolate_pos_encoding=True) work.

    A patched model patched again is first restored, so the new settings replace the old.
    ``remove(model)`` restores the classes, the config (the model's own object; an attention
    implementation set after patching is kept), the hooks and the attributes. Gradient
    checkpointing is refused while any layer merges.

    Raises:
        TypeError: ``model`` is not a supported class (naming it), or an argument of the wrong type.
        ValueError: a model this patch cannot reproduce (a refused head such as
            Dinov2ForImageClassification's unweighted mean, a layer or attention of another class
            or forward, an attention implementation other than 'eager' / 'sdpa', gradient
            checkpointing on), or an argument of the right type but a wrong value.
        All before anything changes.
    """
    from . import remove
    from .bert import patch_bert, sentence_transformer_bert

    check_backend_name(backend)
    check_flag("trace_source", trace_source)
    bert = sys.modules.get("transformers.models.bert.modeling_bert")
    if sentence_transformer_bert(model) is not None or (bert is not None and isinstance(model, bert.BertModel)):
        if method == "dsm" or delay != 0 or window != (2, 2):
            raise ValueError("method='dsm' (and its delay, window) merges in windows of a patch grid: not for BERT")
        return patch_bert(model, r, method=method, preset=preset, margin=margin, alpha=alpha,
                          energy_form=energy_form, split=split, prop_attn=prop_attn, backend=backend,
                          trace_source=trace_source)
    from .vlm import llava_model_of, patch_llava  # a LLaVA: its vision tower, and its feature selection checked

    if llava_model_of(model) is not None:
        return patch_llava(model, r, prop_attn=prop_attn, trace_source=trace_source, method=method, backend=backend,
                           preset=preset, margin=margin, alpha=alpha, energy_form=energy_form, split=split,
                           delay=delay, window=window)
    # Everything is checked before anything changes, so a bad argument leaves the model as it was.
    vision, family, layers, base = _check_model(model)
    options, schedule = check_vision_method(r, len(layers), prop_attn, method, preset=preset, margin=margin,
                                            alpha=alpha, energy_form=energy_form, split=split, delay=delay,
                                            window=window)
    check_prop_attention_switch()
    register_attention()
    remove(vision)
    registers = getattr(vision.embeddings, "register_tokens", None)
    state = ToMeState(schedule, class_token=family.class_token, distill_token=family.distill_token,
                      prop_attn=options.prop_attn, trace_source=trace_source, backend=backend, options=options,
                      register_tokens=0 if registers is None else int(registers.shape[1]))
    state.undo = remove_transformers
    function = _base_attention(family, base)
    for index, layer in enumerate(layers):
        attention = getattr(layer, family.attention)
        attention._tome_state = state
        attention._tome_base = function
        layer._tome_state = state
        layer._tome_index = index
        layer.__class__ = tome_subclass(type(layer), family.forward)
    if getattr(vision, "use_head", False):
        vision.head._tome_state = state
        vision.head.__class__ = tome_subclass(type(vision.head), SizeWeightedPoolingHead)
    forward = inspect.signature(type(vision).forward).parameters
    vision.register_forward_pre_hook(NoMaskWhileMerging(state, [name for name in forward if name != "self"]),
                                     with_kwargs=True)
    if options.method == "dsm":
        vision.embeddings.register_forward_pre_hook(PatchGridRecorder(state, _patch_size(vision.config)),
                                                    with_kwargs=True)
    # A copy of the config, given to every module that reads it: the original may be shared
    # with other models (built from one config object), which must keep their attention. The
    # copy's own property is written, as set_attn_implementation writes it in the end (that
    # method would re-run its availability checks and turn None into "sdpa").
    original = vision.config
    config = copy.copy(original)
    for module in vision.modules():
        if getattr(module, "config", None) is original:
            module.config = config
    config._attn_implementation = ATTENTION_NAMES[base]
    vision._tome_config = original
    vision._tome_state = state
    return model


def remove_transformers(vision: nn.Module) -> None:
    """Undo ``patch_transformers`` on ``vision`` (the vision model holding the state)."""
    family = _FAMILIES[original_class(vision).__name__]
    for layer in _path(vision, family.layers):
        if original_class(layer) is not type(layer):
            attention = getattr(layer, family.attention)
            del attention._tome_state, attention._tome_base
            layer.__class__ = original_class(layer)
            del layer._tome_state, layer._tome_index
    head = getattr(vision, "head", None)
    if head is not None and original_class(head) is not type(head):
        head.__class__ = original_class(head)
        del head._tome_state
    remove_hooks(vision.embeddings, PatchGridRecorder)
    remove_hooks(vision, NoMaskWhileMerging)
    config, original = vision.config, vision._tome_config
    if config._attn_implementation not in ATTENTION_NAMES.values():
        # Changed after patching (set_attn_implementation): the user's choice, kept.
        original._attn_implementation = config._attn_implementation
    for module in vision.modules():
        if getattr(module, "config", None) is config:
            module.config = original
    del vision._tome_config, vision._tome_state
