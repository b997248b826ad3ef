"""Benchmark the merge step for every provider that can run here; print a table, save JSON.

    python -m benchmarks.run                       # default shapes for this device
    python -m benchmarks.run --shapes vit_b16_224 --providers reference --passes fwd

For each shape and pass (forward, forward+backward; the methods other than ToMe forward
only) and provider (those that apply to the shape's method): the median time and its
spread, the fewest bytes the step must move, the achieved bandwidth (and as a share of the
copy bandwidth measured in the same run), the speed-up over ``reference``, the peak memory
beyond inputs and outputs, and the relative error against ``reference``; for the other
methods also how many tokens are grouped as the reference groups them (``method_agreement``
in providers.py: near-ties may part). A row whose timings spread widely is measured again,
and flagged if it stays wide or its bandwidth is impossible (spread.py). Raw timings, the
machine's load and thread settings, device, versions and commit go to
benchmarks/results/local/<device>_<time>.json (``--save-record``: benchmarks/results/).
A compiled provider's row must compile exactly one graph: one that ran eagerly is reported
as "eager fallback", one that recompiled while timed (or could not compile as one graph) as
an error, neither with timings; its compile time (the first call) is reported apart.
"""

import argparse
import datetime
import sys
import time
from typing import Dict, List, Optional

import torch

from . import report
from .measure import (
    copy_bandwidth,
    environment,
    load_average,
    machine,
    peak_extra_bytes,
    rel_err,
    save_results,
    time_fn,
)
from .providers import (
    COMPILED,
    applies,
    dynamo_graphs,
    inductor_cache_hits,
    make_inputs,
    make_step,
    method_agreement,
    provider_names,
    unavailable_reason,
)
from .shapes import GPU_SHAPES, default_shapes
from .spread import RETRIES, Steadiness, mark, spread, unsteady
from .spread import settings as spread_settings

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
    p.add_argument("--retries", type=int, default=RETRIES,
                   help=f"times a row with a wide spread is measured again before it is flagged (default {RETRIES})")
    report.add_output_args(p)
    return p.parse_args(argv)



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
    load_before = load_average()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    reps = args.reps or (100 if device.type == "cuda" else 10)
    providers = args.providers or provider_names()
    unknown = [p for p in providers if p not in provider_names()]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; known: {', '.join(provider_names())}")
    shapes = _choose_shapes(args, device)

    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 256)
    report.log(f"copy bandwidth: {copy_mib} MiB device-to-device copy on {device}")
    copies = [copy_bandwidth(device, copy_mib * 1024 * 1024, reps)]
    rows: List[Dict] = []
    steady = Steadiness(args.retries)
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
                report.log(f"[{len(rows) + 1}/{total}] {shape.name} B={shape.batch} {pass_name} {provider}")
                rows.append(_measure(shape, pass_name, provider, inputs, expected, device, dtype, reps, args,
                                     copies[0], steady))
    # Measured again at the end, the faster of the two is the ceiling: a copy slowed by a busy
    # moment would make every row look closer to it than it is.
    report.log("copy bandwidth again, after the rows")
    copies.append(copy_bandwidth(device, copy_mib * 1024 * 1024, reps))
    copy = max(copies, key=lambda c: c["gbps"])
    for r in rows:
        _add_bandwidth(r, copy)
    for shape, passes, _ in plan:
        for pass_name in passes:
            _add_speedups(rows, shape.name, pass_name)
    return {
        "benchmark": "kernels",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(device),
        "machine": machine(load_before),
        "settings": {"dtype": str(dtype).replace("torch.", ""), "warmup": args.warmup, "reps": reps,
                     "min_seconds": args.min_seconds, "timer": "cuda events, L2 flushed" if device.type == "cuda"
                     else "time.perf_counter",
                     "spread": spread_settings(args.retries),
                     "first_call_s": "the untimed first call; for a compiled provider it includes the compile"},
        "copy_bandwidth": copy,
        "copy_bandwidth_measurements": copies,
        "rows": rows,
    }


