"""Proportional attention's cost: one ViT-B/16 attention (H = 12, Dh = 64) at the token counts
ToMe leaves, by each implementation ``tome_kernels.patch.prop_attention`` can choose.

    python -m benchmarks.e2e_vit --prop-attn [ARGS]      (the same as python -m benchmarks.prop_attn [ARGS])
    python -m benchmarks.prop_attn --tokens 197 101 --dtypes float16 --out DIR

Providers, each on the same query, key, value and log(size):
    sdpa        F.scaled_dot_product_attention with no mask: attention without log(size), the
                floor (what a model pays before any token merged)
    sdpa_bias   the bias path: SDPA with log(size) as a (B, 1, 1, N) additive float mask, made
                per call as the patch makes it
    flex        the flex path: FlexAttention compiled, log(size) added by a score_mod
FlexAttention compiles once with dynamic shapes (prop_attention._flex); each row's first call,
less a steady call, is its compile time (``compile_s``: the first row's, the later rows reuse
the kernel), with whether inductor's on-disk cache served it.
On a GPU every row also records which SDPA backends (``torch.nn.attention.sdpa_kernel``)
accept the call with and without the mask, each one's median time, and the backend SDPA's
dispatch picks by itself (``torch._fused_sdp_choice``).

Each row (dtype, N) times the providers together, measured again when widely spread or timed
beside other work (spread.py); each provider's largest error against a float64 truth is
kept. ``--deadline-s``: rows not started by then are recorded as skipped, so that a run with
a time limit (the GPU run's step) keeps what it measured. Results, raw timings, device,
versions and the machine's load go to benchmarks/results/local/prop_attn_<device>_<time>.json.
"""

import argparse
import datetime
import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from tome_kernels.patch import prop_attention

from . import report
from .measure import environment, load_average, machine, save_results, time_fn
from .providers import inductor_cache_hits
from .spread import RETRIES, Steadiness, mark
from .spread import settings as spread_settings

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PROVIDERS = ("sdpa", "sdpa_bias", "flex")
HEADS, HEAD_DIM = 12, 64
# ViT-B/16 at 224 with r = 16: 197 tokens, then 16 fewer after each of its 12 blocks (the last
# block sees 21); then ViT-B/16 at 384 (577) and ViT-L/16 at 512 (1025), the longer rows.
VIT_B16_TOKENS = tuple(197 - 16 * i for i in range(12))
OTHER_TOKENS = (577, 1025)
# The GPU run's step has seconds, and each FlexAttention row compiles: the first r = 16 block,
# a middle one and the last, then the longer rows.
GPU_TOKENS = (197, 101, 21, 577)
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prop_attn", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="images per call (default: e2e_vit's ViT-B/16 batch, 256 on a GPU, 4 "
                                             "on a CPU)")
    p.add_argument("--tokens", type=int, nargs="+", help="token counts (default: ViT-B/16's r = 16 counts 197, "
                                                        "181, ..., 21, then 577 and 1025; on a GPU 197 101 21 577)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                   help="default: float16 bfloat16 float32 on a GPU, float32 on a CPU")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (default: 3 on a GPU, 1 on a CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls at least (default: 30 on a GPU, 10 on a CPU)")
    p.add_argument("--min-seconds", type=float, default=0.3, help="CPU: keep timing a provider until this long")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no row after this many seconds (the first row always runs)")
    p.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's own, the machine's cores); one "
                                               "thread is less at the mercy of a neighbour on a shared 2-core machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retries", type=int, default=RETRIES,
                   help=f"times a widely spread row is measured again before it is flagged (default {RETRIES})")
    report.add_output_args(p)
    return p.parse_args(argv)



