"""End-to-end throughput of ViTs (timm's, and transformers' CLIP and DINOv2 vision encoders),
unpatched and with ToMe through each merge backend.

    python -m benchmarks.e2e_vit                                   # defaults for this device
    python -m benchmarks.e2e_vit --models vit_b16_224 --batch 64 --providers unpatched reference auto
    python -m benchmarks.e2e_vit --models clip_b16_224 dinov2_s14_reg_224 --attention bias flex

For each model (random weights, eval mode, inference mode), provider and r: the median
forward time and its spread, images per second, the speed-up over the unpatched model and
over ToMe through the ``reference`` backend at the same r, the time spent merging and its
share of the forward time, the tokens left after the last block and how far the logits are
from ToMe through ``reference``. Providers: ``unpatched`` (plain timm: the r = 0 point),
``tome_reference``, and ``tome_<backend>`` for the backend ``auto`` picks here (plus, on a
GPU, every other fast backend that can run). Each ToMe provider runs at the model's r and
at its sweep's (ViT-B/16: r = 4, 8, 12, 16), for the plot of images/s against r. The
transformers models (benchmarks/e2e_models.py: CLIP ViT-B/16's vision tower, DINOv2-S/14 with
registers; r = 16) run proportional attention by a forced implementation per row: every ToMe
provider by SDPA with the log(size) float mask, and auto's backend also by compiled
FlexAttention (``tome_<backend>_flex``; ``--attention`` chooses). A timing
that spreads widely or was taken beside other work is measured again, then flagged
(spread.py). Raw timings, the machine's load and thread settings, device, versions and
commit go to benchmarks/results/local/e2e_<device>_<time>.json (``--save-record``:
benchmarks/results/). ``--deadline-s``: rows not started by then are recorded as skipped (the
GPU run's steps keep what they measured).

Proportional attention (``--prop-attn [ARGS]``, benchmarks/prop_attn.py): one ViT-B/16
attention at the token counts ToMe leaves, SDPA without a mask, with the (B, 1, 1, N) log(size)
mask, and compiled FlexAttention; its own table and JSON (prop_attn_<device>_<time>.json), run
only on request (``bash scripts/bench.sh e2e --prop-attn``): its compiles would add minutes to
the main job.

Diffusion transformers (``--dit [ARGS]``, benchmarks/e2e_dit.py): one denoising step of SD3 and
Flux, unpatched and through ``tome_kernels.patch.diffusion`` with each scheme; its own table and
JSON (e2e_dit_<device>_<time>.json), run only on request.

Merge share: the first, untimed forward pass of each patched model (an extra eager one under
--compile) records every block's merge inputs (tokens, keys, sizes, r); each block's merge is
then re-run alone, with the same backend and timer, and the sum of the per-block medians is
divided by the median forward time. On a GPU the timer flushes L2 before every call, so
these merges run cache-cold, while inside the forward pass their inputs may still partly sit
in L2: the share is, if anything, an overestimate. Each merge is re-run through the patch's
own merge (``ToMeState.merge``), so what the forward pass does around the kernel (DINOv2's
registers set aside and put back) is counted too.
"""

import argparse
import datetime
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

import tome_kernels
import tome_kernels.patch
from tome_kernels.backends import select_backend
from tome_kernels.patch import prop_attention
from tome_kernels.reference import clamp_r

from . import report
from .e2e_models import MODELS, SUFFIX, ModelSpec, forced_prop_attention
from .measure import environment, load_average, machine, save_results, time_fn
from .providers import unavailable_reason
from .spread import RETRIES, Steadiness, mark, spread, unsteady
from .spread import settings as spread_settings

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}




