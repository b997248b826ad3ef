"""Count the Triton compilations of a GPU run's warm-up cases, on a machine without a GPU.

    python -m benchmarks.compile_keys [--keys FILE]

``benchmarks.warm_triton`` lists every case that the full-shape tests, the benchmarks and
the sanitizer case run through the "triton" backend. This runs each of them on CPU tensors
with ``specializations.recording(launch_kernels=False)``: every launch is recorded with the
compile key Triton would give it on a GPU, and nothing runs, so the full shapes cost seconds.
Prints the distinct keys per kernel and in all; ``--keys`` writes them out (as
``specializations`` does, so that the two sets can be joined).
"""

import argparse
import json
import os
import sys

# The Triton backend takes CPU tensors only in interpreter mode, set before triton loads.
os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.warm_triton import cases, run_case  # noqa: E402
from tome_kernels.backends.triton.specializations import recording, summary  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", help="write the distinct keys to this JSON file")
    args = parser.parse_args(argv)
    failed = 0
    with recording(launch_kernels=False) as keys:
        for label, case in cases():
            try:
                run_case(case, device="cpu")  # on CPU tensors: its own runner takes the GPU
            except Exception as error:  # as in warm_triton: one bad case must not hide the others
                failed += 1
                print(f"FAIL {label}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    print(f"{len(cases())} warm-up cases, {failed} failed")
    print(summary(keys))
    if args.keys:
        with open(args.keys, "w") as f:
            json.dump(sorted(keys, key=repr), f, indent=0, default=repr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