def _measure(shape, pass_name, provider, inputs, expected, device, dtype, reps, args, copy, steady) -> Dict:
    row = {"shape": shape.name, "method": shape.method, "batch": shape.batch, "tokens": shape.tokens,
           "channels": shape.channels, "r": shape.r, "metric": shape.metric_kind,
           "metric_shape": list(shape.metric_shape),
           "pass": pass_name, "provider": provider, "dtype": str(dtype).replace("torch.", "")}
    reason = unavailable_reason(provider, inputs)
    if reason:
        return {**row, "status": "unavailable", "reason": reason}
    compiled = provider in COMPILED
    graphs_before = dynamo_graphs() if compiled else 0
    hits_before = inductor_cache_hits() if compiled else 0
    min_bytes = shape.min_bytes(dtype, backward=pass_name == "fwd+bwd")

    def impossible(median: float) -> List[str]:
        # Checked against the copy measured at the start, to decide whether to measure again;
        # the flag in the table is decided at the end against the faster copy (_add_bandwidth).
        return ["bandwidth"] if min_bytes / median > copy["gbps"] * 1e9 else []

    started = time.perf_counter()
    try:
        step = make_step(provider, shape, inputs, pass_name == "fwd+bwd")
        if compiled:
            # Up to half a minute a row on a 2-core CPU with a cold cache: say so, or the run
            # looks hung.
            report.log(f"  compiling reference for {shape.name} {pass_name} ...")
        outputs = step()  # the first call: compiles, if it does
        row["first_call_s"] = time.perf_counter() - started
        if compiled:
            row["compile_cache_hits"] = inductor_cache_hits() - hits_before
            cached = " (from inductor's on-disk cache)" if row["compile_cache_hits"] else ""
            report.log(f"  compiled in {row['first_call_s']:.1f} s{cached}")
        row["rel_err_vs_reference"] = rel_err(outputs, expected)
        if shape.method != "tome" and provider != "reference":
            row.update(method_agreement(provider, shape, inputs))
        timed = steady.measure(lambda: [time_fn(step, device, args.warmup, reps, args.min_seconds)], impossible,
                               report.log)[0]
    except Exception as exc:  # one provider failing must not lose the rest of the table
        if compiled and "first_call_s" not in row:
            report.log(f"  compile failed after {time.perf_counter() - started:.1f} s")
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    median = timed["spread"]["median_s"]
    peak, peak_error = peak_extra_bytes(step, device)
    if compiled:
        # One graph, compiled by the first call: none means the step ran eagerly, more that
        # it recompiled while timed. Either way the timings are not the compiled step's.
        graphs = dynamo_graphs() - graphs_before
        if graphs != 1:
            status = "eager fallback" if graphs == 0 else "error"
            return {**row, "status": status, "compiled_graphs": graphs,
                    "reason": f"torch.compile compiled {graphs} graphs for this row, not 1: its timings are not "
                              "the compiled step's"}
        row["compiled_graphs"] = graphs
    return {**row, "status": "ok", "times_s": timed["times_s"], "median_s": median, "spread": timed["spread"],
            "flags": timed["flags"], "attempts": timed["attempts"], "retries_allowed": timed["retries_allowed"],
            "others_cpu_share": timed["others_cpu_share"],
            "discarded_times_s": timed["discarded_times_s"],
            "min_bytes": min_bytes, "peak_extra_bytes": peak, "peak_error": peak_error}


def _add_bandwidth(row: Dict, copy: Dict) -> None:
    """Achieved bandwidth, its share of the copy ceiling, and the "bandwidth" flag when over it."""
    if row["status"] != "ok":
        return
    gbps = row["min_bytes"] / row["median_s"] / 1e9
    flags = [f for f in row["flags"] if f != "bandwidth"] + (["bandwidth"] if gbps > copy["gbps"] else [])
    row.update(gbps=gbps, fraction_of_copy_bw=gbps / copy["gbps"], floor_s=row["min_bytes"] / (copy["gbps"] * 1e9),
               flags=flags)


def _add_speedups(rows: List[Dict], shape: str, pass_name: str) -> None:
    """Speed-up over ``reference`` from the medians, and the range the quartiles allow; a
    ratio over a reference that was not measured steadily is flagged "baseline"."""
    group = [r for r in rows if r["shape"] == shape and r["pass"] == pass_name and r["status"] == "ok"]
    ref = next((r for r in group if r["provider"] == "reference"), None)
    for r in group:
        if ref is None:
            r["speedup_vs_reference"] = None
            continue
        r["speedup_vs_reference"] = ref["median_s"] / r["median_s"]
        ours, theirs = r["spread"], ref["spread"]
        r["speedup_iqr_range"] = [theirs["q1_s"] / ours["q3_s"], theirs["q3_s"] / ours["q1_s"]]
        if r is not ref and unsteady(ref) and "baseline" not in r["flags"]:
            r["flags"].append("baseline")


