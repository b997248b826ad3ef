"""Token merging in diffusion transformers' joint text-image blocks (diffusers 0.42): SD3's
``JointTransformerBlock`` and Flux's ``FluxTransformerBlock`` (double-stream) and
``FluxSingleTransformerBlock``; and the kv scheme in a ``BasicTransformerBlock``.

Nothing of a block's own forward is rewritten. A patched block's forward makes the call's plan
from its image tokens (its ``hidden_states``, (B, N, C); the text tokens come apart, as
``encoder_hidden_states``), hands it to the thread's ``DiffusionState`` and runs the block's
own forward. What merges then does so through diffusers' extension points:

- the attention, through the processors of ``diffusion_attention`` set on the block's
  attention modules (``Attention.set_processor``), each wrapping the processor it replaces;
- the feed-forward (``merge_mlp``, merge scheme only), through a forward pre-hook that merges
  the image tokens entering the block's ``ff`` (Flux single-stream: ``proj_mlp``, whose input
  is the text tokens then the image tokens) and a forward hook that unmerges its output.

``remove`` gives every attention its processor back and removes the hooks.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import diffusion_attention
from .hooks import original_class, tome_subclass


def dit_block_classes() -> Tuple[type, ...]:
    """The joint text-image block classes patched here."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    return JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock


def _processor_classes() -> dict:
    """Per block class: which processor each of its attentions must have, and the wrapper."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    joint, flux, single = dit_block_classes()
    return {joint: (JointAttnProcessor2_0, diffusion_attention.ToMeJointAttnProcessor),
            flux: (FluxAttnProcessor, diffusion_attention.ToMeFluxAttnProcessor),
            single: (FluxAttnProcessor, diffusion_attention.ToMeFluxAttnProcessor)}


def attentions(block: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of the attentions in ``block`` that see its image tokens."""
    found = [("attn", block.attn)]
    if getattr(block, "attn2", None) is not None:  # SD3.5's image-only second attention
        found.append(("attn2", block.attn2))
    return found


def mlp_module(block: nn.Module) -> nn.Module:
    """The module whose input ``merge_mlp`` merges: the image feed-forward, or the
    single-stream block's ``proj_mlp``."""
    return block.proj_mlp if hasattr(block, "proj_mlp") else block.ff


def unwrapped(processor):
    """The processor a patch wrapped (a patched model is checked again when patched again)."""
    return processor.original if isinstance(processor, diffusion_attention._Wrapper) else processor


def subclass_problem(block: nn.Module) -> Optional[str]:
    """Why a subclass of a joint block cannot be patched (its own forward), or None."""
    cls = original_class(block)
    base = next(known for known in dit_block_classes() if issubclass(cls, known))
    if cls.forward is not base.forward:
        return f"is a {cls.__name__}, a subclass with its own forward"
    return None


def on_another_backend(processor) -> bool:
    """Whether diffusers set ``processor`` to an attention backend or context parallelism
    (the merged attention runs torch's SDPA)."""
    return getattr(processor, "_attention_backend", None) is not None or \
        getattr(processor, "_parallel_config", None) is not None


def block_problem(block: nn.Module, scheme: str, merge_mlp: bool) -> Optional[str]:
    """Why a joint block cannot be patched with ``scheme`` and ``merge_mlp``, or None."""
    expected = _processor_classes()
    base = next(known for known in expected if isinstance(block, known))
    processor_class, _ = expected[base]
    for name, attention in attentions(block):
        processor = unwrapped(attention.processor)
        if type(processor) is not processor_class:
            return (f"has {name}.processor {type(processor).__name__}; the merged attention reproduces "
                    f"{processor_class.__name__} only (IP-Adapter and custom processors are not supported)")
        if on_another_backend(processor):
            return (f"has {name} set to another attention backend or context parallelism; the merged attention "
                    "runs torch's SDPA")
    if merge_mlp and scheme == "merge" and getattr(block, "_chunk_size", None) is not None:
        return "has a chunked feed-forward, which merge_mlp cannot merge chunk by chunk"
    return None


