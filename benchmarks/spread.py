"""How far a benchmark's timings can be trusted: each timing's spread, the checks that flag a
row, and re-measuring a row whose samples say that something else had the machine.

A median alone hides a busy machine: on a shared CPU one benchmark printed a ``reference``
time 350x its usual one, and with it a 1299x "speed-up", without a word. So every timing
carries its spread (min, quartiles, max) and the share of the CPUs other processes took
while it ran; a timing that is widely spread or was taken beside other work is measured
again a few times, and what is still so (or impossible, such as more bandwidth than a copy
gets) is flagged in the table, with the reason under it. Used by all three benchmarks.
"""

import statistics
from typing import Callable, Dict, List, Optional, Sequence

from .measure import cpu_snapshot, others_cpu_share

# The interquartile range of a steady timing on this project's 2-core VM was 10-20% of the
# median for most rows and up to 85% for the odd one (the saved CPU results of 2026-11-21):
# past half the median, the middle half of the calls disagree by more than the effects the
# tables report.
WIDE_IQR = 0.5
# Those same rows had a median at most 1.9x their fastest call. Past 2x, more than half the
# calls ran at less than half the speed the step is capable of: something else had the CPU.
SLOW_MEDIAN = 2.0
# Other processes' share of the machine's CPU time while a row was timed: over a quarter (half
# a core on the 2-core VM), torch's threads share cores with them, and each parallel region
# waits for its slowest thread; a row timed so ran 100x slower than usual, with a narrow spread.
BUSY_SHARE = 0.25
# Times a wide row is measured again before it is flagged: each retry costs the row's whole
# timing again, and a machine that stays busy for three tries will not be quiet on a fourth.
RETRIES = 2
# Rows in a row that stayed unsteady (S or L) through their retries: the machine is busy for a
# while (another job's test suite kept one of the VM's two cores for over 10 minutes), so the
# rows after them are measured once, and flagged, until one comes out steady; retrying them
# all tripled the main job for nothing.
FUTILE_STREAK = 3

# Each flag a row can carry: its mark in the table and what the mark means (printed under
# the table when a row carries it, with the thresholds the run used: ``settings()``).
FLAGS: Dict[str, tuple] = {
    "spread": ("S", "wide spread: the interquartile range is over {wide_iqr:.0%} of the median, or the median over "
                    "{slow_median:g}x the fastest call (the machine was likely busy); the median is not a steady "
                    "figure"),
    "busy": ("L", "other processes used over {busy_share:.0%} of the machine's CPU time while the row was timed "
                  "(from /proc/stat): its time is theirs as much as its own"),
    "bandwidth": ("B", "more bandwidth than the device-to-device copy measured in this run: impossible from "
                       "memory, so the copy was slowed by something else, or the step's data stayed in a cache "
                       "(a small row on a CPU); not a memory-bound figure"),
    "baseline": ("R", "the ratio divides by a baseline time that is itself flagged S or L: the ratio is not reliable"),
    "merge_share": ("M", "the merges timed alone took longer than the whole forward pass: one of the two "
                         "timings is off"),
}


def settings(retries: int) -> Dict:
    """The thresholds a run flags by, saved with its results (and read back by ``legend``)."""
    return {"wide_iqr": WIDE_IQR, "slow_median": SLOW_MEDIAN, "busy_share": BUSY_SHARE, "retries": retries,
            "futile_streak": FUTILE_STREAK}


def spread(times: Sequence[float]) -> Dict[str, float]:
    """min, quartiles, median and max of ``times``; ``iqr_rel`` is the interquartile range
    over the median, ``median_over_min`` how much slower the median call was than the fastest."""
    median = statistics.median(times)
    q1, q3 = median, median
    if len(times) > 1:
        # "inclusive" keeps the quartiles within the samples, also for the 3 calls of a CPU e2e row.
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    low = min(times)
    return {"n": len(times), "min_s": low, "q1_s": q1, "median_s": median, "q3_s": q3, "max_s": max(times),
            "iqr_rel": (q3 - q1) / median if median > 0 else 0.0,
            "median_over_min": median / low if low > 0 else 1.0}


def is_wide(stats: Dict[str, float]) -> bool:
    return stats["iqr_rel"] > WIDE_IQR or stats["median_over_min"] > SLOW_MEDIAN


def timing_flags(times: Sequence[float], impossible: Optional[Callable[[float], List[str]]] = None) -> List[str]:
    """The flags of one set of timings: "spread" when wide, and whatever ``impossible`` says
    about their median (e.g. "bandwidth")."""
    stats = spread(times)
    flags = ["spread"] if is_wide(stats) else []
    return flags + (impossible(stats["median_s"]) if impossible else [])