def make_inputs(batch: int, tokens: int, dtype: torch.dtype, device: torch.device, seed: int):
    """query, key, value (B, 12, N, 64) and log(size) (B, N) with whole sizes summing to about
    197 over the row, as after ToMe's merges (the values do not change the time)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(batch, HEADS, tokens, HEAD_DIM, generator=g).to(device, dtype) for _ in range(3))
    size = torch.randint(1, max(2, 2 * 197 // tokens), (batch, tokens), generator=g).to(torch.float32)
    return q, k, v, size.log().to(device)


def truth(q, k, v, log_size, scale: float) -> torch.Tensor:
    """Attention with log(size) on the keys, in float64 (the errors' reference)."""
    q, k, v, log_size = (t.to(torch.float64) for t in (q, k, v, log_size))
    scores = q @ k.transpose(-1, -2) * scale + log_size[:, None, None, :]
    return scores.softmax(-1) @ v


def provider_fns(q, k, v, log_size, scale: float) -> Dict[str, Callable[[], torch.Tensor]]:
    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def sdpa_bias():
        mask = prop_attention.size_bias(log_size, None, q.dtype)  # made per call, as the patch does
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def flex():
        return prop_attention.flex_attention_bhnd(q, k, v, log_size, scaling=scale)

    return {"sdpa": sdpa, "sdpa_bias": sdpa_bias, "flex": flex}


def _backend_name(index: int) -> str:
    from torch.nn.attention import SDPBackend

    return next((n for n, b in SDPBackend.__members__.items() if int(b) == index), str(index)).lower()


def sdpa_backends(q, k, v, log_size, scale: float, device: torch.device, reps: int) -> Dict[str, Dict]:
    """For SDPA without and with the mask: the backend its dispatch picks, and for each backend
    forced with sdpa_kernel whether it accepts the call (its first refusal line if not) and
    its median time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = prop_attention.size_bias(log_size, None, q.dtype)
    out: Dict[str, Dict] = {}
    for variant, attn_mask in (("sdpa", None), ("sdpa_bias", mask)):
        entry: Dict[str, object] = {"dispatch": _backend_name(torch._fused_sdp_choice(
            q, k, v, attn_mask, 0.0, False, scale=scale, enable_gqa=False))}
        for name in SDPA_BACKENDS:
            def call(attn_mask=attn_mask):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    times = time_fn(call, device, 1, reps, 0.0)
                entry[name.lower()] = {"accepted": True, "median_s": statistics.median(times)}
            except RuntimeError as error:  # "No available kernel": the backend refused this call
                lines = str(error).strip().splitlines()
                entry[name.lower()] = {"accepted": False, "reason": lines[0][:300] if lines else type(error).__name__}
        out[variant] = entry
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_row(dtype_name: str, tokens: int, args, settings, device, steady: Steadiness) -> Dict:
    dtype = DTYPES[dtype_name]
    row: Dict[str, object] = {"dtype": dtype_name, "tokens": tokens, "batch": settings["batch"],
                              "heads": HEADS, "head_dim": HEAD_DIM, "providers": {}}
    q, k, v, log_size = make_inputs(settings["batch"], tokens, dtype, device, args.seed)
    scale = HEAD_DIM ** -0.5
    fns = provider_fns(q, k, v, log_size, scale)
    expected = truth(q, k, v, log_size, scale)
    ready: Dict[str, Callable] = {}
    for name in args.providers:
        entry: Dict[str, object] = {}
        try:
            hits = inductor_cache_hits()
            start = time.perf_counter()
            out = fns[name]()
            _sync(device)
            entry["first_call_s"] = time.perf_counter() - start
            if name == "flex":
                entry["compile_cache_hits"] = inductor_cache_hits() - hits
            # sdpa has no log(size): its error is the size of what proportional attention changes.
            entry["max_abs_err"] = (out.to(torch.float64) - expected).abs().max().item()
            ready[name] = fns[name]
        except Exception as error:  # one provider failing (e.g. a compile error) must not lose the row
            entry.update(status="error", reason=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}")
        row["providers"][name] = entry
    names = list(ready)
    if names:
        timed = steady.measure(lambda: [time_fn(ready[n], device, settings["warmup"], settings["reps"],
                                                args.min_seconds) for n in names], log=report.log)
        for name, t in zip(names, timed):
            row["providers"][name].update(status="ok", times_s=t["times_s"], spread=t["spread"],
                                          median_s=t["spread"]["median_s"], flags=t["flags"], attempts=t["attempts"],
                                          others_cpu_share=t["others_cpu_share"],
                                          discarded_times_s=t["discarded_times_s"])
            if "first_call_s" in row["providers"][name] and name == "flex":
                # The first call's time beyond a steady call's: the compile (and the first run's extras).
                row["providers"][name]["compile_s"] = max(0.0, row["providers"][name]["first_call_s"]
                                                          - t["spread"]["median_s"])
    if device.type == "cuda":
        row["sdpa_backends"] = sdpa_backends(q, k, v, log_size, scale, device, max(5, settings["reps"] // 3))
    return row


def run(args: argparse.Namespace, on_row: Optional[Callable[[Dict], None]] = None) -> Dict:
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    load_before = load_average()
    started = time.monotonic()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtypes = args.dtypes or (["float16", "bfloat16", "float32"] if on_gpu else ["float32"])
    tokens = args.tokens or list(GPU_TOKENS if on_gpu else VIT_B16_TOKENS + OTHER_TOKENS)
    bad = [n for n in tokens if n < 1]
    if bad or (args.batch is not None and args.batch < 1):
        raise SystemExit(f"--tokens and --batch must be positive; got tokens {bad}, batch {args.batch}")
    settings = {"batch": args.batch or (256 if on_gpu else 4), "reps": args.reps or (30 if on_gpu else 10),
                "warmup": args.warmup if args.warmup is not None else (3 if on_gpu else 1),
                "min_seconds": args.min_seconds, "seed": args.seed, "spread": spread_settings(args.retries),
                "deadline_s": args.deadline_s,
                "timer": "cuda events, L2 flushed before each call" if on_gpu else "time.perf_counter",
                "flex_compile": "torch.compile(flex_attention, dynamic=True): one compile for every token count",
                "choice": {kind: vars(c) for kind, c in prop_attention.CHOICES.items()}}
    results = {
        "benchmark": "prop_attn",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(device),
        "machine": machine(load_before),
        "settings": settings,
        "rows": [],
    }
    rows: List[Dict] = results["rows"]
    steady = Steadiness(args.retries)
    with torch.inference_mode():
        # N-major: under --deadline-s every dtype gets the first token count before any gets the next.
        for n in tokens:
            for dtype_name in dtypes:
                # The first row always runs: a run that measured nothing says nothing.
                if rows and args.deadline_s is not None and time.monotonic() - started > args.deadline_s:
                    rows.append({"dtype": dtype_name, "tokens": n, "status": "skipped",
                                 "reason": f"past --deadline-s {args.deadline_s:g}"})
                    continue
                report.log(f"[{len(rows) + 1}/{len(dtypes) * len(tokens)}] {dtype_name} N={n}")
                row = measure_row(dtype_name, n, args, settings, device, steady)
                row["status"] = "ok"
                rows.append(row)
                if on_row:
                    on_row(results)
    results["machine"] = machine(load_before)  # the load after the last row
    return results


def _cell(row: Dict, name: str, base: Optional[str] = None) -> str:
    p = row["providers"].get(name)
    if p is None:
        return ""
    if p.get("status") != "ok":
        return "error"
    ms = f"{report.num(p['median_s'] * 1e3)}"
    other = row["providers"].get(base or "", {})
    if base and other.get("status") == "ok":
        ms += f" ({report.num(p['median_s'] / other['median_s'])}x)"
    return ms


HEADER = ["dtype", "N", "sdpa ms", "sdpa_bias ms (/ sdpa)", "flex ms (/ sdpa_bias)", "flex compile s", "IQR",
          "err bias / flex", "flags"]


def format_table(results: Dict) -> str:
    s = results["settings"]
    head = report.wrap(
        f"device: {results['device']['name']} | torch {results['versions']['torch']} | B = {s['batch']}, "
        f"H = {HEADS}, Dh = {HEAD_DIM} | median of {s['reps']} calls or more") + report.conditions_line(results)
    body, errors = [], []
    for r in results["rows"]:
        if r["status"] != "ok":
            body.append([r["dtype"], str(r["tokens"]), r["status"]] + [""] * 6)
            continue
        ps = r["providers"]
        ok = [p for p in ps.values() if p.get("status") == "ok"]
        errors += [f"{r['dtype']} N={r['tokens']} {n}: {p['reason']}" for n, p in ps.items() if p.get("status") != "ok"]
        flex = ps.get("flex", {})
        compile_s = flex.get("compile_s")
        cached = " (cache)" if flex.get("compile_cache_hits") else ""
        iqr = max((p["spread"]["iqr_rel"] for p in ok), default=math.nan)
        errs = "/".join(f"{ps[n]['max_abs_err']:.0e}" if "max_abs_err" in ps.get(n, {}) else "-"
                        for n in ("sdpa_bias", "flex"))
        flags = sorted({f for p in ok for f in p.get("flags", ())})
        body.append([r["dtype"], str(r["tokens"]), _cell(r, "sdpa"), _cell(r, "sdpa_bias", "sdpa"),
                     _cell(r, "flex", "sdpa_bias"), "" if compile_s is None else f"{compile_s:.1f}{cached}",
                     f"{iqr:.0%}", errs, mark(flags)])
    explained = ["ms: median call; sdpa: no mask, no log(size) (the floor); sdpa_bias: the bias path; flex: the flex "
                 "path (compiled FlexAttention); IQR: the widest provider's interquartile range over its median; "
                 "err: largest absolute error against float64 attention with log(size); flex compile s: its first "
                 "call at this N less a steady call, '(cache)' when inductor's on-disk cache served it."]
    flagged = [{"flags": p.get("flags", []), "attempts": p.get("attempts", 1)}
               for r in results["rows"] if r["status"] == "ok" for p in r["providers"].values() if "flags" in p]
    notes = report.notes({"rows": flagged, "settings": s}, {}, lambda r: "", explained + errors)
    lines = head + [""] + report.table(HEADER, "lrrrrrrrl", body) + notes
    backends = backend_lines(results)
    return "\n".join(lines + ([""] + backends if backends else []))


def backend_lines(results: Dict) -> List[str]:
    """On a GPU: per dtype and variant, what SDPA dispatches to and which backends accept it
    (median ms), at the first row of each dtype that recorded them."""
    lines, seen = [], set()
    for r in results["rows"]:
        b = r.get("sdpa_backends")
        if not b or r["dtype"] in seen:
            continue
        seen.add(r["dtype"])
        for variant, entry in b.items():
            accepted = ", ".join(f"{n} {v['median_s'] * 1e3:.3g} ms" for n, v in entry.items()
                                 if isinstance(v, dict) and v.get("accepted"))
            lines += report.wrap(f"{r['dtype']} N={r['tokens']} {variant}: dispatch -> {entry['dispatch']}; "
                                 f"accepted: {accepted or 'none'}")
    return lines


def save(results: Dict, out_dir: str) -> str:
    return save_results(results, out_dir, "prop_attn_")


def main(argv=None) -> Dict:
    return report.main_saving_each_row("benchmarks.prop_attn", argv, parse_args, run, format_table, save)


if __name__ == "__main__":
    main()
