"""GFLOPs (multiply-adds, the ToMe paper's unit) of timm ViTs against r, from
``tome_kernels.flops``: one image, random weights (the count does not depend on them).
ToMe at every r; at matched token budgets, PiToMe (the same r) and DSM (delay d, the same
total r * L) on DeiT-S at r = 13 and ViT-B/16 at r = 16.

    python -m benchmarks.flops_table
    python -m benchmarks.flops_table --models vit_small_patch16_224 --r 0 4 8 13 16

Counts, not timings: they are the same on every machine, so nothing is saved.

The merge column is what the counter sees between each block's attention and its MLP (the
counting pass runs every merge through the reference backend): for ToMe the A-by-B
similarity, ceil(N/2) * floor(N/2) * head_dim per merging block; for PiToMe the energy's
similarity over the N - 1 tokens after the class token ((N - 1)^2 * head_dim, given apart)
and the assignment's, which the reference
also computes over all N x N pairs; for DSM, the window stage's N x N assignment at its
first merging block and ToMe's matching after it.
"""

import argparse
import sys

import torch

import tome_kernels.patch
from tome_kernels.flops import flop_report

# (timm name, extra create_model arguments, image size, r values)
DEFAULT_ROWS = [
    ("vit_small_patch16_224", {}, 224, [0, 8, 13, 16]),
    ("vit_base_patch16_224", {}, 224, [0, 8, 16]),
    ("vit_large_patch16_384", {"img_size": 512}, 512, [0, 20, 40]),
]
# The other methods at the r of ToMe they are matched with: (timm name, r).
MATCHED = {"vit_small_patch16_224": 13, "vit_base_patch16_224": 16}
OTHER_METHODS = [("pitome", {}), ("dsm", {"delay": 2}), ("dsm", {"delay": 4})]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flops_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="timm model names (default: ViT-S/16, ViT-B/16 at 224, ViT-L/16 at 512)")
    p.add_argument("--r", nargs="+", type=int, help="r values for every model (default: per model)")
    p.add_argument("--tome-only", action="store_true", help="leave out the PiToMe and DSM rows")
    return p.parse_args(argv)


def _label(method: str, options: dict) -> str:
    return method if not options else f"{method} (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"


def energy_gflops(report, head_dim: int, method: str, protected: int) -> float:
    """PiToMe's energy, (N - protected)^2 * head_dim multiply-adds in every block that merges:
    the protected tokens are left out, and the keys are averaged over the heads before the
    similarity."""
    if method != "pitome":
        return 0.0
    return sum((b.tokens_in - protected) ** 2 * head_dim for b in report.blocks if b.tokens_out < b.tokens_in) / 1e9


def main(argv=None) -> None:
    args = parse_args(argv)
    import timm  # here, not at the top: the module imports without timm
    rows = DEFAULT_ROWS if not args.models else [(name, {}, None, [0, 8, 16]) for name in args.models]
    print("| model | image | method | r per block | GFLOPs | vs r = 0 | merge GFLOPs (energy) | tokens removed "
          "| tokens into the last block |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, kwargs, img_size, r_values in rows:
        print(f"counting {name}", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        head_dim = model.blocks[0].attn.head_dim
        r_values = list(args.r or r_values)
        runs = []
        if not args.tome_only and name in MATCHED:
            r_values += [MATCHED[name]] if MATCHED[name] not in r_values else []
            runs = [(method, options, MATCHED[name]) for method, options in OTHER_METHODS]
        runs = [("tome", {}, r) for r in r_values] + runs
        base = None
        for method, options, r in runs:
            tome_kernels.patch.timm(model, r, method=method, backend="reference", **options)
            report = flop_report(model, img_size)
            base = report.gflops if base is None or r == 0 else base
            removed = sum(b.tokens_in - b.tokens_out for b in report.blocks)
            state = tome_kernels.patch.get_state(model)
            protected = int(state.class_token) + int(state.distill_token)
            energy = energy_gflops(report, head_dim, method, protected)
            merge = f"{report.merge_gflops:.4f}" + (f" ({energy:.4f})" if energy else "")
            print(f"| {name} | {report.img_size[0]} | {_label(method, options)} | {r} | {report.gflops:.3f} "
                  f"| {report.gflops / base:.2f} | {merge} | {removed} | {report.tokens[-1]} |")


if __name__ == "__main__":
    main()
