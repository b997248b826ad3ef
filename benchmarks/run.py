"""Benchmark the merge step for every provider that can run here; print a table, save JSON.

    python -m benchmarks.run                       # default shapes for this device
    python -m benchmarks.run --shapes vit_b16_224 --providers reference --passes fwd

For each shape and pass (forward, forward+backward; the methods other than ToMe forward
only) and provider (those that apply to the shape's method): the median time, the
fewest bytes the step must move, the achieved bandwidth (and as a share of the copy
bandwidth measured in the same run), the speed-up over ``reference``, the peak memory beyond
inputs and outputs, and the relative error against ``reference``; for the other methods
also how many tokens are grouped as the reference groups them (``method_agreement`` in
providers.py: near-ties may part). Raw timings, device, versions and commit go to
benchmarks/results/<device>_<time>.json. A compiled provider's row must compile exactly one
graph: one that ran eagerly is reported as "eager fallback", one that recompiled while timed
(or could not compile as one graph) as an error, neither with timings.
"""

import argparse
import datetime
import os
import statistics
import sys
from typing import Dict, List, Optional

import torch

from .measure import copy_bandwidth, environment, peak_extra_bytes, rel_err, save_results, time_fn
from .providers import (
    COMPILED,
    applies,
    dynamo_graphs,
    make_inputs,
    make_step,
    method_agreement,
    provider_names,
    unavailable_reason,
)
from .shapes import GPU_SHAPES, default_shapes

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on a GPU, float32 on a CPU")
    p.add_argument("--shapes", nargs="+", help="shape names (default: every shape for this device)")
    p.add_argument("--full-size", action="store_true", help="use the full GPU batch sizes even on a CPU")
    p.add_argument("--providers", nargs="+", help=f"default: every provider ({', '.join(provider_names())})")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=None, help="timed calls (default: 100 on a GPU, 10 on a CPU)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="CPU: keep sampling until this long")
    p.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer (default: 1024 GPU, 256 CPU)")
    p.add_argument("--out", default=RESULTS_DIR, help="where the JSON goes")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    return p.parse_args(argv)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _choose_shapes(args, device):
    pool = GPU_SHAPES if args.full_size else default_shapes(device)
    if not args.shapes:
        return pool
    by_name = {s.name: s for s in pool}
    unknown = [n for n in args.shapes if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; known: {', '.join(by_name)}")
    return [by_name[n] for n in args.shapes]


def run(args: argparse.Namespace) -> Dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    reps = args.reps or (100 if device.type == "cuda" else 10)
    providers = args.providers or provider_names()
    unknown = [p for p in providers if p not in provider_names()]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; known: {', '.join(provider_names())}")
    shapes = _choose_shapes(args, device)

    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 256)
    _log(f"copy bandwidth: {copy_mib} MiB device-to-device copy on {device}")
    copy = copy_bandwidth(device, copy_mib * 1024 * 1024, reps)
    rows: List[Dict] = []
    plan = [(shape, [p for p in args.passes if p in shape.passes], [p for p in providers if applies(p, shape)])
            for shape in shapes]
    total = sum(len(passes) * len(names) for _, passes, names in plan)
    for shape, passes, names in plan:
        if not (passes and names):
            continue
        inputs = make_inputs(shape, device, dtype)
        for pass_name in passes:
            backward = pass_name == "fwd+bwd"
            expected = make_step("reference", shape, inputs, backward)()
            for provider in names:
                _log(f"[{len(rows) + 1}/{total}] {shape.name} B={shape.batch} {pass_name} {provider}")
                rows.append(_measure(shape, pass_name, provider, inputs, expected, device, dtype, reps, args, copy))
            _add_speedups(rows, shape.name, pass_name)
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(device),
        "settings": {"dtype": str(dtype).replace("torch.", ""), "warmup": args.warmup, "reps": reps,
                     "min_seconds": args.min_seconds, "timer": "cuda events, L2 flushed" if device.type == "cuda"
                     else "time.perf_counter"},
        "copy_bandwidth": copy,
        "rows": rows,
    }


