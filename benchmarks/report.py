"""The report of a benchmark run: terminal tables, JSON and a PNG chart in benchmarks/results/."""
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys

import torch

import gatedrnn

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def onednn_isa():
    """The instruction set oneDNN (torch.nn's CPU LSTM) runs with here, as its verbose mode reports it: read
    from a tiny torch.nn.LSTM in a subprocess, so that this process's settings stay untouched."""
    code = "import torch; torch.nn.LSTM(8, 8)(torch.randn(3, 2, 8))"
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        if ",isa:" in line:
            return line.split(",isa:", 1)[1].strip()
    return "unknown"


def instruction_sets():
    """Which instruction set each side runs on the CPU: {implementation: description}."""
    info = gatedrnn.backend_info()
    bf16 = "bfloat16 on AMX" if info["cpu_bf16_amx"] else "bfloat16 on vdpbf16ps" if info["cpu_bf16_tiles"] else \
        "bfloat16 in float32"
    return {
        "gatedrnn": f"{info['cpu_isa']} tiles, {bf16}, {info['cpu_threads']} team of {info['cpu_team_size']}, "
                    f"post-loop GEMM {info['cpu_gemm']}",
        "torch.nn": f"oneDNN {onednn_isa()}, ATen {torch.backends.cpu.get_cpu_capability()}",
    }


def commit():
    """The checked-out commit (short, "-dirty" with local changes); GATEDRNN_COMMIT names it where the tree is a
    copy without git (the lent GPU machine, see .ci/gpu)."""
    if os.environ.get("GATEDRNN_COMMIT"):
        return os.environ["GATEDRNN_COMMIT"]
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _mb(nbytes):
    return f"{nbytes / 2**20:.1f}" if nbytes is not None else "-"


def table(results, roofline):
    """One row per case: median (min) ms per implementation, speed-up, us per step, GFLOP/s, % of roofline,
    memory when training (saved activations on CPU, peak allocation on CUDA)."""
    if not results:
        return ""
    names = list(dict.fromkeys(name for r in results for name in r.timings)) or ["gatedrnn", "torch.nn"]
    head = f"{'case':<52}" + "".join(f"{name + ' ms':>22}" for name in names)
    head += f"{'speed-up':>9}{'us/step':>9}{'GFLOP/s':>9}{'roofline':>9}{'mem MB nn/ours':>16}"
    lines = [head]
    for r in results:
        row = f"{r.case.label():<52}"
        if r.error:
            lines.append(row + "  " + r.error)
            continue
        for name in names:
            t = r.timings.get(name)
            row += f"{t.median_ms:>12.2f} ({t.min_ms:>7.2f})" if t else f"{'-':>22}"
        ours = r.timings.get("gatedrnn")
        speedup = r.speedup()
        row += f"{speedup:>8.2f}x" if speedup else f"{'-':>9}"
        if ours:
            gflops = r.case.gemm_flops() / (ours.median_ms * 1e-3) / 1e9
            row += f"{ours.median_ms * 1e3 / r.case.T:>9.1f}{gflops:>9.1f}{gflops / roofline[r.case.dtype]:>8.0%} "
        else:
            row += f"{'-':>9}{'-':>9}{'-':>9}"
        if r.memory_bytes:
            row += f"{_mb(r.memory_bytes.get(r.case.baseline)) + '/' + _mb(r.memory_bytes.get('gatedrnn')):>16}"
        lines.append(row)
    return "\n".join(lines)


def _case_dict(case):
    d = dataclasses.asdict(case)
    d["dtype"] = str(case.dtype).replace("torch.", "")
    d["label"] = case.label()
    d["gemm_flops"] = case.gemm_flops()
    return d


def to_json(runs, args, rates=None, isas=None):
    """runs: {device: (results, roofline)}; rates: {device: {dtype: {library: GFLOP/s}}}; isas: {device:
    instruction_sets()}."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "torch": torch.__version__,
        "gatedrnn": gatedrnn.backend_info(),
        "command": args,
        "devices": {
            device: {
                "name": device_name(device),
                "gemm_roofline_gflops": {str(k).replace("torch.", ""): v for k, v in roofline.items()},
                "gemm_rates_gflops": {str(k).replace("torch.", ""): v for k, v in (rates or {}).get(device, {}).items()},
                "instruction_sets": (isas or {}).get(device, {}),
                "isa_cap": os.environ.get("GATEDRNN_CPU_ISA", "native") if device == "cpu" else None,
                "results": [
                    {
                        "case": _case_dict(r.case),
                        "timings_ms": {k: dataclasses.asdict(v) for k, v in r.timings.items()},
                        "speedup": r.speedup(),
                        "memory_bytes": r.memory_bytes,
                        "max_rel_diff": r.max_rel_diff,
                        "error": r.error,
                    }
                    for r in results
                ],
            }
            for device, (results, roofline) in runs.items()
        },
    }


def output_stem(runs):
    date = datetime.datetime.now().strftime("%Y-%m-%d_%H%M")
    devices = "+".join(re.sub(r"[^A-Za-z0-9]+", "-", device_name(d).split(",")[0]).strip("-") for d in runs)
    cap = os.environ.get("GATEDRNN_CPU_ISA")  # set by --isa: a capped run must not overwrite a native one
    return f"{date}_{devices}{'_' + cap if cap else ''}_torch{torch.__version__.split('+')[0]}_{commit()}"


def write_json(data, stem, directory=RESULTS_DIR):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def write_chart(runs, stem, directory=RESULTS_DIR):
    """A horizontal bar chart of gatedrnn's speed-up over torch.nn per case, one panel per device."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no chart written (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(device, [r for r in results if r.speedup()]) for device, (results, _) in runs.items()]
    panels = [(device, results) for device, results in panels if results]
    if not panels:
        return None
    height = sum(max(2, 0.32 * len(results) + 1) for _, results in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, height), squeeze=False)
    for ax, (device, results) in zip(axes[:, 0], panels):
        labels = [r.case.label() for r in results]
        speedups = [r.speedup() for r in results]
        colors = ["#2a7" if s >= 1 else "#c54" for s in speedups]
        ax.barh(range(len(results)), speedups, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(results)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speed-up over torch.nn (median time ratio; >1 is faster)")
        ax.set_title(f"gatedrnn vs torch.nn on {device_name(device)}", fontsize=9)
        for k, s in enumerate(speedups):
            ax.text(s, k, f" {s:.2f}x", va="center", fontsize=7)
    fig.tight_layout()
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