def measure_steadily(measure: Callable[[], List[List[float]]], retries: int = RETRIES,
                     impossible: Optional[Callable[[float], List[str]]] = None,
                     log: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Call ``measure`` (one list of timings per case, the cases timed together) until no case
    carries a flag, at most ``retries`` more times, watching how much CPU time other processes
    take meanwhile. Keeps the attempt with the fewest flags, then the narrowest spread (the
    quietest moment: a busy machine only ever slows a call down), and returns for each case
    {"times_s", "spread", "flags", "attempts", "others_cpu_share", "discarded_times_s"}."""
    attempts = []
    for attempt in range(retries + 1):
        before = cpu_snapshot()
        cases = measure()
        share = others_cpu_share(before, cpu_snapshot())
        busy = ["busy"] if share is not None and share > BUSY_SHARE else []
        flags = [timing_flags(times, impossible) + busy for times in cases]
        attempts.append({"cases": cases, "flags": flags, "share": share})
        if not any(flags):
            break
        if log and attempt < retries:
            worst = max(range(len(cases)), key=lambda i: spread(cases[i])["iqr_rel"])
            others = "" if share is None else f", other processes {share:.0%} of the CPUs"
            log(f"  {', '.join(sorted({f for fl in flags for f in fl}))} ({describe(spread(cases[worst]))}{others}): "
                f"measuring again ({attempt + 1}/{retries})")
    best = min(attempts, key=lambda a: (sum(map(len, a["flags"])), max(spread(t)["iqr_rel"] for t in a["cases"])))
    return [{"times_s": times, "spread": spread(times), "flags": flags, "attempts": len(attempts),
             "others_cpu_share": best["share"],
             "discarded_times_s": [a["cases"][i] for a in attempts if a is not best]}
            for i, (times, flags) in enumerate(zip(best["cases"], best["flags"]))]


class Steadiness:
    """``measure_steadily`` over a run's rows, with ``retries`` for each, except after
    FUTILE_STREAK rows in a row stayed unsteady: then none, until a row comes out steady."""

    def __init__(self, retries: int = RETRIES):
        self.retries = retries
        self.streak = 0

    def measure(self, measure: Callable[[], List[List[float]]],
                impossible: Optional[Callable[[float], List[str]]] = None,
                log: Optional[Callable[[str], None]] = None) -> List[Dict]:
        retries = 0 if self.streak >= FUTILE_STREAK else self.retries
        if log and retries < self.retries:
            log(f"  measured once: the last {self.streak} rows stayed unsteady through their retries")
        cases = measure_steadily(measure, retries, impossible, log)
        self.streak = self.streak + 1 if any(unsteady(c) for c in cases) else 0
        for c in cases:
            c["retries_allowed"] = retries
        return cases


def unsteady(row: Dict) -> bool:
    """Whether a row's time is not a steady figure (widely spread, or taken beside other work):
    a ratio divided by it is flagged "baseline"."""
    return bool({"spread", "busy"} & set(row.get("flags", ())))


def describe(stats: Dict[str, float]) -> str:
    """One line for the progress log: median, spread, and the range of the calls."""
    return (f"median {stats['median_s'] * 1e3:.4g} ms, IQR {stats['iqr_rel']:.0%}, "
            f"min {stats['min_s'] * 1e3:.4g} ms, max {stats['max_s'] * 1e3:.4g} ms")


def mark(flags: Sequence[str]) -> str:
    """The flags column of a table: the marks of ``flags``, in FLAGS' order, run together ("SR"):
    one letter each keeps the column narrow."""
    return "".join(FLAGS[f][0] for f in FLAGS if f in flags)


def legend(rows: Sequence[Dict], thresholds: Optional[Dict] = None) -> List[str]:
    """One line per flag that some row of ``rows`` (each with "flags") carries, saying what it
    means with the ``thresholds`` its run used (``settings()``; default: this module's), and
    one on the rows measured more than once, or once for a busy machine."""
    present = {f for r in rows for f in r.get("flags", ())}
    values = {**settings(RETRIES), **(thresholds or {})}
    lines = [f"{FLAGS[f][0]}: {FLAGS[f][1].format(**values)}." for f in FLAGS if f in present]
    timed = [r for r in rows if "attempts" in r]  # not the rows that could not run or failed
    again = sum(1 for r in timed if r["attempts"] > 1)
    once = sum(1 for r in timed if r.get("retries_allowed", values["retries"]) < values["retries"])
    if again or once:
        lines.append(f"Measured again: {again} of {len(timed)} timed rows (up to {values['retries']} more times "
                     "each; the steadiest attempt is kept, the others are in the JSON)"
                     + (f"; {once} measured once, after {values['futile_streak']} rows in a row had stayed S or L "
                        "through their retries" if once else "") + ".")
    return lines
