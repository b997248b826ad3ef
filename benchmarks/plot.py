"""A picture of the main job's results: the kernels' speed-up over ``reference`` per shape and
provider, and end-to-end throughput against r.

    python -m benchmarks.plot RESULTS.json [RESULTS.json ...] [--out PICTURE.png]

Takes the JSON of ``benchmarks.run`` (the top panel) and of ``benchmarks.e2e_vit`` (one
panel per model below: images/s against r, the unpatched model as r = 0), in any order;
MiniLM results are passed over. Whiskers span the range the timings' quartiles allow; a
flagged row's bar or point is hatched or hollow, as its table flags it. Written with
matplotlib's Agg backend (no display needed); without matplotlib it prints one line saying
how to get it and writes nothing (``pip install tome_kernels[plot]``).
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

SKIPPED = ("plot skipped: matplotlib is not installed; `pip install tome_kernels[plot]` (or `pip install "
           "matplotlib`) enables it")


def kind(results: Dict) -> str:
    """Which benchmark wrote ``results``; results saved before they said so are told by their fields."""
    if "benchmark" in results:
        return results["benchmark"]
    if "copy_bandwidth" in results:
        return "kernels"
    if "sentences" in results:
        return "minilm"
    return "e2e_vit"


def _matplotlib():
    """matplotlib's Figure and Agg canvas, or None when it is not installed. Imported here, not
    at the top: the benchmarks run without it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _flagged(row: Dict) -> bool:
    return bool(row.get("flags"))


def speedup_panel(ax, results: Dict) -> None:
    """Grouped bars: for each shape and pass, each provider's speed-up over reference (log scale)."""
    from matplotlib.patches import Patch  # only once plot() has found matplotlib

    rows = [r for r in results["rows"] if r["status"] == "ok" and r["provider"] != "reference"
            and r.get("speedup_vs_reference")]
    groups = list(dict.fromkeys(f"{r['shape']} {r['pass']}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / max(len(providers), 1)
    handles = []
    for i, provider in enumerate(providers):
        mine = {f"{r['shape']} {r['pass']}": r for r in rows if r["provider"] == provider}
        xs = [g + (i - (len(providers) - 1) / 2) * width for g, name in enumerate(groups) if name in mine]
        picked = [mine[name] for name in groups if name in mine]
        heights = [r["speedup_vs_reference"] for r in picked]
        bars = ax.bar(xs, heights, width, label=provider)
        # The legend shows each provider's plain colour, whatever its first bar looks like.
        handles.append(Patch(facecolor=bars[0].get_facecolor(), label=provider))
        for bar, r in zip(bars, picked):
            if _flagged(r):
                bar.set_hatch("//")
                bar.set_alpha(0.5)
        # The range the quartiles of both timings allow (saved since the spreads were recorded).
        ranges = [r.get("speedup_iqr_range") for r in picked]
        if all(ranges):
            low = [max(h - lo, 0.0) for h, (lo, _) in zip(heights, ranges)]
            high = [max(hi - h, 0.0) for h, (_, hi) in zip(heights, ranges)]
            ax.errorbar(xs, heights, yerr=[low, high], fmt="none", ecolor="black", elinewidth=0.8, capsize=1.5)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over reference")
    s = results["settings"]
    ax.set_title(f"merge step: {results['device']['name']}, {s['dtype']} (hatched: flagged in the table)", fontsize=9)
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="flagged"))
    ax.legend(handles=handles, fontsize=7, ncol=min(len(handles), 6))


def throughput_panel(ax, rows: Sequence[Dict], model: str, results: Dict) -> None:
    """images/s against r for one model: one line per ToMe provider from the unpatched model (r = 0)."""
    ok = [r for r in rows if r["status"] == "ok"]
    unpatched = next((r for r in ok if r["backend"] is None), None)
    for provider in dict.fromkeys(r["provider"] for r in ok if r["backend"] is not None):
        points = ([unpatched] if unpatched else []) + sorted(
            (r for r in ok if r["provider"] == provider), key=lambda r: r["r"])
        xs = [r["r"] or 0 for r in points]  # the unpatched row's r is None in results saved before the sweep
        ys = [r["images_per_s"] for r in points]
        line = ax.plot(xs, ys, marker="o", label=provider)[0]
        spreads = [r.get("spread") for r in points]
        if all(spreads):
            # images/s at the timings' quartiles: the slower quartile gives the lower whisker.
            ax.errorbar(xs, ys, yerr=[[y * (1 - s["median_s"] / s["q3_s"]) for y, s in zip(ys, spreads)],
                                      [y * (s["median_s"] / s["q1_s"] - 1) for y, s in zip(ys, spreads)]],
                        fmt="none", ecolor=line.get_color(), capsize=2)
        hollow = [(x, y) for x, y, r in zip(xs, ys, points) if _flagged(r)]
        if hollow:
            ax.plot(*zip(*hollow), linestyle="none", marker="o", markerfacecolor="white", color=line.get_color())
    ax.set_xlabel("r (tokens merged per block; 0: unpatched)")
    ax.set_ylabel("images/s")
    batch = ok[0]["batch"] if ok else "?"
    ax.set_title(f"{model}, B={batch}, {results['settings']['dtype']} (hollow: flagged)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)


def plot(results: Sequence[Dict], out: str) -> Optional[str]:
    """Draw what ``results`` hold into ``out``; returns the path, or None when matplotlib is
    missing (after saying so in one line)."""
    found = _matplotlib()
    if found is None:
        print(SKIPPED, flush=True)
        return None
    Figure, FigureCanvasAgg = found
    kernels = [r for r in results if kind(r) == "kernels"]
    models = [(model, [r for r in res["rows"] if r["model"] == model], res)
              for res in results if kind(res) == "e2e_vit"
              for model in dict.fromkeys(r["model"] for r in res["rows"])]
    if not kernels and not models:
        raise SystemExit("benchmarks.plot: nothing to plot (no benchmarks.run or benchmarks.e2e_vit results)")
    columns = max(len(models), 1)
    fig = Figure(figsize=(max(12, 4 * columns), 5 * len(kernels) + (4 if models else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(kernels) + (1 if models else 0), columns)
    for i, res in enumerate(kernels):
        speedup_panel(fig.add_subplot(grid[i, :]), res)
    for j, (model, rows, res) in enumerate(models):
        throughput_panel(fig.add_subplot(grid[len(kernels), j]), rows, model, res)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def default_out(paths: Sequence[str]) -> str:
    """Beside the first results file, named after it."""
    stem = os.path.splitext(os.path.basename(paths[0]))[0]
    return os.path.join(os.path.dirname(os.path.abspath(paths[0])), f"plot_{stem}.png")


def main(argv: Optional[List[str]] = None) -> Optional[str]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="JSON files of benchmarks.run and benchmarks.e2e_vit")
    p.add_argument("--out", help="the PNG to write (default: plot_<first file's name>.png beside it)")
    args = p.parse_args(argv)
    loaded = []
    for path in args.results:
        # A missing or unreadable results file is the user's argument: say which, not a traceback.
        try:
            with open(path) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            p.error(f"cannot read results file {path}: {error}")
        if kind(results) not in ("kernels", "e2e_vit"):
            print(f"benchmarks.plot: {path} holds {kind(results)} results, not plotted", file=sys.stderr)
            continue
        loaded.append(results)
    written = plot(loaded, args.out or default_out(args.results))
    if written:
        print(f"plot {written}")
    return written


if __name__ == "__main__":
    main()
