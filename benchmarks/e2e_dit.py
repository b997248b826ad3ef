"""Token merging in diffusion transformers' joint text-image blocks, end to end: one denoising
step (one transformer forward) of SD3 and Flux, unpatched and through
``tome_kernels.patch.diffusion`` with each scheme at each ratio.

    python -m benchmarks.e2e_dit                                  # sd3 and flux, ratios 0.3 0.5
    python -m benchmarks.e2e_vit --dit [ARGS]                     # the same
    python -m benchmarks.e2e_dit --models sd3 --ratios 0.5 --threads 2 --out benchmarks/results

Models (random weights, eval, no_grad, built on the device), each at a 64 x 64 latent:

    sd3   SD3-medium's width: 24 heads x 64 = 1536, joint_attention_dim 4096 (projected to 1536),
          pooled 2048, qk_norm None, patch 2, 16 latent channels, pos_embed_max_size 96; but 3
          joint blocks instead of 24 (the last one context_pre_only, as in every SD3): one step
          takes ~1.6 s at B = 1 on the 2-core CPU. 32 x 32 = 1024 image tokens, 333 text tokens
          (77 CLIP + 256 T5, the pipeline's default).
    flux  Flux's head_dim 128, rotary axes (16, 56, 56), 4096-channel text and 768 pooled, no
          guidance embedding (FLUX.1-schnell's config), 1 double-stream + 2 single-stream
          blocks; 24 heads (width 3072, Flux's) on a GPU, 8 heads (1024) on a CPU, where 3072
          would take ~9x longer. The latent packed 2 x 2: 32 x 32 = 1024 image tokens, 512
          text tokens (the pipeline's max_sequence_length).

Rows per model: ``unpatched``, then at each ratio each scheme: ``merge`` (tomesd: image q / k / v
merged, the attention on T + N - r tokens, its output unmerged), ``kv`` (image keys and values
merged, log(size) proportional attention; every query kept) and ``merge_mlp`` (merge with
merge_mlp=True: the feed-forward on the merged image tokens too); random_dst=True, seed 0.
Ratio-major, so that under ``--deadline-s`` every scheme gets the first ratio. Before its first
row each model runs unpatched steps until two in a row agree within 10% (``--model-warmup``): a
fresh model's first steps on the CPU are 2-3x slower than the later ones.

Per row: the step's median time and spread over ``--reps`` (raw times kept; a widely spread
or busy row is measured again, spread.py), the speed-up over the unpatched row, the
attention share (torch.profiler over one extra step: on a CPU the CPU time of the
``aten::scaled_dot_product_attention`` ops, children included, over that step's wall time;
on a GPU their kernels' time over the time of every kernel on the device), the relative L2
distance ||out - ref|| / ||ref|| of the transformer's ``sample`` to the unpatched one on the
same inputs (in float64 from the model's dtype), and per patched block (from
``tome_kernels.patch.get_state(model).last_pass.blocks``) its N image tokens, r, and the
tokens the attention sees: queries T + N - r (merge) or T + N (kv), keys and values T + N - r.

Results, raw timings, device, versions, the machine's load and threads go to
benchmarks/results/local/e2e_dit_<device>_<time>.json (``--out`` / ``--save-record``).
``--deadline-s``: rows not started by then are recorded as skipped (the GPU run's step keeps
what it measured).
"""

import argparse
import datetime
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.autograd import DeviceType

import tome_kernels.patch

from . import report
from .measure import environment, load_average, machine, save_results, time_fn
from .spread import RETRIES, Steadiness, mark, unsteady
from .spread import settings as spread_settings

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Each patched row: (scheme, merge_mlp). "unpatched" is the model as diffusers runs it.
SCHEMES = {"merge": ("merge", False), "kv": ("kv", False), "merge_mlp": ("merge", True)}
SDPA_OP = "aten::scaled_dot_product_attention"