def _measure(shape, pass_name, provider, inputs, expected, device, dtype, reps, args, copy) -> Dict:
    row = {"shape": shape.name, "method": shape.method, "batch": shape.batch, "tokens": shape.tokens,
           "channels": shape.channels, "r": shape.r, "metric": shape.metric_kind,
           "metric_shape": list(shape.metric_shape),
           "pass": pass_name, "provider": provider, "dtype": str(dtype).replace("torch.", "")}
    reason = unavailable_reason(provider, inputs)
    if reason:
        return {**row, "status": "unavailable", "reason": reason}
    graphs_before = dynamo_graphs() if provider in COMPILED else 0
    try:
        step = make_step(provider, shape, inputs, pass_name == "fwd+bwd")
        row["rel_err_vs_reference"] = rel_err(step(), expected)  # first call: compiles, if it does
        if shape.method != "tome" and provider != "reference":
            row.update(method_agreement(provider, shape, inputs))
        times = time_fn(step, device, args.warmup, reps, args.min_seconds)
    except Exception as exc:  # one provider failing must not lose the rest of the table
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    median = statistics.median(times)
    min_bytes = shape.min_bytes(dtype, backward=pass_name == "fwd+bwd")
    peak, peak_error = peak_extra_bytes(step, device)
    if provider in COMPILED:
        # One graph, compiled by the first call: none means the step ran eagerly, more that
        # it recompiled while timed. Either way the timings are not the compiled step's.
        graphs = dynamo_graphs() - graphs_before
        if graphs != 1:
            status = "eager fallback" if graphs == 0 else "error"
            return {**row, "status": status, "compiled_graphs": graphs,
                    "reason": f"torch.compile compiled {graphs} graphs for this row, not 1: its timings are not "
                              "the compiled step's"}
        row["compiled_graphs"] = graphs
    return {**row, "status": "ok", "times_s": times, "median_s": median, "min_bytes": min_bytes,
            "gbps": min_bytes / median / 1e9, "fraction_of_copy_bw": min_bytes / median / 1e9 / copy["gbps"],
            "floor_s": min_bytes / (copy["gbps"] * 1e9), "peak_extra_bytes": peak, "peak_error": peak_error}


def _add_speedups(rows: List[Dict], shape: str, pass_name: str) -> None:
    group = [r for r in rows if r["shape"] == shape and r["pass"] == pass_name and r["status"] == "ok"]
    ref = next((r for r in group if r["provider"] == "reference"), None)
    for r in group:
        r["speedup_vs_reference"] = ref["median_s"] / r["median_s"] if ref else None


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: Dict) -> str:
    copy = results["copy_bandwidth"]
    lines = [
        f"device: {results['device']['name']} | torch {results['versions']['torch']} | "
        f"dtype {results['settings']['dtype']} | copy bandwidth {copy['gbps']:.1f} GB/s "
        f"(read + write, median of {len(copy['times_s'])})",
        f"{'shape':<20}{'B':>5} {'pass':<8}{'provider':<20}{'median ms':>11}{'min MB':>9}{'GB/s':>9}"
        f"{'% copy':>8}{'speed-up':>9}{'extra MB':>10}{'rel err':>9}{'same groups':>12}",
    ]
    for r in results["rows"]:
        agreement = "-" if "plan_agreement" not in r else f"{r['plan_agreement'] * 100:.2f}%"
        head = f"{r['shape']:<20}{r['batch']:>5} {r['pass']:<8}{r['provider']:<20}"
        if r["status"] != "ok":
            lines.append(head + f"{r['status']}: {r['reason']}")
            continue
        lines.append(
            head + f"{r['median_s'] * 1e3:>11.3f}{r['min_bytes'] / 1e6:>9.2f}{r['gbps']:>9.2f}"
            f"{r['fraction_of_copy_bw'] * 100:>7.1f}%{_fmt(r.get('speedup_vs_reference'), '>8.2f')}x"
            f"{_fmt(None if r['peak_extra_bytes'] is None else r['peak_extra_bytes'] / 1e6, '>10.2f')}"
            f"{r['rel_err_vs_reference']:>9.1e}{agreement:>12}"
        )
    return "\n".join(lines)


def save(results: Dict, out_dir: str) -> str:
    return save_results(results, out_dir, "")


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    results["command"] = " ".join(["python -m benchmarks.run"] + (sys.argv[1:] if argv is None else list(argv)))
    print(format_table(results))
    if not args.no_save:
        print(f"saved {save(results, args.out)}")


if __name__ == "__main__":
    main()