def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e_vit", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=None, help=f"default: all ({', '.join(MODELS)})")
    p.add_argument("--batch", type=int, help="images per forward pass for every model (default: per model and device)")
    p.add_argument("--full-size", action="store_true", help="use the GPU batch sizes even on a CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on a GPU, float32 on a CPU")
    p.add_argument("--r", type=int, help="tokens merged per block for every model (default: per model)")
    p.add_argument("--sweep", type=int, nargs="*", default=None,
                   help="further r values, each timed with every ToMe provider (default: per model, 4 8 12 for "
                        "ViT-B/16); --sweep alone: none")
    p.add_argument("--providers", nargs="+", default=None,
                   help="unpatched, reference, auto, or backend names (tome_ prefix optional); default: unpatched, "
                        "reference, auto, and on a GPU every other fast backend that can run")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing, after the checking pass (default: 3 on a GPU, 0 on a CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed forward passes (default: 30 on a GPU, 3 on a CPU)")
    p.add_argument("--merge-reps", type=int, default=None,
                   help="timed calls of each block's merge (default: max(reps, 5))")
    p.add_argument("--min-seconds", type=float, default=0.5, help="CPU: keep sampling forward passes until this long")
    p.add_argument("--attention", nargs="+", choices=list(SUFFIX), default=list(SUFFIX),
                   help="transformers models: the proportional-attention implementations forced in their ToMe rows: "
                        "bias (SDPA with the log(size) float mask) for every provider, flex (compiled "
                        "FlexAttention) for auto's backend (default: both)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no row after this many seconds; the rest are recorded as skipped")
    p.add_argument("--compile", action="store_true", help="time each provider's model under torch.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retries", type=int, default=RETRIES,
                   help=f"times a row whose timings spread widely is measured again before it is flagged "
                        f"(default {RETRIES})")
    report.add_output_args(p)
    # Proportional attention's own table (benchmarks/prop_attn.py): a separate invocation, not
    # part of the main job, since its FlexAttention compiles one kernel per token count (minutes
    # on the 2-core CPU, cold).
    p.add_argument("--prop-attn", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="run only the proportional-attention table (python -m benchmarks.prop_attn ARGS; "
                        "--prop-attn --help lists them); must come last")
    # The diffusion transformers' table (benchmarks/e2e_dit.py): SD3 and Flux, a separate invocation.
    p.add_argument("--dit", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="run only the diffusion transformers' table (python -m benchmarks.e2e_dit ARGS; "
                        "--dit --help lists them); must come last")
    return p.parse_args(argv)



def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    return spec.build(device, dtype, seed)


def expected_tokens(num_tokens: int, r_per_block: List[int], protected: int) -> int:
    """Tokens left after every block merged its r, each clamped to (N - protected) // 2."""
    for r in r_per_block:
        num_tokens -= clamp_r(r, num_tokens, protected >= 1, protected >= 2)
    return num_tokens


def _resolve_providers(requested: Optional[List[str]], device: torch.device, dtype: torch.dtype) -> List[Dict]:
    """Each provider as {"name", "backend"}; backend None for the unpatched model. A backend
    that cannot run here gets a "reason" instead of being dropped, so the table says why."""
    sample = [torch.empty(1, 4, 8, device=device, dtype=dtype), torch.empty(1, 2, 4, 8, device=device, dtype=dtype)]
    auto = select_backend("auto", sample).name
    if requested is None:
        requested = ["unpatched", "reference", "auto"]
        if device.type == "cuda":
            requested += [n for n, s in tome_kernels.available_backends().items()
                          if n != "reference" and s.available and not unavailable_reason(n, {"t": sample[0]})]
    known = list(tome_kernels.available_backends())
    out: List[Dict] = []
    for item in requested:
        name = item[len("tome_"):] if item.startswith("tome_") else item
        if name == "auto":
            name = auto
        elif name != "unpatched" and name not in known:
            raise SystemExit(f"unknown provider {item!r}; known: unpatched, auto, {', '.join(known)}")
        provider = "unpatched" if name == "unpatched" else f"tome_{name}"
        if any(p["name"] == provider for p in out):
            continue
        entry = {"name": provider, "backend": None if name == "unpatched" else name, "auto": name == auto}
        if name not in ("unpatched", "reference"):
            entry["reason"] = unavailable_reason(name, {"x": sample[0], "keys": sample[1]})
        out.append(entry)
    return out


def record_merges(model: torch.nn.Module, images: torch.Tensor):
    """One forward pass of a patched model that keeps every block's merge inputs; returns
    the output and the inputs, one dict per merge."""
    state = tome_kernels.patch.get_state(model)
    calls: List[Dict] = []
    merge = state.merge

    def recording_merge(x, r):
        calls.append({"x": x, "keys": state.keys, "size": state.size, "r": r, "block": state.block})
        return merge(x, r)

    state.merge = recording_merge
    try:
        output = model(images)
    finally:
        del state.merge  # back to the class's method
    return output, calls


def time_merges(calls: List[Dict], state, backend: str, device, warmup: int, reps: int) -> List[List[float]]:
    """Seconds per call of each recorded block's merge, re-run alone with ``backend`` through
    the state's own merge, as the block runs it; the state's last pass is put back after."""
    saved, own_backend = state.save_pass(), state.backend
    state.backend = backend
    per_block = []
    try:
        for c in calls:
            def step(c=c):
                state.size, state.keys, state.block = c["size"], c["keys"], c["block"]
                return state.merge(c["x"], c["r"])

            per_block.append(time_fn(step, device, warmup, reps, 0.0))
    finally:
        state.backend = own_backend
        state.restore_pass(saved)
    return per_block


def _measure(spec_name: str, spec: ModelSpec, model, images, provider: Dict, r: int, device, args, settings,
             steady: Steadiness) -> Dict:
    batch = images.shape[0]
    row = {"model": spec_name, **spec.row_fields(), "img_size": spec.img_size, "batch": batch,
           "provider": provider["name"], "backend": provider["backend"], "auto": provider["auto"],
           "r": 0 if provider["backend"] is None else r}
    if "prop_attn" in provider:
        row["prop_attn"] = provider["prop_attn"]
    if provider.get("reason"):
        return {**row, "status": "unavailable", "reason": provider["reason"]}
    tome = provider["backend"] is not None
    try:
        with forced_prop_attention(provider.get("prop_attn")):
            if tome:
                spec.patch(model, r, provider["backend"])
            else:
                tome_kernels.patch.remove(model)
            if args.compile:
                torch._dynamo.reset()  # each provider is its own model to dynamo: no recompile limits
            runner = torch.compile(model) if args.compile else model
            calls = None
            start = time.perf_counter()
            if tome and not args.compile:
                # The checking pass (logits, tokens) records the merges too, and warms up.
                output, calls = record_merges(model, images)
            else:
                output = runner(images)  # the checking pass: compiles if it does, warms up
            logits = spec.output(output).float().cpu()  # .cpu() waits for the device: the pass is over
            row["first_pass_s"] = time.perf_counter() - start  # with any compile (FlexAttention's, --compile's)
            if tome:
                state = tome_kernels.patch.get_state(model)
                if calls is None:  # under torch.compile: record eagerly, the merges are timed alone anyway
                    calls = record_merges(model, images)[1]
                protected = int(state.class_token) + int(state.distill_token)
                registers = state.register_tokens  # never merged: the clamps count the other tokens
                row.update(r_per_block=list(state.r), tokens_per_block=[c["x"].shape[1] for c in calls],
                           tokens_in=state.num_input_tokens,
                           tokens_last_block=state.num_input_tokens if state.size is None else state.size.shape[1],
                           tokens_expected=registers + expected_tokens(state.num_input_tokens - registers, state.r,
                                                                       protected))
                per_block = time_merges(calls, state, provider["backend"], device, settings["warmup"] + 1,
                                        settings["merge_reps"])
                del calls  # on a GPU, every block's inputs: give the memory back before timing
                row.update(merge_times_s=per_block, merge_s=sum(statistics.median(t) for t in per_block))
            timed = steady.measure(
                lambda: [time_fn(lambda: runner(images), device, settings["warmup"], settings["reps"],
                                 args.min_seconds)],
                log=report.log)[0]
    except Exception as exc:  # one provider failing must not lose the rest of the table
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    median = timed["spread"]["median_s"]
    row.update(status="ok", times_s=timed["times_s"], median_s=median, spread=timed["spread"], flags=timed["flags"],
               attempts=timed["attempts"], retries_allowed=timed["retries_allowed"],
               others_cpu_share=timed["others_cpu_share"],
               discarded_times_s=timed["discarded_times_s"], images_per_s=batch / median, logits=logits)
    if tome:
        row["merge_share"] = row["merge_s"] / median
        if row["merge_share"] > 1:
            row["flags"].append("merge_share")
    return row


def _max_abs_diff(row: Dict, other: Optional[Dict]) -> Optional[float]:
    return None if other is None else (row["logits"] - other["logits"]).abs().max().item()


def _add_comparisons(rows: List[Dict]) -> None:
    """Each row of one model against the unpatched model and against ToMe through
    ``reference`` at the same r; a ratio over a baseline not measured steadily is flagged."""
    ok = [r for r in rows if r["status"] == "ok"]
    unpatched = next((r for r in ok if r["provider"] == "unpatched"), None)
    refs = {r["r"]: r for r in ok if r["provider"] == "tome_reference"}
    for r in ok:
        ref = refs.get(r["r"])
        r["speedup_vs_unpatched"] = unpatched["median_s"] / r["median_s"] if unpatched else None
        r["speedup_vs_tome_reference"] = ref["median_s"] / r["median_s"] if ref and r["backend"] else None
        r["logits_max_abs"] = r["logits"].abs().max().item()
        if r["backend"] is not None:
            r["logits_max_abs_diff_vs_tome_reference"] = _max_abs_diff(r, ref)
        r["logits_max_abs_diff_vs_unpatched"] = _max_abs_diff(r, unpatched)
        baselines = [b for b in (unpatched, ref if r["backend"] else None) if b is not None and b is not r]
        if any(unsteady(b) for b in baselines):
            r["flags"].append("baseline")
    for r in ok:
        del r["logits"]


def r_values(spec: ModelSpec, args: argparse.Namespace) -> List[int]:
    """The r values a model's ToMe providers run at: its r and its sweep, or the command line's;
    r = 0 is the unpatched model's row."""
    r = spec.r if args.r is None else args.r
    sweep = spec.sweep if args.sweep is None else args.sweep
    return sorted({r, *sweep} - {0})


def plan_runs(spec: ModelSpec, providers: List[Dict], args: argparse.Namespace) -> List[Tuple[Dict, int]]:
    """A model's rows in the order they run, as (provider, r): the unpatched model once (r = 0),
    then each r with every ToMe provider; a transformers model's ToMe providers once per
    proportional-attention implementation in ``--attention`` (flex for auto's backend only: one
    FlexAttention row shows its cost, and each takes a compile; last, so that a deadline takes
    it before the cheap rows), the implementation in the provider's "prop_attn"."""
    tome = [p for p in providers if p["backend"] is not None]
    if spec.attentions:
        attentions = [a for a in spec.attentions if a in args.attention]
        unavailable = prop_attention.flex_unavailable_reason(args.device)
        if "flex" in attentions and unavailable is not None:
            print(f"e2e: no FlexAttention rows: {unavailable}", file=sys.stderr)
            attentions.remove("flex")
        tome = [{**p, "name": p["name"] + SUFFIX[a], "prop_attn": a} for a in attentions
                for p in tome if a == "bias" or p["auto"]]
    return [(p, 0) for p in providers if p["backend"] is None] + [(p, r) for r in r_values(spec, args) for p in tome]


def _skipped(name: str, spec: ModelSpec, batch: int, provider: Dict, r: int, args: argparse.Namespace) -> Dict:
    return {"model": name, **spec.row_fields(), "img_size": spec.img_size, "batch": batch, "provider": provider["name"],
            "backend": provider["backend"], "auto": provider["auto"], "r": r if provider["backend"] else 0,
            "status": "skipped", "reason": f"not started: past --deadline-s {args.deadline_s:g}"}


def run(args: argparse.Namespace) -> Dict:
    started = time.monotonic()
    load_before = load_average()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if on_gpu else torch.float32)
    reps = args.reps or (30 if on_gpu else 3)
    settings = {"dtype": str(dtype).replace("torch.", ""), "reps": reps,
                "warmup": args.warmup if args.warmup is not None else (3 if on_gpu else 0),
                "merge_reps": args.merge_reps or max(reps, 5), "min_seconds": args.min_seconds,
                "spread": spread_settings(args.retries),
                "compile": args.compile, "seed": args.seed,
                "timer": "cuda events, L2 flushed before each call" if on_gpu else "time.perf_counter",
                "merge_timing": "each block's merge re-run alone on the inputs recorded in one eager forward pass; "
                                "share = sum of per-block medians / median forward time",
                # What the transformers models' unforced proportional attention would run here.
                "prop_attn_choice": {"device": device.type, "implementation": prop_attention.choose(device)},
                "deadline_s": args.deadline_s}
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    providers = _resolve_providers(args.providers, device, dtype)
    rows: List[Dict] = []
    steady = Steadiness(args.retries)
    def late() -> bool:
        return args.deadline_s is not None and time.monotonic() - started > args.deadline_s

    with torch.inference_mode():
        for name in names:
            spec = MODELS[name]
            runs = plan_runs(spec, providers, args)
            batch = args.batch or (spec.gpu_batch if on_gpu or args.full_size else spec.cpu_batch)
            if late():  # not even the model is built
                rows += [_skipped(name, spec, batch, p, r, args) for p, r in runs]
                continue
            report.log(f"{name}: building {spec.describe()}, random weights, in {settings['dtype']}")
            model = build_model(spec, device, dtype, args.seed)
            g = torch.Generator(device="cpu").manual_seed(args.seed)
            images = torch.randn(batch, 3, spec.img_size, spec.img_size, generator=g).to(device, dtype)
            group = []
            for i, (provider, r) in enumerate(runs):
                if late():
                    group.append(_skipped(name, spec, batch, provider, r, args))
                    continue
                report.log(f"[{i + 1}/{len(runs)}] {name} B={batch} {provider['name']} r={r}")
                group.append(_measure(name, spec, model, images, provider, r, device, args, settings, steady))
            _add_comparisons(group)
            rows += group
            del model, images
            if on_gpu:
                torch.cuda.empty_cache()
    return {
        "benchmark": "e2e_vit",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(device),
        "machine": machine(load_before),
        "settings": settings,
        "rows": rows,
    }