def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def ms(seconds: float) -> str:
    """Milliseconds to 4 significant digits (0.01234 on a GPU, 870.6 on a CPU), whole ones from 1 s."""
    value = seconds * 1e3
    return f"{value:.0f}" if value >= 1000 else f"{value:#.4g}"


HEADER = ["shape", "B", "pass", "provider", "ms", "spread", "GB/s (% copy)", "speed-up", "extra MB",
          "rel err (same groups)", "flags"]


def format_table(results: Dict) -> str:
    copy = results["copy_bandwidth"]
    copies = len(results.get("copy_bandwidth_measurements", [copy]))
    head = report.wrap(
        f"device: {results['device']['name']} | torch {results['versions']['torch']} | "
        f"dtype {results['settings']['dtype']} | copy bandwidth {copy['gbps']:.1f} GB/s "
        f"(read + write, median of {len(copy['times_s'])}, the faster of {copies} measurements)"
    ) + report.conditions_line(results)
    errors = report.error_notes(results["rows"])
    body = []
    for r in results["rows"]:
        cells = [r["shape"], str(r["batch"]), r["pass"], r["provider"]]
        if r["status"] == "unavailable":
            continue  # named once under the table
        if r["status"] != "ok":
            body.append(cells + [f"{r['status']} [{errors[report.error_key(r)]}]"] + [""] * 6)
            continue
        # The other methods' rows: the share of tokens grouped as reference groups them beside
        # the error, which is large where near-ties part the groups.
        agreement = f" ({r['plan_agreement']:.2%})" if "plan_agreement" in r else ""
        extra = r["peak_extra_bytes"]
        # Results saved before the spreads were recorded have none: computed from their times.
        iqr = (r.get("spread") or spread(r["times_s"]))["iqr_rel"]
        body.append(cells + [
            ms(r["median_s"]), f"{iqr:.0%}", f"{report.num(r['gbps'])} ({report.num(r['fraction_of_copy_bw'] * 100)}%)",
            "" if r.get("speedup_vs_reference") is None else f"{report.num(r['speedup_vs_reference'])}x",
            "" if extra is None else report.num(extra / 1e6), f"{r['rel_err_vs_reference']:.1e}{agreement}",
            mark(r.get("flags", ()))])
    extra_notes = ["ms: median of the timed calls; spread: their interquartile range over the median (min, quartiles "
                   "and max in the JSON); GB/s: the fewest bytes the step must move over ms, and its share of the copy "
                   "bandwidth; speed-up: over reference, same shape and pass; extra MB: peak memory beyond inputs and "
                   "outputs; rel err: against reference, and for the methods beyond ToMe the share of tokens grouped "
                   "as reference groups them."]
    compiled = [r for r in results["rows"] if r["provider"] in COMPILED and "first_call_s" in r]
    if compiled:
        each = ", ".join(f"{r['shape']} {r['pass']} {r['first_call_s']:.1f} s" for r in compiled)
        cached = sum(1 for r in compiled if r.get("compile_cache_hits"))
        extra_notes.append(f"Compile time of {', '.join(COMPILED)} (its first call, not in the timings), "
                           f"{sum(r['first_call_s'] for r in compiled):.1f} s in all ({cached} of {len(compiled)} "
                           f"from inductor's on-disk cache): {each}.")
    table = report.table(HEADER, "lrllrrrrrrl", body)
    return "\n".join(head + [""] + table + report.notes(results, errors, _label, extra_notes))


def _label(row: Dict) -> str:
    return f"{row['shape']} {row['pass']}"


def save(results: Dict, out_dir: str) -> str:
    return save_results(results, out_dir, "")


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    results["command"] = " ".join(["python -m benchmarks.run"] + (sys.argv[1:] if argv is None else list(argv)))
    print(format_table(results))
    if not args.no_save:
        print(f"saved {save(results, report.output_dir(args))}")


if __name__ == "__main__":
    main()
