"""The public operations run the same arithmetic whatever mode the caller is in.

``torch.autocast`` is the mode that changes what an op computes: inside it, a matrix
product of float32 tensors runs in bfloat16 or float16. The matching's scores are such
products (the reference's ``a @ b.T``, the CPU extension's ``at::mm``), so under autocast the
reference scored in half precision and chose other tokens, and the CPU extension, whose
kernels expect float32 scores, failed ("expected scalar type Float but found BFloat16").
The contract scores in float32 whatever the activations (docs/semantics.md, "Ambient
modes"), so every public operation (``api``, ``methods``, ``MergePlan``) runs with autocast
off for its inputs' device: the decorator ``fixed_numerics`` below. Outputs are then in the
dtypes the contract gives (x's dtype, float32 sizes), as without autocast; the model's next
layer casts them again under the caller's autocast as it would any activation.

Why here and not per backend: the autocast state is thread-local and the CPU extension's
worker threads do not all see it, so a per-kernel fix would still depend on the thread
count; and a backend registered later gets the same guarantee without doing anything.
"""

import functools
import itertools

import torch
from torch import Tensor


def _device_type(args, kwargs):
    """The device type of the first tensor argument (the checks require every tensor of one
    call on one device), or None when there is none."""
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, Tensor):
            return value.device.type
    return None


def _autocast_enabled(device_type: str) -> bool:
    # A device with no autocast at all (meta) has nothing to disable, and asking whether it
    # is enabled would raise. torch.compile in torch 2.11 cannot trace the availability
    # query (an error under fullgraph=True; 2.13 traces it), and a traced tensor is on a
    # real device, which has autocast: so the query is left out while compiling.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def fixed_numerics(fn):
    """Run ``fn`` with autocast disabled for the device of its tensor arguments."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = _device_type(args, kwargs)
        # Entering a context costs a few microseconds: only when autocast is on.
        if device_type is None or not _autocast_enabled(device_type):
            return fn(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