def basic_kv_problem(block: nn.Module) -> Optional[str]:
    """Why a BasicTransformerBlock's self-attention cannot take the kv scheme, or None."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if block.only_cross_attention:
        return "has only_cross_attention: its first attention's keys are the text, none to merge"
    attention = block.attn1
    processor = unwrapped(attention.processor)
    if type(processor) is not AttnProcessor2_0:
        return (f"has attn1.processor {type(processor).__name__}; the kv scheme reproduces AttnProcessor2_0 "
                "only")
    if attention.spatial_norm is not None or attention.group_norm is not None or attention.residual_connection:
        return "has an attn1 with a spatial or group norm or a residual connection, which the kv scheme does not run"
    return None


def check_processors(block: nn.Module, named_attentions: List[Tuple[str, nn.Module]], state) -> None:
    """Before a call of ``block`` that merges: each attention in ``named_attentions`` still
    runs the processor this patch set, on torch's SDPA.

    Raises:
        RuntimeError: a processor replaced after patching (``set_attn_processor``, an
            IP-Adapter loaded, SD3's ``fuse_qkv_projections``: the block would merge
            nothing, silently), or an attention backend or context parallelism set after
            patching (the merged attention runs torch's SDPA).
    """
    for name, attention in named_attentions:
        processor = attention.processor
        if not (isinstance(processor, diffusion_attention._Wrapper) and processor.state is state):
            raise RuntimeError(f"a patched {original_class(block).__name__}'s {name}.processor was replaced after "
                               f"patching (now {type(processor).__name__}), so this block would not merge: "
                               "patch the model again (tome_kernels.patch.diffusion) after changing processors, or "
                               "remove the patch")
        if on_another_backend(processor.original):
            raise RuntimeError(f"a patched {original_class(block).__name__}'s {name} was set to another attention "
                               "backend or context parallelism after patching; the merged attention runs torch's "
                               "SDPA: reset it (model.reset_attention_backend()) or remove the patch")


class ToMeDiTBlock:
    """A joint block's forward: the call's plan from its image tokens, then its own forward."""

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        state = self._tome_diffusion
        plan = state.plan(hidden_states)
        if plan is None:
            return super().forward(hidden_states, *args, **kwargs)
        if state.merge_attn:
            check_processors(self, attentions(self), state)
        if state.merge_mlp and getattr(self, "_chunk_size", None) is not None:
            raise ValueError("merge_mlp cannot merge a chunked feed-forward chunk by chunk: turn chunking off")
        state.begin_call(plan)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            state.end_call()


class MLPMerge:
    """The forward pre-hook and hook that run a block's feed-forward on merged image tokens.
    An object, not a closure, so that copies and pickles of the model keep working."""

    def __init__(self, state):
        self.state = state

    def before(self, _module: nn.Module, args: tuple):
        plan = self.state.mlp_plan()
        if plan is None:
            return None
        x = args[0]
        text = x.shape[1] - plan.num_tokens  # single-stream: text rows first, image last
        merged = plan.merge(x[:, text:], "mean")
        return (merged if text == 0 else torch.cat([x[:, :text], merged], dim=1), *args[1:])

    def after(self, _module: nn.Module, _args: tuple, output: Tensor):
        plan = self.state.mlp_plan()
        if plan is None:
            return None
        text = output.shape[1] - (plan.num_tokens - plan.r)
        image = plan.unmerge(output[:, text:])
        return image if text == 0 else torch.cat([output[:, :text], image], dim=1)


def install(block: nn.Module, state) -> list:
    """Patch one joint block: its attentions' processors, and with ``merge_mlp`` its
    feed-forward's hooks, whose handles are returned."""
    handles = []
    wrapper = next(wrap for cls, (_, wrap) in _processor_classes().items() if isinstance(block, cls))
    for _, attention in attentions(block):
        attention.set_processor(wrapper(attention.processor, state))
    if state.merge_mlp:
        hooks = MLPMerge(state)
        module = mlp_module(block)
        handles += [module.register_forward_pre_hook(hooks.before), module.register_forward_hook(hooks.after)]
    block._tome_diffusion = state
    block.__class__ = tome_subclass(type(block), ToMeDiTBlock)
    return handles


def restore_processors(block: nn.Module) -> None:
    """Give every attention in ``block`` the processor a patch wrapped."""
    for module in block.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, diffusion_attention._Wrapper):
            module.set_processor(processor.original)
