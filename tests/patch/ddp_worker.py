"""A few training steps of a ToMe-patched timm ViT, in one process or as one rank of
DistributedDataParallel; tests/patch/test_patch_ddp.py runs it both ways and compares.

    python -m tests.patch.ddp_worker RANK WORLD_SIZE INIT_FILE BACKEND[,BACKEND...] OUT

runs RANK's share of the global batch under DDP (gloo, ``file://INIT_FILE``), a fresh model
for each backend in turn, and saves what ``train`` records, by backend, to OUT (torch.save):
one start of the ranks (most of their time) serves every backend. The model, the batch and the
steps are defined here once, so that the test's single process builds what every rank builds.
"""

import datetime
import sys

import torch
import torch.nn.functional as F

R = 4  # tokens merged per block: 17 -> 13 -> 9 tokens at img_size 64
IMG_SIZE = 64
DEPTH = 2
NUM_CLASSES = 10
GLOBAL_BATCH = 8
STEPS = 3
LR = 0.5
# A hung rendezvous or all-reduce fails the run (the test's subprocess limit is longer).
GLOO_TIMEOUT = datetime.timedelta(seconds=60)


def make_model(r, backend, dtype=torch.float32):
    """The same random-weight ViT in every process, in training mode with every dropout at 0
    (deterministic), patched with ToMe (trace_source, to compare the merges) when r > 0."""
    import tome_kernels.patch as tome_patch

    torch.manual_seed(0)
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=DEPTH, img_size=IMG_SIZE, num_classes=NUM_CLASSES,
        drop_rate=0.0, pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
    )
    model = model.to(dtype).train()
    if r:
        tome_patch.timm(model, r, backend=backend, trace_source=True)
    return model


def global_batch(dtype=torch.float32):
    """Images and random labels of the whole global batch, the same in every process."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 3, IMG_SIZE, IMG_SIZE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)
    return x.to(dtype), y


def train(model, x, y, *, patched):
    """STEPS steps of SGD on cross-entropy, its mean over (x, y). ``model`` may be the DDP
    wrapper, and ``patched`` the patched module inside it. Returns, per step: the loss, every
    parameter's gradient (by name) and, when patched, the token map and the sizes of the last
    block's output; and the parameters after the last step."""
    import tome_kernels.patch as tome_patch

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        record = {
            "loss": loss.detach().clone(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        }
        if patched is not None:
            state = tome_patch.get_state(patched)
            record["token_map"] = state.token_map.clone()
            record["size"] = state.size.detach().clone()
        steps.append(record)
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"steps": steps, "params": params}


def main(rank, world_size, init_file, backends, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # two ranks on two cores, perhaps beside other pytest workers
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=GLOO_TIMEOUT)
    try:
        x, y = global_batch()
        share = GLOBAL_BATCH // world_size
        rows = slice(rank * share, (rank + 1) * share)
        results = {}
        for backend in backends:
            model = make_model(R, backend)
            result = train(DistributedDataParallel(model), x[rows], y[rows], patched=model)
            # DDP names parameters "module.<name>": keep the model's own names.
            result["steps"] = [dict(s, grads={n.removeprefix("module."): g for n, g in s["grads"].items()})
                               for s in result["steps"]]
            result["params"] = {n.removeprefix("module."): p for n, p in result["params"].items()}
            results[backend] = result
        torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank, world_size, init_file, backends, out = sys.argv[1:]
    main(int(rank), int(world_size), init_file, backends.split(","), out)
