"""The GPU check: everything a lent GPU machine must prove about gatedrnn's CUDA path, in one command.

    bash .ci/gpu [--out DIR] [--budget SECONDS] [--stages build,tests,...] [--dry-run]

Run from the repository root on a machine with an NVIDIA GPU and a CUDA build of torch (the lent device:
torch preinstalled, no network). Stages, in order, each timed and each limited so that the whole run stays
within the budget (default 400 s: the device gives a session 15 minutes, machine start included, and a
second run must fit):

  build       gatedrnn._C for this GPU's architecture only (TORCH_CUDA_ARCH_LIST from its capability)
  tests       tests/test_cuda.py and the CUDA variants of the device suites (pytest-xdist when installed)
  memcheck    a small forward and backward of every op under compute-sanitizer --tool memcheck
  racecheck   the same under --tool racecheck (shared-memory hazards between a block's threads)
  step-times  each step kernel's time per launch at T=100 B=64 I=H=512 (torch.profiler)
  benchmark   python -m benchmarks --quick --devices cuda

It writes 5 files to --out (default: $OUT when set, else benchmarks/results/), side by side: the summary as
Markdown and JSON, the stages' logs (at most 4 MiB, their tail), and the benchmark's JSON and PNG. Their
names carry the commit: set GATEDRNN_COMMIT where the tree is a copy without git (the lent machine's is).
CPU tests are not run: CI runs them. Exit status:
0 when every stage passed, 1 when one failed or ran out of time, 2 when this machine cannot run the check at
all (no GPU, a torch without CUDA), with the reason on one line.
"""
import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
STAGES = ("build", "tests", "memcheck", "racecheck", "step-times", "benchmark")
# Seconds each stage may take at most; a stage also never gets more than what is left of the budget, less
# the minimum of every stage after it, so that a slow build shortens the later stages instead of the run
# overrunning. A stage whose share falls below its minimum is skipped, and says so.
STAGE_LIMITS = {"build": 300, "tests": 180, "memcheck": 90, "racecheck": 90, "step-times": 60, "benchmark": 180}
STAGE_MINIMUMS = {"build": 60, "tests": 45, "memcheck": 20, "racecheck": 20, "step-times": 15, "benchmark": 45}
DEFAULT_BUDGET = 400
MIN_CAPABILITY = (8, 0)  # csrc/cuda/step_tile.cuh: bfloat16 tensor cores
MAX_LOG_BYTES = 4 << 20  # of the logs file; the device returns files up to 16 MiB
# The device suites whose CUDA variants run here (`-k cuda` picks them: their ids carry the device), and the
# GPU-only file, run whole.
CUDA_VARIANT_SUITES = ("test_parity.py", "test_ops.py", "test_autocast.py", "test_bad_input.py", "test_modules.py",
                       "test_backend.py", "test_lengths.py", "test_zoneout.py", "test_dropout.py",
                       "test_weight_dropout.py", "test_reset_before.py", "test_layer_norm.py")
GPU_ONLY_SUITE = "test_cuda.py"


class CheckUnavailable(Exception):
    """This machine cannot run the GPU check at all; the message says why, in one line."""


@dataclasses.dataclass
class StageResult:
    name: str
    status: str  # passed, failed, timed out, skipped
    seconds: float = 0.0
    summary: str = ""  # one line for the table
    details: str = ""  # Markdown for the summary's section of this stage
    log: str = ""  # full output, for the logs file


# ------------------------------------------------------------------------------------------ architecture
def arch_list(capabilities):
    """TORCH_CUDA_ARCH_LIST for the given (major, minor) capabilities: each distinct one, ascending.
    Raises CheckUnavailable when there is none or one is older than the kernels need."""
    capabilities = sorted(set(capabilities))
    if not capabilities:
        raise CheckUnavailable("no GPU capability could be read (torch and nvidia-smi both failed)")
    old = [c for c in capabilities if c < MIN_CAPABILITY]
    if old:
        raise CheckUnavailable(f"GPU compute capability {old[0][0]}.{old[0][1]} is older than the "
                               f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} gatedrnn's CUDA kernels need")
    return ";".join(f"{major}.{minor}" for major, minor in capabilities)


