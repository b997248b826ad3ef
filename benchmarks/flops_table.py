"""GFLOPs (multiply-adds, the ToMe paper's unit) of timm ViTs against r, from
``tome_kernels.flops``: one image, random weights (the count does not depend on them).

    python -m benchmarks.flops_table
    python -m benchmarks.flops_table --models vit_small_patch16_224 --r 0 4 8 13 16

Counts, not timings: they are the same on every machine, so nothing is saved.
"""

import argparse
import sys

import torch

import tome_kernels.patch
from tome_kernels.flops import flop_report

from .timm_import import import_timm

# (timm name, extra create_model arguments, image size, r values)
DEFAULT_ROWS = [
    ("vit_small_patch16_224", {}, 224, [0, 8, 13, 16]),
    ("vit_base_patch16_224", {}, 224, [0, 8, 16]),
    ("vit_large_patch16_384", {"img_size": 512}, 512, [0, 20, 40]),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flops_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="timm model names (default: ViT-S/16, ViT-B/16 at 224, ViT-L/16 at 512)")
    p.add_argument("--r", nargs="+", type=int, help="r values for every model (default: per model)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    timm = import_timm()
    rows = DEFAULT_ROWS if not args.models else [(name, {}, None, [0, 8, 16]) for name in args.models]
    print("| model | image | r per block | GFLOPs | vs r = 0 | tokens into the last block |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, kwargs, img_size, r_values in rows:
        print(f"counting {name}", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        base = None
        for r in args.r or r_values:
            tome_kernels.patch.timm(model, r, backend="reference")
            report = flop_report(model, img_size)
            base = report.gflops if base is None or r == 0 else base
            print(f"| {name} | {report.img_size[0]} | {r} | {report.gflops:.3f} | {report.gflops / base:.2f} "
                  f"| {report.tokens[-1]} |")


if __name__ == "__main__":
    main()
