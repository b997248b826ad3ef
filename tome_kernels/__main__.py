"""``python -m tome_kernels``: the environment report a bug report needs (``report.py``)."""

import argparse

from .report import environment_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tome_kernels", description=__doc__)
    parser.add_argument("--load", action="store_true",
                        help="load every backend as a first use would (may compile the CPU extension: minutes)")
    args = parser.parse_args(argv)
    print(environment_report(load=args.load))


if __name__ == "__main__":
    main()