def parse_nvidia_smi_capabilities(text):
    """[(major, minor)] from `nvidia-smi --query-gpu=compute_cap --format=csv,noheader` output."""
    found = []
    for line in text.splitlines():
        m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line)
        if m:
            found.append((int(m.group(1)), int(m.group(2))))
    return found


def detect_capabilities(torch_module=None, run=subprocess.run):
    """The capabilities of the visible GPUs: from torch, or from nvidia-smi when torch cannot tell."""
    try:
        torch = torch_module or __import__("torch")
        count = torch.cuda.device_count()
        if count:
            return [tuple(torch.cuda.get_device_capability(i)) for i in range(count)]
    except Exception:  # a broken driver or runtime: fall back to nvidia-smi
        pass
    try:
        out = run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                  text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi_capabilities(out.stdout) if out.returncode == 0 else []


# ---------------------------------------------------------------------------------------------- budget
class Budget:
    """The run's time budget: how long the next stage may take."""

    def __init__(self, seconds, clock=None):
        self.seconds, self.clock = seconds, clock or (lambda: time.monotonic())
        self.start = self.clock()

    def left(self):
        return self.seconds - (self.clock() - self.start)

    def limit_for(self, stage, later_stages):
        """Seconds the stage may run, or 0 when it must be skipped to leave the later stages their minimum."""
        reserve = sum(STAGE_MINIMUMS[s] for s in later_stages)
        share = min(STAGE_LIMITS[stage], self.left() - reserve)
        return share if share >= STAGE_MINIMUMS[stage] else 0


# ------------------------------------------------------------------------------------------- commands
def run_command(cmd, limit, env=None, cwd=ROOT):
    """(returncode, or None when it ran past limit, and the combined output). The command runs in its own
    process group, which is killed whole at the limit: pytest-xdist workers and the program under
    compute-sanitizer are grandchildren, and would otherwise keep running (and hold the output pipe open)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out + f"\n[killed after {limit:.0f} s]\n"


def has_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def stage_environment(arch):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["TORCH_CUDA_ARCH_LIST"] = arch
    return env


def build_command():
    return [sys.executable, "setup.py", "build_ext", "--inplace"]


def test_command(workers):
    tests = ROOT / "tests"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    cmd += [str(tests / GPU_ONLY_SUITE)] + [str(tests / s) for s in CUDA_VARIANT_SUITES]
    # test_cuda.py's module name matches "cuda", so all of it runs; the others contribute their CUDA variants.
    return cmd + ["-k", "cuda"]


def find_compute_sanitizer():
    """compute-sanitizer on PATH, else in the CUDA toolkit; None when there is none."""
    found = shutil.which("compute-sanitizer")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and root and os.path.isfile(os.path.join(root, "bin", "compute-sanitizer")):
            found = os.path.join(root, "bin", "compute-sanitizer")
    return found


def sanitizer_command(sanitizer, tool):
    return [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable,
            str(ROOT / ".ci" / "gpu_workloads.py"), "smoke"]


def pytest_counts(output):
    """{'passed': n, 'failed': n, ...} from pytest's last summary line."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    if not lines:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)",
                                                   lines[-1])}