def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{report.num(value)}x"


def _ms(seconds: float) -> str:
    """Tenths of a millisecond, whole ones from 1 s: the column stays narrow."""
    return f"{seconds * 1e3:.0f}" if seconds >= 1 else f"{seconds * 1e3:.1f}"


HEADER = ["model", "B", "provider", "r", "ms", "spread", "img/s", "vs unpatched", "vs ref", "merge ms (%)", "tokens",
          "logit diff", "flags"]


def format_table(results: Dict) -> str:
    s = results["settings"]
    head = report.wrap(
        f"device: {results['device']['name']} | torch {results['versions']['torch']} | dtype {s['dtype']} | "
        f"median of {s['reps']} forward passes or more{' | torch.compile' if s['compile'] else ''}"
    ) + report.conditions_line(results)
    errors = report.error_notes(results["rows"])
    body = []
    for r in results["rows"]:
        cells = [r["model"], str(r["batch"]), r["provider"], _fmt(r["r"], "d")]
        if r["status"] == "unavailable":
            continue  # named once under the table
        if r["status"] != "ok":
            body.append(cells + [f"{r['status']} [{errors[report.error_key(r)]}]"] + [""] * 8)
            continue
        merge = r.get("merge_s")
        # Results saved before the spreads were recorded have none: computed from their times.
        iqr = (r.get("spread") or spread(r["times_s"]))["iqr_rel"]
        body.append(cells + [
            _ms(r["median_s"]), f"{iqr:.0%}", report.num(r["images_per_s"]),
            _ratio(r["speedup_vs_unpatched"]), _ratio(r["speedup_vs_tome_reference"]),
            "" if merge is None else f"{report.num(merge * 1e3)} ({report.num(r['merge_share'] * 100)}%)",
            _fmt(r.get("tokens_last_block"), "d"), _fmt(r.get("logits_max_abs_diff_vs_tome_reference"), ".1e"),
            mark(r.get("flags", ()))])
    explained = ["ms: median forward time; spread: the interquartile range of the timed passes over the median (min, "
                 "quartiles, max in the JSON); vs ref: speed-up over tome_reference at the same r; merge ms: the "
                 "merges re-run alone, summed over the blocks (their share of the forward time); tokens: left "
                 "after the last block; logit diff: largest absolute difference from tome_reference's logits."]
    if any("prop_attn" in r for r in results["rows"]):
        explained.append("transformers models: the pooled output stands for the logits; their ToMe rows run "
                         "proportional attention by SDPA with the log(size) float mask, those ending _flex by "
                         "compiled FlexAttention (its compile in first_pass_s in the JSON), compared with "
                         "tome_reference's SDPA-mask row.")
    table = report.table(HEADER, "lrlrrrrrrrrrl", body)
    return "\n".join(head + [""] + table + report.notes(results, errors, _label, explained))


def _label(row: Dict) -> str:
    return f"{row['model']} r={row['r']}"


def save(results: Dict, out_dir: str) -> str:
    return save_results(results, out_dir, "e2e_")


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if args.prop_attn is not None:
        from . import prop_attn
        return prop_attn.main(args.prop_attn)
    if args.dit is not None:
        from . import e2e_dit
        return e2e_dit.main(args.dit)
    results = run(args)
    results["command"] = " ".join(["python -m benchmarks.e2e_vit"] + (sys.argv[1:] if argv is None else list(argv)))
    results["arguments"] = vars(args)
    print(format_table(results))
    if not args.no_save:
        print(f"saved {save(results, report.output_dir(args))}")
    return results


if __name__ == "__main__":
    main()
