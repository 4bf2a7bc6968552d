"""The GPU check's workloads (.ci/gpu_check.py runs them as subprocesses, on a GPU).

    python .ci/gpu_workloads.py smoke              a small forward and backward of every CUDA op, for
                                                   compute-sanitizer (memcheck, racecheck)
    python .ci/gpu_workloads.py step-times FILE    each step kernel's time per launch at the benchmark's main
                                                   shapes, printed and written to FILE as a Markdown table

--device cpu runs either on the CPU (tests/test_gpu_check.py does, to prove the scripts run before a GPU is
lent; the CPU has no step kernels to time, so its table is empty); --tiny shrinks step-times' shapes.
"""
import argparse
import pathlib
import re
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import gatedrnn  # noqa: E402

# (mode, extra constructor arguments) for every CUDA op: LSTM, LSTM with projection, GRU, the reset_after=False
# GRU and the layer_norm LSTM and GRU (their own kernels); and the variants whose kernel code differs (zoneout
# and recurrent dropout in the epilogues, the others around the kernels), which the dense runs feed through
# lengths= (padded input run as packed).
VARIANTS = {"zoneout": 0.2, "recurrent_dropout": 0.2, "input_dropout": 0.1, "weight_dropout": 0.2}
MODULES = [("LSTM", {}), ("LSTM", {"proj_size": 24}), ("GRU", {}), ("LSTM", dict(VARIANTS, zoneout_cell=0.2)),
           ("GRU", VARIANTS), ("GRU", {"reset_after": False}), ("GRU", dict(VARIANTS, reset_after=False)),
           ("LSTM", {"layer_norm": True}), ("GRU", {"layer_norm": True}),
           ("LSTM", dict(VARIANTS, zoneout_cell=0.2, layer_norm=True)), ("GRU", dict(VARIANTS, layer_norm=True))]


def forward_backward(device, mode, kwargs, batch, dtype, steps=5, hidden=40, inputs=7, packed=True):
    """One training step of a small layer on the GPU: 40 hidden units make two unit tiles (the second ragged)
    and two K chunks; batch 3 and 40 take the 1- and 4-rows-per-thread kernels (40: two row blocks)."""
    module = getattr(gatedrnn, mode)(inputs, hidden, **kwargs).to(device, dtype)
    x = torch.randn(steps, batch, inputs, device=device, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([steps] + [1 + k % steps for k in range(1, batch)])
    if packed:
        x_in = torch.nn.utils.rnn.pack_padded_sequence(x, lengths.sort(descending=True).values)
        out = module(x_in)[0].data
    elif any(name in kwargs for name in VARIANTS):
        out = module(x, lengths=lengths)[0]
    else:
        out = module(x)[0]
    out.float().square().sum().backward()
    synchronize(device)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def smoke(device):
    for mode, kwargs in MODULES:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for batch in (3, 40):
                forward_backward(device, mode, kwargs, batch, dtype, packed=batch == 40)
    print("smoke: every op ran forward and backward")


CASES = [  # (mode, batch, input, hidden, steps): the benchmark's main shape and its B=1 shape
    ("LSTM", 64, 512, 512, 100), ("GRU", 64, 512, 512, 100), ("LSTM", 1, 128, 128, 50), ("GRU", 1, 128, 128, 50),
    ("GRU reset_after=False", 64, 512, 512, 100), ("LSTM layer_norm", 64, 512, 512, 100),
    ("GRU layer_norm", 64, 512, 512, 100)]
TINY_CASES = [("LSTM", 3, 5, 8, 4), ("GRU", 3, 5, 8, 4), ("GRU reset_after=False", 3, 5, 8, 4),
              ("LSTM layer_norm", 3, 5, 8, 4), ("GRU layer_norm", 3, 5, 8, 4)]
# The gates (blocks of H rows of W_hh) each step kernel's product covers: its FLOPs are 2 * B * gates * H * H.
KERNEL_GATES = {"lstm_forward_step": 4, "lstm_backward_step": 4, "gru_forward_step": 3, "gru_backward_step": 3,
                "gru_reset_gates_step": 2, "gru_candidate_step": 1, "gru_update_backward_step": 2,
                "gru_reset_backward_step": 1, "lstm_norm_product_step": 4, "gru_norm_product_step": 3,
                "lstm_norm_backward_product_step": 4, "gru_norm_backward_product_step": 3}


def kernel_times(prof):
    """{short kernel name: (launches, total microseconds)} for gatedrnn's step kernels."""
    times = {}
    for event in prof.key_averages():
        m = re.search(r"(\w+_step<[^>]*>)", event.key)
        if not m:
            continue
        total = getattr(event, "device_time_total", None)
        if total is None:  # older torch
            total = event.cuda_time_total
        launches, microseconds = times.get(m.group(1), (0, 0.0))
        times[m.group(1)] = (launches + event.count, microseconds + total)
    return times


def step_times(path, device, cases):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [ProfilerActivity.CPU]
    rows = ["| case | dtype | kernel | launches | µs per launch | GFLOP/s of its product | wall µs per step |",
            "|---|---|---|---:|---:|---:|---:|"]
    for mode, batch, inputs, hidden, steps in cases:
        for dtype in (torch.float32, torch.bfloat16):
            for train in (False, True):
                kind, *options = mode.split()
                kwargs = {"reset_after": False} if "reset_after=False" in options else {}
                if "layer_norm" in options:
                    kwargs["layer_norm"] = True
                module = getattr(gatedrnn, kind)(inputs, hidden, **kwargs).to(device, dtype)
                x = torch.randn(steps, batch, inputs, device=device, dtype=dtype, requires_grad=train)

                def run():
                    if train:
                        module(x)[0].float().sum().backward()
                    else:
                        with torch.no_grad():
                            module(x)
                for _ in range(3):
                    run()
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
                wall = (time.perf_counter() - start) * 1e6 / steps
                with profile(activities=activities) as prof:
                    run()
                    synchronize(device)
                for name, (launches, total) in sorted(kernel_times(prof).items()):
                    per_launch = total / launches
                    gates = KERNEL_GATES[name.split("<")[0]]
                    flops = 2 * batch * gates * hidden * hidden  # the kernel's product, forward or backward
                    label = f"{mode} {'train' if train else 'infer'} T={steps} B={batch} I={inputs} H={hidden}"
                    rows.append(f"| {label} | {str(dtype).replace('torch.', '')} | `{name}` | {launches} | "
                                f"{per_launch:.1f} | {flops / per_launch / 1e3:.0f} | {wall:.1f} |")
    table = "\n".join(rows) + "\n"
    print(table)
    pathlib.Path(path).write_text(table)


def main(argv):
    parser = argparse.ArgumentParser(prog="python .ci/gpu_workloads.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["smoke", "step-times"])
    parser.add_argument("table", nargs="?", help="step-times: the Markdown file to write")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="step-times: small shapes")
    args = parser.parse_args(argv)
    if args.workload == "smoke":
        smoke(args.device)
    elif args.table is None:
        parser.error("step-times needs the file to write the table to")
    else:
        step_times(args.table, args.device, TINY_CASES if args.tiny else CASES)


if __name__ == "__main__":
    main(sys.argv[1:])