@dataclass
class DiTSpec:
    """One benchmarked transformer: its diffusers class and config (``gpu_config`` overrides it
    on a GPU), its latent and text sizes, and the default batch per device."""
    kind: str  # "sd3" or "flux": how its inputs are made
    cls: str
    config: Dict
    latent: int  # the latent's side, before patching / packing
    text_tokens: int
    text_dim: int
    pooled_dim: int
    gpu_config: Dict = field(default_factory=dict)
    cpu_batch: int = 1
    gpu_batch: int = 4

    def resolved(self, on_gpu: bool) -> Dict:
        return {**self.config, **(self.gpu_config if on_gpu else {})}

    def image_tokens(self) -> int:
        patch = self.config.get("patch_size", 2) if self.kind == "sd3" else 1
        side = self.latent // patch if self.kind == "sd3" else self.latent // 2
        return side * side

    def describe(self, on_gpu: bool) -> str:
        c = self.resolved(on_gpu)
        width = c["num_attention_heads"] * c["attention_head_dim"]
        blocks = (f"{c['num_layers']} joint blocks" if self.kind == "sd3"
                  else f"{c['num_layers']} double + {c['num_single_layers']} single blocks")
        return (f"{self.cls} ({blocks}, {c['num_attention_heads']} heads x {c['attention_head_dim']} = {width}), "
                f"{self.latent}x{self.latent} latent: {self.image_tokens()} image + {self.text_tokens} text tokens")

    def build(self, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
        import diffusers

        torch.manual_seed(seed)
        with device:  # the weights made where they run: a GPU builds Flux's width in a second
            model = getattr(diffusers, self.cls)(**self.resolved(device.type == "cuda"))
        # (.to(float32) would only log diffusers' note on modules to keep in float32.)
        return (model if dtype == torch.float32 else model.to(dtype)).eval()

    def inputs(self, batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> Dict:
        """The transformer's keyword arguments for one step, as its pipeline passes them."""
        g = torch.Generator(device="cpu").manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype)

        text = randn(batch, self.text_tokens, self.text_dim)
        pooled = randn(batch, self.pooled_dim)
        channels = self.config["in_channels"]
        if self.kind == "sd3":
            timestep = torch.full((batch,), 500.0, device=device, dtype=dtype)
            return {"hidden_states": randn(batch, channels, self.latent, self.latent), "encoder_hidden_states": text,
                    "pooled_projections": pooled, "timestep": timestep}
        # Flux: the latent packed in 2 x 2 patches (in_channels = 4 x the latent's 16), with
        # img_ids the packed grid's (0, row, column), as FluxPipeline._prepare_latent_image_ids.
        side = self.latent // 2
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        return {"hidden_states": randn(batch, side * side, channels), "encoder_hidden_states": text,
                "pooled_projections": pooled, "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
                "img_ids": ids.reshape(-1, 3).to(device, dtype),
                "txt_ids": torch.zeros(self.text_tokens, 3, device=device, dtype=dtype)}

    def num_blocks(self) -> int:
        return self.config["num_layers"] + self.config.get("num_single_layers", 0)


SD3_CONFIG = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 3,
              "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
              "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 96,
              "qk_norm": None}
FLUX_CONFIG = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 128,
               "num_attention_heads": 8, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
               "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}