# ------------------------------------------------------------------------------------------- summary
def summary_markdown(info, results, budget_seconds, files):
    total = sum(r.seconds for r in results)
    lines = [f"# GPU check: {info.get('device', 'unknown device')}", "",
             f"- when: {info.get('when')}; commit {info.get('commit')}",
             f"- torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), Python {info.get('python')}, "
             f"arch list {info.get('arch')}",
             f"- total {total:.0f} s of a {budget_seconds} s budget", "",
             "| stage | status | seconds | result |", "|---|---|---:|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.summary} |" for r in results]
    for r in results:
        if r.details:
            lines += ["", f"## {r.name}", "", r.details.rstrip()]
    if files:
        lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files)]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir, stem, info, results, budget_seconds, extra_files=()):
    """Writes the summary (.md, .json) and the logs beside the benchmark's files; returns every file name.
    Everything lies directly in out_dir; the logs are capped at MAX_LOG_BYTES (their tail is kept)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {"md": f"{stem}.md", "json": f"{stem}.json", "log": f"{stem}.log"}
    logs = "".join(f"===== {r.name}: {r.status} in {r.seconds:.1f} s\n{r.log}\n" for r in results)
    data = logs.encode(errors="replace")
    if len(data) > MAX_LOG_BYTES:
        data = b"[... earlier output cut ...]\n" + data[-MAX_LOG_BYTES:]
    (out_dir / names["log"]).write_bytes(data)
    files = [names["md"], names["json"], names["log"]] + [pathlib.Path(f).name for f in extra_files]
    (out_dir / names["md"]).write_text(summary_markdown(info, results, budget_seconds, files))
    record = {"info": info, "budget_s": budget_seconds,
              "stages": [{k: v for k, v in dataclasses.asdict(r).items() if k != "log"} for r in results]}
    (out_dir / names["json"]).write_text(json.dumps(record, indent=1) + "\n")
    return files


def default_out_dir():
    return os.environ.get("OUT") or str(ROOT / "benchmarks" / "results")


# --------------------------------------------------------------------------------------------- stages
def run_stage(name, limit, arch, workers, out_dir):
    env = stage_environment(arch)
    if name == "build":
        env["GATEDRNN_CUDA"] = "1"
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
        code, out = run_command(build_command(), limit, env)
        if code == 0:
            probe = "import gatedrnn; print('backend_info', gatedrnn.backend_info())"
            code, info = run_command([sys.executable, "-c", probe], 60, env)
            out += info
            if code == 0 and "'cuda': True" not in info:
                return StageResult(name, "failed", summary="built, but backend_info() reports no CUDA kernels", log=out)
        ninja = "ninja" if shutil.which("ninja") or has_module("ninja") else "no ninja: one file at a time"
        return _status(name, code, out, f"arch {arch}, {ninja}")
    if name == "tests":
        code, out = run_command(test_command(workers), limit, env)
        counts = pytest_counts(out)
        text = ", ".join(f"{n} {w}" for w, n in counts.items()) or "no pytest summary"
        failures = "\n".join(line for line in out.splitlines() if line.startswith(("FAILED", "ERROR")))
        result = _status(name, code, out, text)
        result.details = f"```\n{failures[-8000:]}\n```" if failures else ""
        return result
    if name in ("memcheck", "racecheck"):
        sanitizer = find_compute_sanitizer()
        if sanitizer is None:
            return StageResult(name, "failed", summary="no compute-sanitizer on PATH or in the CUDA toolkit")
        code, out = run_command(sanitizer_command(sanitizer, name), limit, env)
        verdict = re.findall(r"=+ (ERROR SUMMARY: .*|RACECHECK SUMMARY: .*)", out)
        return _status(name, code, out, "; ".join(verdict) or "no sanitizer summary")
    if name == "step-times":
        with tempfile.TemporaryDirectory() as scratch:  # not out_dir: only the promised files go there
            table_path = pathlib.Path(scratch) / "step-times.md"
            code, out = run_command([sys.executable, str(ROOT / ".ci" / "gpu_workloads.py"), "step-times",
                                     str(table_path)], limit, env)
            result = _status(name, code, out, "per-launch times below" if code == 0 else "")
            if table_path.exists():
                result.details = table_path.read_text()
        return result
    if name == "benchmark":
        code, out = run_command([sys.executable, "-m", "benchmarks", "--quick", "--devices", "cuda", "--out",
                                 str(out_dir)], limit, env)
        wrote = re.findall(r"^wrote (.+)$", out, flags=re.M)
        tables = out[out.find("\ncuda:"):] if "\ncuda:" in out else ""
        result = _status(name, code, out, ", ".join(pathlib.Path(w).name for w in wrote) or "no files written")
        result.details = f"```\n{tables.strip()[:20000]}\n```" if tables else ""
        return result
    raise ValueError(name)


def _status(name, code, out, summary):
    status = "passed" if code == 0 else ("timed out" if code is None else "failed")
    if code not in (0, None):
        summary = f"exit {code}; {summary}" if summary else f"exit {code}"
    return StageResult(name, status, summary=summary, log=out)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bash .ci/gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="where the files go (default: $OUT, else benchmarks/results)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole run")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of: " + ",".join(STAGES))
    parser.add_argument("--workers", type=int, default=None, help="pytest-xdist workers (default: 8 if installed)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit; needs no GPU")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    args.stages = [s for s in STAGES if s in stages]  # always in the order above
    if args.budget <= 0:
        parser.error("--budget must be positive")
    args.out = args.out or default_out_dir()
    if args.workers is None:
        args.workers = 8 if has_module("xdist") else 1
    return args


def machine_info(arch):
    import torch

    commit = os.environ.get("GATEDRNN_COMMIT")
    if not commit:
        sys.path.insert(0, str(ROOT))
        from benchmarks.report import commit as read_commit

        commit = read_commit()
    return {"device": torch.cuda.get_device_name(0), "devices": torch.cuda.device_count(), "arch": arch,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.version.split()[0],
            "cpus": os.cpu_count(), "commit": commit,
            "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def check_machine():
    """The arch list of this machine's GPUs; raises CheckUnavailable when it cannot run the check."""
    try:
        import torch
    except ImportError:
        raise CheckUnavailable("torch is not installed") from None
    if torch.version.cuda is None:
        raise CheckUnavailable(f"torch {torch.__version__} is a CPU build; the GPU check needs a CUDA build")
    if not torch.cuda.is_available():
        raise CheckUnavailable("no CUDA GPU is visible (torch.cuda.is_available() is False); this check runs on a "
                               "GPU machine, and CI covers the CPU")
    return arch_list(detect_capabilities(torch))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        print(f"GPU check plan: budget {args.budget:.0f} s, files to {args.out}")
        for stage in args.stages:
            print(f"  {stage:<11} at most {STAGE_LIMITS[stage]} s, skipped when fewer than {STAGE_MINIMUMS[stage]} s "
                  f"are left for it")
        print(f"  tests: {' '.join(test_command(args.workers)[1:])}")
        return 0
    try:
        arch = check_machine()
    except CheckUnavailable as e:
        print(f".ci/gpu: cannot run here: {e}", file=sys.stderr)
        return 2
    info = machine_info(arch)
    stem = (f"{datetime.datetime.now().strftime('%Y-%m-%d_%H%M')}_"
            f"{re.sub(r'[^A-Za-z0-9]+', '-', info['device']).strip('-')}_gpu-check_{info['commit']}")
    print(f".ci/gpu: {info['device']}, torch {info['torch']}, arch {arch}, budget {args.budget:.0f} s", flush=True)
    budget, results = Budget(args.budget), []
    for k, stage in enumerate(args.stages):
        built = all(r.status == "passed" for r in results if r.name == "build")
        limit = budget.limit_for(stage, args.stages[k + 1:])
        if not built:
            result = StageResult(stage, "skipped", summary="the build failed")
        elif limit <= 0:
            result = StageResult(stage, "skipped", summary=f"out of time ({budget.left():.0f} s left)")
        else:
            print(f"[{stage}] running, at most {limit:.0f} s", flush=True)
            start = time.monotonic()
            result = run_stage(stage, limit, arch, args.workers, args.out)
            result.seconds = time.monotonic() - start
        results.append(result)
        print(f"[{stage}] {result.status} in {result.seconds:.1f} s: {result.summary}", flush=True)
        if result.status != "passed" and result.log:
            print(result.log[-3000:], flush=True)
    benchmark_files = []
    for r in results:
        if r.name == "benchmark":
            benchmark_files = [w for w in re.findall(r"^wrote (.+)$", r.log, flags=re.M)]
    files = write_outputs(args.out, stem, info, results, args.budget, benchmark_files)
    print(f".ci/gpu: wrote {', '.join(files)} to {args.out}")
    print(summary_markdown(info, results, args.budget, files).split("\n## ")[0])
    return 0 if all(r.status == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
