"""python -m benchmarks [--quick] [--repeats N]: gatedrnn vs torch.nn, side by side, on the CPU.

Prints a table of median times over interleaved repeats and the speed-up of gatedrnn over torch.nn
(above 1 means gatedrnn is faster). Each shape is checked for agreement before it is timed.
"""
import argparse
import sys

import torch

import gatedrnn

from .timing import Case, format_table, time_case

# The shapes the foundation issue sets speed targets on (float32, CPU).
STANDARD = [
    Case("GRU", 100, 64, 256, 256, training=True),
    Case("GRU", 50, 1, 128, 128, training=True),
    Case("GRU", 100, 64, 512, 512, training=False),
    Case("LSTM", 100, 64, 512, 512, training=True),
    Case("LSTM", 100, 64, 512, 512, training=False),
    Case("LSTM", 50, 1, 128, 128, training=True),
    Case("LSTM", 50, 1, 128, 128, training=False),
]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about a minute on 2 cores)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per module and shape")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 15)

    info = gatedrnn.backend_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, gatedrnn backend {info}")
    print(f"median of {repeats} interleaved repeats, float32, CPU\n")
    results = []
    for case in STANDARD:
        results.append(time_case(case, repeats=repeats))
        print(f"  done: {case.label()}", file=sys.stderr, flush=True)
    print(format_table(results))


if __name__ == "__main__":
    main()