MODELS: Dict[str, DiTSpec] = {
    "sd3": DiTSpec("sd3", "SD3Transformer2DModel", SD3_CONFIG, latent=64, text_tokens=77 + 256, text_dim=4096,
                   pooled_dim=2048),
    "flux": DiTSpec("flux", "FluxTransformer2DModel", FLUX_CONFIG, latent=64, text_tokens=512, text_dim=4096,
                    pooled_dim=768, gpu_config={"num_attention_heads": 24}),
}
# --tiny (the tests): the same structure at a 16 x 16 latent (64 image tokens), 2 heads.
TINY: Dict[str, DiTSpec] = {
    "sd3": DiTSpec("sd3", "SD3Transformer2DModel",
                   {**SD3_CONFIG, "sample_size": 16, "in_channels": 4, "out_channels": 4, "num_layers": 2,
                    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
                    "caption_projection_dim": 16, "pooled_projection_dim": 8, "pos_embed_max_size": 16},
                   latent=16, text_tokens=5, text_dim=16, pooled_dim=8, cpu_batch=2, gpu_batch=2),
    "flux": DiTSpec("flux", "FluxTransformer2DModel",
                    {**FLUX_CONFIG, "in_channels": 16, "attention_head_dim": 16, "num_attention_heads": 2,
                     "joint_attention_dim": 16, "pooled_projection_dim": 8, "axes_dims_rope": (4, 6, 6)},
                    latent=16, text_tokens=5, text_dim=16, pooled_dim=8, cpu_batch=2, gpu_batch=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e_dit", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                   help="default: sd3 and flux")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5], help="fractions of image tokens merged")
    p.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES),
                   help="patched rows at each ratio (default: all); merge_mlp is merge with merge_mlp=True")
    p.add_argument("--batch", type=int, help="default: 1 on a CPU, 4 on a GPU (two images with guidance)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before timing, after the checking step (default: 3 on a GPU, 1 on a CPU)")
    p.add_argument("--model-warmup", type=int, default=WARM_MAX_STEPS,
                   help="at most this many unpatched steps after a model's build, before its first row, until "
                        f"two in a row agree within {WARM_TOLERANCE * 100:g}%% (default {WARM_MAX_STEPS}; 0: none)")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default: 30 on a GPU, 3 on a CPU)")
    p.add_argument("--min-seconds", type=float, default=0.0, help="CPU: keep sampling steps until this long")
    p.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's own)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no row after this many seconds; the rest are recorded as skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retries", type=int, default=RETRIES,
                   help=f"times a widely spread row is measured again before it is flagged (default {RETRIES})")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests: tiny configs
    report.add_output_args(p)
    args = p.parse_args(argv)
    bad = [r for r in args.ratios if not 0 < r < 1]
    if bad:
        p.error(f"--ratios must be in (0, 1) (0 is the unpatched row, which every model gets), got {bad}")
    for name in ("batch", "reps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


# A fresh model's first steps on the CPU ran 2-3x slower than the later ones (SD3: 4.4 s, then
# 1.6 s, for the next ten rows): the unpatched row, timed first, came out 2.7x too slow. So
# every model runs unpatched steps before its first row until one is within WARM_TOLERANCE of
# the one before (at least 2, at most WARM_MAX_STEPS).
WARM_TOLERANCE = 0.1
WARM_MAX_STEPS = 8


def warm_up(step: Callable[[], object], device: torch.device, max_steps: int = WARM_MAX_STEPS) -> List[float]:
    """Seconds of each warm-up step run, until two in a row agree within WARM_TOLERANCE."""
    times: List[float] = []
    while len(times) < max_steps:
        times += time_fn(step, device, 0, 1, 0.0)
        if len(times) >= 2 and abs(times[-1] - times[-2]) <= WARM_TOLERANCE * times[-2]:
            break
    return times


def attention_time(model, inputs: Dict, device: torch.device) -> Dict:
    """One extra step under torch.profiler: the SDPA ops' time, and what it is a share of."""
    from torch.profiler import ProfilerActivity, profile

    from .measure import _native_stderr_silenced

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with _native_stderr_silenced(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Profiler clears events")  # one cycle here: nothing lost
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            model(**inputs)
            if on_gpu:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
        events = prof.events()
    return attention_share(events, wall, on_gpu)


def attention_share(events, wall: float, on_gpu: bool) -> Dict:
    """The SDPA ops' time from a profile's events, and its share: on a GPU, their kernels' time
    (``device_time_total``: each op's kernels and its children's) over every kernel's (the
    events on the device: the CPU ops carry copies of their kernels, which would count twice);
    on a CPU, their CPU time, children included, over the step's wall time."""
    sdpa = [e for e in events if e.name == SDPA_OP]
    if on_gpu:
        attn = sum(e.device_time_total for e in sdpa) / 1e6
        total = sum(e.device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e6
    else:
        attn, total = sum(e.cpu_time_total for e in sdpa) / 1e6, wall
    return {"attn_s": attn, "profiled_total_s": total, "profiled_wall_s": wall, "sdpa_calls": len(sdpa),
            "attn_share": attn / total if total > 0 else None}


def rel_l2(out: torch.Tensor, ref: Optional[torch.Tensor]) -> Optional[float]:
    if ref is None:
        return None
    ref64 = ref.double()
    return ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def block_fields(spec: DiTSpec, model, scheme: Optional[str]) -> Dict:
    """Per block: N image tokens, r, and the tokens its attention's queries and keys see."""
    text = spec.text_tokens
    if scheme is None:
        n = spec.image_tokens()
        blocks = [(n, 0)] * spec.num_blocks()
    else:
        blocks = [(c.tokens, c.r) for c in tome_kernels.patch.get_state(model).last_pass.blocks]
    return {"image_tokens_per_block": [n for n, _ in blocks], "r_per_block": [r for _, r in blocks],
            "attn_keys_per_block": [text + n - r for n, r in blocks],
            "attn_queries_per_block": [text + n - (r if scheme == "merge" else 0) for n, r in blocks]}


def _measure(name: str, spec: DiTSpec, model, inputs: Dict, variant: str, ratio: float, ref, device, args,
             settings, steady: Steadiness) -> Tuple[Dict, Optional[torch.Tensor]]:
    batch = inputs["hidden_states"].shape[0]
    scheme, merge_mlp = SCHEMES.get(variant, (None, False))
    row = {"model": name, "batch": batch, "variant": variant, "scheme": scheme, "merge_mlp": merge_mlp,
           "ratio": ratio, "random_dst": True, "seed": args.seed}
    output = None
    try:
        if scheme is None:
            tome_kernels.patch.remove(model)
        else:
            tome_kernels.patch.diffusion(model, ratio, scheme=scheme, merge_mlp=merge_mlp, random_dst=True,
                                         seed=args.seed)
        start = time.perf_counter()
        output = model(**inputs).sample.float().cpu()  # the checking step; .cpu() waits for the device
        row["first_pass_s"] = time.perf_counter() - start
        row.update(block_fields(spec, model, scheme))
        row["rel_l2_vs_unpatched"] = 0.0 if scheme is None else rel_l2(output, ref)
        timed = steady.measure(
            lambda: [time_fn(lambda: model(**inputs), device, settings["warmup"], settings["reps"],
                             args.min_seconds)], log=report.log)[0]
        row.update(attention_time(model, inputs, device))
    except Exception as exc:  # one row failing must not lose the rest of the table
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}, None
    row.update(status="ok", times_s=timed["times_s"], median_s=timed["spread"]["median_s"], spread=timed["spread"],
               flags=timed["flags"], attempts=timed["attempts"], retries_allowed=timed["retries_allowed"],
               others_cpu_share=timed["others_cpu_share"], discarded_times_s=timed["discarded_times_s"])
    return row, output


def plan_runs(args: argparse.Namespace) -> List[Tuple[str, float]]:
    """A model's rows in the order they run, as (variant, ratio): unpatched (ratio 0), then
    ratio-major every scheme."""
    return [("unpatched", 0.0)] + [(v, r) for r in args.ratios for v in args.schemes]


def _skipped(name: str, batch: int, variant: str, ratio: float, args) -> Dict:
    scheme, merge_mlp = SCHEMES.get(variant, (None, False))
    return {"model": name, "batch": batch, "variant": variant, "scheme": scheme, "merge_mlp": merge_mlp,
            "ratio": ratio, "status": "skipped", "reason": f"not started: past --deadline-s {args.deadline_s:g}"}


def _add_comparisons(rows: List[Dict]) -> None:
    unpatched = next((r for r in rows if r["status"] == "ok" and r["variant"] == "unpatched"), None)
    for r in rows:
        if r["status"] != "ok":
            continue
        r["speedup_vs_unpatched"] = unpatched["median_s"] / r["median_s"] if unpatched else None
        if unpatched is not None and unpatched is not r and unsteady(unpatched) and "baseline" not in r["flags"]:
            r["flags"].append("baseline")


def run(args: argparse.Namespace, on_row: Optional[Callable[[Dict], None]] = None) -> Dict:
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    load_before = load_average()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    specs = TINY if args.tiny else MODELS
    names = args.models or list(specs)
    settings = {"dtype": str(dtype).replace("torch.", ""),
                "reps": args.reps if args.reps is not None else (30 if on_gpu else 3),
                "warmup": args.warmup if args.warmup is not None else (3 if on_gpu else 1),
                "min_seconds": args.min_seconds, "spread": spread_settings(args.retries), "seed": args.seed,
                "ratios": args.ratios, "schemes": {v: SCHEMES[v] for v in args.schemes}, "tiny": args.tiny,
                "timer": "cuda events, L2 flushed before each call" if on_gpu else "time.perf_counter",
                "model_warmup": {"max_steps": args.model_warmup, "tolerance": WARM_TOLERANCE},
                "step": "one transformer forward (one denoising step) under torch.no_grad",
                "attention_share": ("torch.profiler over one extra step: device time of the aten::"
                                    "scaled_dot_product_attention ops' kernels over the time of every kernel "
                                    "on the device" if on_gpu else
                                    "torch.profiler over one extra step: CPU time of the aten::"
                                    "scaled_dot_product_attention ops (children included) over the step's wall "
                                    "time"),
                "distance": "||sample - unpatched sample|| / ||unpatched sample||, same inputs, in float64 from the "
                            "model's dtype",
                "default_schemes": {k: v[0] for k, v in _default_schemes().items()},
                "models": {n: {"class": specs[n].cls, "config": specs[n].resolved(on_gpu),
                               "latent": specs[n].latent, "image_tokens": specs[n].image_tokens(),
                               "text_tokens": specs[n].text_tokens} for n in names},
                "deadline_s": args.deadline_s}
    results = {"benchmark": "e2e_dit",
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **environment(device), "machine": machine(load_before), "settings": settings, "rows": []}
    rows: List[Dict] = results["rows"]
    steady = Steadiness(args.retries)
    runs = plan_runs(args)

    def late() -> bool:
        return args.deadline_s is not None and time.monotonic() - started > args.deadline_s

    with torch.no_grad():
        for name in names:
            spec = specs[name]
            batch = args.batch if args.batch is not None else (spec.gpu_batch if on_gpu else spec.cpu_batch)
            if late():  # not even the model is built
                rows += [_skipped(name, batch, v, r, args) for v, r in runs]
                continue
            report.log(f"{name}: building {spec.describe(on_gpu)}, random weights, in {settings['dtype']}")
            start = time.perf_counter()
            model = spec.build(device, dtype, args.seed)
            inputs = spec.inputs(batch, device, dtype, args.seed)
            settings["models"][name]["build_s"] = time.perf_counter() - start
            warm = warm_up(lambda m=model, x=inputs: m(**x), device, args.model_warmup)
            settings["models"][name]["warmup_times_s"] = warm
            report.log(f"  warm-up: {len(warm)} unpatched steps, " + ", ".join(f"{t * 1e3:.4g}" for t in warm) + " ms")
            first, ref = len(rows), None
            for i, (variant, ratio) in enumerate(runs):
                if late():
                    rows.append(_skipped(name, batch, variant, ratio, args))
                    continue
                report.log(f"[{i + 1}/{len(runs)}] {name} B={batch} {variant} ratio={ratio:g}")
                row, output = _measure(name, spec, model, inputs, variant, ratio, ref, device, args, settings,
                                       steady)
                if variant == "unpatched":
                    ref = output
                rows.append(row)
                _add_comparisons(rows[first:])
                if on_row:
                    on_row(results)
            tome_kernels.patch.remove(model)
            del model, inputs, ref
            if on_gpu:
                torch.cuda.empty_cache()
    results["machine"] = machine(load_before)  # the load after the last row
    return results


def _default_schemes() -> Dict:
    # tome_kernels.patch.diffusion is the patch function; the module holds the table.
    import importlib

    return dict(importlib.import_module("tome_kernels.patch.diffusion").DEFAULT_SCHEMES)


def _per_block(values: List[int]) -> str:
    """One number when every block has it, else them all."""
    return str(values[0]) if len(set(values)) == 1 else ",".join(map(str, values))


HEADER = ["model", "B", "scheme", "ratio", "r / block", "attn q/kv tokens", "ms", "spread", "vs unpatched", "attn %",
          "rel L2", "flags"]


def format_table(results: Dict) -> str:
    s = results["settings"]
    head = report.wrap(
        f"device: {results['device']['name']} | torch {results['versions']['torch']} | dtype {s['dtype']} | "
        f"median of {s['reps']} steps or more | random_dst, seed {s['seed']}") + report.conditions_line(results)
    errors = report.error_notes([{**r, "provider": r["variant"]} for r in results["rows"]])
    body = []
    for r in results["rows"]:
        cells = [r["model"], str(r["batch"]), r["variant"], f"{r['ratio']:g}"]
        if r["status"] != "ok":
            body.append(cells + [f"{r['status']} [{errors[report.error_key({**r, 'provider': r['variant']})]}]"]
                        + [""] * 7)
            continue
        share = r.get("attn_share")
        ms = r["median_s"] * 1e3
        body.append(cells + [
            _per_block(r["r_per_block"]),
            f"{_per_block(r['attn_queries_per_block'])}/{_per_block(r['attn_keys_per_block'])}",
            f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}", f"{r['spread']['iqr_rel']:.0%}",
            "" if r.get("speedup_vs_unpatched") is None else f"{report.num(r['speedup_vs_unpatched'])}x",
            "" if share is None else f"{share * 100:.1f}",
            "" if r.get("rel_l2_vs_unpatched") is None else f"{r['rel_l2_vs_unpatched']:.2e}",
            mark(r.get("flags", ()))])
    explained = [
        "ms: median time of one step (one transformer forward); spread: the interquartile range over the median; "
        "r / block: image tokens merged in each joint block; attn q/kv tokens: the tokens the attention's queries "
        "and its keys / values span (text + image), per block; attn %: the share of a profiled step spent in "
        "scaled_dot_product_attention (" + ("device time" if results["device"]["type"] == "cuda" else "CPU time")
        + "); rel L2: ||sample - unpatched|| / ||unpatched||. merge: tomesd (q, k, v merged, output unmerged); "
        "kv: keys and values merged with log(size) attention; merge_mlp: merge with the feed-forward on the merged "
        "tokens too."]
    models = [f"{n}: {m['class']} {_config_line(m)}" for n, m in s["models"].items()]
    table = report.table(HEADER, "lrlrrrrrrrrl", body)
    labelled = [{**r, "provider": r["variant"]} for r in results["rows"]]
    return "\n".join(head + [""] + table + report.notes({**results, "rows": labelled}, errors, _label,
                                                         explained + models))


def _config_line(m: Dict) -> str:
    c = m["config"]
    blocks = (f"{c['num_layers']} double + {c['num_single_layers']} single blocks" if "num_single_layers" in c
              else f"{c['num_layers']} joint blocks")
    return (f"({blocks}, {c['num_attention_heads']} x {c['attention_head_dim']}), {m['image_tokens']} image + "
            f"{m['text_tokens']} text tokens.")


def _label(row: Dict) -> str:
    return f"{row['model']} {row['variant']} ratio={row['ratio']:g}"


def save(results: Dict, out_dir: str) -> str:
    return save_results(results, out_dir, "e2e_dit_")


def main(argv=None) -> Dict:
    return report.main_saving_each_row("benchmarks.e2e_dit", argv, parse_args, run, format_table, save)


if __name__ == "__main__":
    main()
