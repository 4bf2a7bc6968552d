"""python -m benchmarks [--quick | --full] [--repeats N] [--devices cpu,cuda] [--filter TEXT] [--isa avx2] [--out DIR]

Times gatedrnn against torch.nn side by side (interleaved) on every available device, for the standard
shapes: LSTM and GRU, inference and training, dense, 2-layer bidirectional and packed variable-length input.
Each case is first checked for agreement (outputs, and input gradients when training); a case that
disagrees is reported and not timed. Prints a table per device and writes JSON and a PNG chart to
benchmarks/results/ (or --out). The CPU roofline is the faster of the two GEMMs torch ships (MKL and oneDNN), both
measured in the same run and both printed; the instruction set each side runs is printed too.

--isa avx2 runs the whole benchmark again in a subprocess with both sides capped at AVX2+FMA (gatedrnn by
GATEDRNN_CPU_ISA=avx2, torch.nn's oneDNN by ONEDNN_MAX_CPU_ISA=AVX2, ATen's kernels by ATEN_CPU_CAPABILITY=avx2,
MKL by MKL_ENABLE_INSTRUCTIONS=AVX2): what users with AVX2-only CPUs get.
"""
import argparse
import os
import subprocess
import sys

import torch

from .cases import standard_cases
from .measure import gemm_rates, measure
from . import onnx_peer, report
from .report import device_name, instruction_sets, output_stem, table, to_json, write_chart, write_json

# --isa NAME: the environment of a subprocess whose both sides are capped at that instruction set.
ISA_CAPS = {
    "avx2": {"GATEDRNN_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def run_capped(isa, argv):
    """Re-runs this command without --isa, in a subprocess with both sides capped at `isa`."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--isa":
            skip = True
        elif not arg.startswith("--isa="):
            rest.append(arg)
    env = dict(os.environ, **ISA_CAPS[isa])
    print(f"capping both sides at {isa}: " + " ".join(f"{k}={v}" for k, v in ISA_CAPS[isa].items()), flush=True)
    return subprocess.run([sys.executable, "-m", "benchmarks", *rest], env=env).returncode


class Progress:
    """A one-line progress bar on a terminal; one line per case otherwise (CI logs)."""

    def __init__(self, total):
        self.total, self.done, self.tty = total, 0, sys.stderr.isatty()

    def step(self, label):
        self.done += 1
        bar = "#" * (30 * self.done // self.total)
        line = f"[{bar:<30}] {self.done}/{self.total} {label}"
        print(f"\r{line:<110}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def available_devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 repeats per case (under 3 minutes on 2 CPU cores)")
    size.add_argument("--full", action="store_true", help="also T=100 B=64 I=H=1024 on the CPU")
    parser.add_argument("--repeats", type=int, help="timed repeats per implementation and case (default 3 quick, 11)")
    parser.add_argument("--devices", help="comma-separated subset of: " + ",".join(available_devices()))
    parser.add_argument("--filter", default="", help="only cases whose label contains this text")
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON or PNG")
    parser.add_argument("--out", help="where the JSON and PNG go (default: benchmarks/results)")
    parser.add_argument("--isa", choices=sorted(ISA_CAPS),
                        help="cap both sides' CPU instruction set (runs in a subprocess)")
    args = parser.parse_args(argv)
    if args.isa:
        return run_capped(args.isa, sys.argv[1:] if argv is None else argv)
    repeats = args.repeats or (3 if args.quick else 11)
    warmup = 1 if args.quick else 2
    devices = args.devices.split(",") if args.devices else available_devices()
    unknown = set(devices) - set(available_devices())
    if unknown:
        parser.error(f"not available here: {', '.join(sorted(unknown))}")

    plan = [(d, c) for d in devices for c in standard_cases(d, full=args.full) if args.filter in c.label()]
    print(f"gatedrnn benchmark: torch {torch.__version__}, {len(plan)} cases, median (min) of {repeats} "
          f"interleaved repeats")
    runs, rates, isas = {}, {}, {}
    progress = Progress(len(plan))
    for device in devices:
        cases = [c for d, c in plan if d == device]
        device_rates = {dtype: gemm_rates(device, dtype) for dtype in {c.dtype for c in cases}}
        rates[device] = device_rates
        roofline = {dtype: max(r.values()) for dtype, r in device_rates.items()}
        isas[device] = instruction_sets() if device == "cpu" else {}
        if any(onnx_peer.applies(case, device) for case in cases):
            isas[device]["onnxruntime"] = onnx_peer.describe()
        results = []
        for case in cases:
            results.append(measure(case, device, repeats, warmup))
            progress.step(f"{device}: {case.label()}")
        runs[device] = (results, roofline)
    progress.close()

    for device, (results, roofline) in runs.items():
        peaks = "; ".join(f"{str(k).replace('torch.', '')} {v:.0f} GFLOP/s ("
                          + ", ".join(f"{lib} {g:.0f}" for lib, g in rates[device][k].items()) + ")"
                          for k, v in roofline.items())
        print(f"\n{device}: {device_name(device)}")
        print(f"GEMM roofline, the fastest GEMM measured in this run: {peaks}")
        for name, isa in isas[device].items():
            print(f"{name}: {isa}")
        print(table(results, roofline))
    if not args.no_save:
        stem, out = output_stem(runs), args.out or report.RESULTS_DIR
        print(f"\nwrote {write_json(to_json(runs, sys.argv[1:] if argv is None else argv, rates, isas), stem, out)}")
        chart = write_chart(runs, stem, out)
        if chart:
            print(f"wrote {chart}")
    disagreements = [r for results, _ in runs.values() for r in results if r.error]
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
