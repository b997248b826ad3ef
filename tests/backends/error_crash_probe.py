"""Which condition turns a C++ argument error into a crash (for the GPU run; docs/gpu_notes.md).

    python -m tests.backends.error_crash_probe [--timeout S]

In the first GPU run (torch 2.11 on an H200), an argument error raised by the CPU
extension's ``TORCH_CHECK`` killed the process with a segmentation fault, where torch 2.13
and torch 2.11 on a CPU machine raise ``RuntimeError``. Each case below runs in a fresh
interpreter (``-X faulthandler``: a crash prints its Python stack) and adds one condition
of that run: the first case that crashes names the cause, and the last, a torch error
instead of ours, tells whether the extension is involved at all.

Prints one line per case: ``raised <error>``, ``crashed: <signal>`` or ``not run: <why>``
(its set-up failed, e.g. no GPU). Exits 1 if a case crashed, else 2 if one could not run.
The cases run at once and share one deadline (``--timeout``, default 120 s): a case still
running then is reported as hung, and the others keep their lines.
"""

import argparse
import subprocess
import sys
import time

SETUP = """
import torch
from tome_kernels.backends.native import extension_build
extension_build.load("cpu")
"""
OUR_ERROR = "torch.ops.tome_native.match(torch.randn(2, 3, 9, 4), 0, False, False)"  # r = 0: out of range
TRITON_LAUNCH = """
import tome_kernels
x = torch.randn(2, 197, 64, device="cuda")
tome_kernels.bipartite_merge(x, x, 16, backend="triton")
torch.cuda.synchronize()
"""
CASES = {
    "1 the cpu extension's error": SETUP,
    "2 after torch.cuda.init()": SETUP + "torch.cuda.init()\n",
    "3 after a Triton kernel ran on the GPU": SETUP + TRITON_LAUNCH,
}
TORCH_ERROR = "torch.mm(torch.ones(2, 3), torch.ones(2, 3))"  # mismatched shapes: torch's own check


def _code(setup: str, error: str) -> str:
    return f"{setup}\ntry:\n    {error}\n    print('no error raised')\nexcept Exception as e:\n" \
           f"    print('raised', type(e).__name__)\n"


def _verdict(proc: subprocess.Popen, deadline: float, timeout: float) -> str:
    try:
        stdout, stderr = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"crashed: hung past {timeout} s"
    if proc.returncode == 0:
        return (stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode < 0:  # killed by a signal: the crash this looks for (faulthandler printed the stack)
        return f"crashed: signal {-proc.returncode}; {stderr.strip()[-600:]}"
    # A Python exception before the error under test: the case could not be set up.
    return f"not run: {(stderr.strip().splitlines() or ['(no output)'])[-1]}"


def main(timeout: float = 120) -> int:
    runs = [(f"case {name}", setup, OUR_ERROR) for name, setup in CASES.items()]
    runs.append(("case 4 torch's own error after a Triton kernel ran", CASES["3 after a Triton kernel ran on the GPU"],
                 TORCH_ERROR))
    # The cases are independent processes: started together, they take one case's time.
    procs = [(label, subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", _code(setup, error)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"))
             for label, setup, error in runs]
    # One deadline for all: each its own timeout, one after the other, could add up to 4 times it.
    deadline = time.monotonic() + timeout
    results = [(label, _verdict(proc, deadline, timeout)) for label, proc in procs]
    for label, result in results:
        print(f"{label}: {result}", flush=True)
    if any(result.startswith("crashed") for _, result in results):
        return 1
    return 2 if any(result.startswith("not run") for _, result in results) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.backends.error_crash_probe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=120, help="seconds for all the cases together")
    sys.exit(main(parser.parse_args().timeout))
