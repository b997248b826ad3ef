"""What the three benchmarks print and where they save: Markdown tables of at most
``MAX_WIDTH`` columns with their notes, and the results folder.

A plain run saves to ``benchmarks/results/local/`` (ignored by git: a run on a busy laptop
is no record); ``--save-record`` saves to ``benchmarks/results/``, the project's record;
``--out`` to any folder (the GPU run's script passes its output folder).
"""

import argparse
import os
import sys
import textwrap
from typing import Callable, Dict, List, Sequence

from .spread import legend

RECORD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LOCAL_DIR = os.path.join(RECORD_DIR, "local")
# Wide enough for a terminal beside an editor and for a README without side-scrolling.
MAX_WIDTH = 120


def log(msg: str) -> None:
    """A benchmark's progress line, on stderr (stdout carries its table)."""
    print(msg, file=sys.stderr, flush=True)


def add_output_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help=f"where the JSON goes (default: {os.path.relpath(LOCAL_DIR)}, ignored by git)")
    where.add_argument("--save-record", action="store_true",
                       help=f"save as the project's record, in {os.path.relpath(RECORD_DIR)}")
    where.add_argument("--no-save", action="store_true", help="print the table only")


def output_dir(args: argparse.Namespace) -> str:
    if args.out:
        return args.out
    return RECORD_DIR if args.save_record else LOCAL_DIR


def table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> List[str]:
    """A Markdown table; ``align`` has one letter per column, "l" or "r"."""
    rule = ["---" if a == "l" else "--:" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in [header, rule, *rows]]


def num(value: float) -> str:
    """3 significant digits, whole numbers from 100: a column stays narrow at any size."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:#.3g}"


def wrap(text: str) -> List[str]:
    """A note under a table, in lines of at most MAX_WIDTH."""
    return textwrap.wrap(text, MAX_WIDTH, break_on_hyphens=False) or [""]


def conditions_line(results: Dict) -> List[str]:
    """Where the run stood: the machine's load before and after, and the thread settings."""
    m = results.get("machine")
    if not m:
        return []
    before, after = (f"{load[0]:.2f}" if load else "unknown" for load in (m["load_before"], m["load_after"]))
    t = m["threads"]
    env = ", ".join(f"{k}={v if v is not None else 'unset'}" for k, v in t["env"].items())
    return wrap(f"load (1-minute average) {before} before, {after} after, on {m['cpu_count']} CPUs "
                f"({m['usable_cpus']} usable) | torch threads {t['torch']}, interop {t['interop']} | {env}")


def unavailable_notes(rows: Sequence[Dict], label: Callable[[Dict], str]) -> List[str]:
    """Each provider that could not run here, named once with its reason (providers with the
    same reason together) instead of on one row per shape; where it ran on other rows, the
    rows it missed (``label`` names a row) follow its name."""
    by_reason: Dict[str, Dict[str, List[str]]] = {}
    for r in rows:
        if r.get("status") == "unavailable":
            by_reason.setdefault(r["reason"], {}).setdefault(r["provider"], []).append(label(r))
    lines = []
    for reason, providers in by_reason.items():
        names = []
        for name, missed in providers.items():
            ran_elsewhere = any(r["provider"] == name and r["status"] != "unavailable" for r in rows)
            names.append(f"{name} ({', '.join(missed)})" if ran_elsewhere else name)
        lines += wrap(f"Not run here: {', '.join(names)}: {reason}.")
    return lines


def error_key(row: Dict) -> str:
    return f"{row['provider']}: {row['reason']}"


def error_notes(rows: Sequence[Dict]) -> Dict[str, int]:
    """A number for each distinct reason of the rows that ran but gave no timing (an error, an
    eager fallback): the row shows the number, the reason is printed once under the table."""
    numbers: Dict[str, int] = {}
    for r in rows:
        if r.get("status", "ok") not in ("ok", "unavailable"):
            numbers.setdefault(error_key(r), len(numbers) + 1)
    return numbers


def notes(results: Dict, errors: Dict[str, int], label: Callable[[Dict], str], extra: Sequence[str] = ()) -> List[str]:
    """Everything under a table: flags' meanings, error reasons, providers not run, extras."""
    rows = results["rows"]
    lines = []
    for line in legend(rows, results.get("settings", {}).get("spread")):
        lines += wrap(line)
    for reason, number in errors.items():
        lines += wrap(f"[{number}] {reason}")
    lines += unavailable_notes(rows, label)
    for line in extra:
        lines += wrap(line)
    return ([""] + lines) if lines else []


def main_saving_each_row(prog: str, argv, parse_args: Callable, run: Callable, format_table: Callable,
                         save: Callable[[Dict, str], str]) -> Dict:
    """A benchmark's main that saves its results after every row: ``run(args, keep)`` calls
    ``keep(results)`` after each row, so that a run stopped by a time limit (a GPU run's step)
    keeps what it measured, in the same file each time (named from the run's start). Then the
    table is printed, and the path of the final file as "saved <path>" (what bench.sh reads)."""
    args = parse_args(argv)
    command = " ".join([f"python -m {prog}"] + (sys.argv[1:] if argv is None else list(argv)))
    out_dir = None if args.no_save else output_dir(args)

    def keep(results: Dict) -> None:
        results.update(command=command, arguments=vars(args), complete=False)
        save(results, out_dir)

    results = run(args, keep if out_dir is not None else None)
    results.update(command=command, arguments=vars(args), complete=True)
    print(format_table(results))
    if out_dir is not None:
        print(f"saved {save(results, out_dir)}")
    return results
