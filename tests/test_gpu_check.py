"""The GPU check (.ci/gpu, .ci/gpu_check.py, .ci/gpu_workloads.py), dry-run on the CPU: a lent GPU gives one
session 15 minutes, so every part that needs no GPU is proven here first. The architecture detection and its
fallback, the time budget, the summary and its file limits, the argument handling, the clear exit where no
GPU is visible, the pytest selection, and the workloads themselves (on the CPU)."""
import importlib.util
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / ".ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")


# ------------------------------------------------------------------------------------------ architecture
def test_arch_list_is_each_distinct_capability_ascending():
    assert gpu_check.arch_list([(9, 0)]) == "9.0"
    assert gpu_check.arch_list([(8, 6), (8, 0), (8, 6)]) == "8.0;8.6"


@pytest.mark.parametrize("capabilities,message", [([(7, 5)], "7.5 is older than the 8.0"),
                                                  ([], "no GPU capability could be read")])
def test_arch_list_refuses_what_the_kernels_cannot_run_on(capabilities, message):
    with pytest.raises(gpu_check.CheckUnavailable, match=message):
        gpu_check.arch_list(capabilities)


def test_nvidia_smi_output_is_parsed():
    assert gpu_check.parse_nvidia_smi_capabilities("9.0\n9.0\n") == [(9, 0), (9, 0)]
    assert gpu_check.parse_nvidia_smi_capabilities("compute_cap\n 8.6 \n[N/A]\n") == [(8, 6)]


def _fake_torch(count=None, error=None):
    def device_count():
        if error:
            raise error
        return count

    cuda = types.SimpleNamespace(device_count=device_count, get_device_capability=lambda i: (9, 0))
    return types.SimpleNamespace(cuda=cuda)


def _fake_run(stdout="", returncode=0, error=None):
    def run(cmd, **kwargs):
        assert cmd[0] == "nvidia-smi"
        if error:
            raise error
        return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr="")

    return run


def test_capabilities_come_from_torch_first():
    assert gpu_check.detect_capabilities(_fake_torch(count=2), run=_fake_run(error=AssertionError)) == [(9, 0)] * 2


@pytest.mark.parametrize("torch_module", [_fake_torch(count=0), _fake_torch(error=RuntimeError("driver"))],
                         ids=["no-device", "broken-runtime"])
def test_capabilities_fall_back_to_nvidia_smi(torch_module):
    assert gpu_check.detect_capabilities(torch_module, run=_fake_run("8.0\n")) == [(8, 0)]


def test_no_capability_at_all_when_nvidia_smi_is_missing_or_fails():
    assert gpu_check.detect_capabilities(_fake_torch(count=0), run=_fake_run(error=FileNotFoundError())) == []
    assert gpu_check.detect_capabilities(_fake_torch(count=0), run=_fake_run("", returncode=9)) == []


# ---------------------------------------------------------------------------------------------- budget
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_budget_leaves_the_later_stages_their_minimum():
    clock = FakeClock()
    budget = gpu_check.Budget(400, clock)
    later = list(gpu_check.STAGES[1:])
    reserve = sum(gpu_check.STAGE_MINIMUMS[s] for s in later)
    assert budget.limit_for("build", later) == min(gpu_check.STAGE_LIMITS["build"], 400 - reserve)
    clock.now = 390  # 10 s left: below any stage's minimum
    assert budget.limit_for("benchmark", []) == 0
    clock.now = 300  # 100 s left, the benchmark's 45 s reserved
    assert budget.limit_for("step-times", ["benchmark"]) == 55


def test_stage_limits_fit_the_seven_minutes_the_issue_allows():
    assert gpu_check.DEFAULT_BUDGET <= 7 * 60 - 15  # start-up and the summary need a few seconds too
    assert sum(gpu_check.STAGE_MINIMUMS.values()) < gpu_check.DEFAULT_BUDGET
    assert set(gpu_check.STAGE_LIMITS) == set(gpu_check.STAGE_MINIMUMS) == set(gpu_check.STAGES)


def test_run_command_kills_the_whole_process_group_at_its_limit():
    grandchild = ("import subprocess, sys, time; "
                  "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    code, out = gpu_check.run_command([sys.executable, "-c", grandchild], 1.5)
    assert code is None and "killed after" in out  # returned: no grandchild kept the pipe open


# --------------------------------------------------------------------------------------- whole run, faked
INFO = {"device": "NVIDIA Fake GPU", "arch": "9.0", "torch": "2.11.0", "torch_cuda": "13.0", "python": "3.12",
        "commit": "abc1234", "when": "2026-11-30 12:00 UTC"}


def _fake_run_stage(durations, clock, failing=(), log_bytes=100, kill_seconds=0):
    """Stages that take durations[name] seconds (1 by default), cut at their limit; killing one that ran
    past its limit takes kill_seconds more."""

    def run_stage(name, limit, arch, workers, out_dir):
        seconds = min(durations.get(name, 1), limit)
        clock.now += seconds + (kill_seconds if seconds >= limit else 0)
        status = "failed" if name in failing else ("timed out" if seconds >= limit else "passed")
        log = "x" * log_bytes
        if name == "benchmark" and status == "passed":
            for suffix in ("json", "png"):
                path = pathlib.Path(out_dir) / f"bench.{suffix}"
                path.write_text("{}")
                log += f"\nwrote {path}\n"
        return gpu_check.StageResult(name, status, summary=f"{name} done", log=log)

    return run_stage


def _run_main(monkeypatch, tmp_path, durations, failing=(), log_bytes=100, kill_seconds=0, argv=()):
    clock = FakeClock()
    monkeypatch.setattr(gpu_check.time, "monotonic", clock)
    monkeypatch.setattr(gpu_check, "check_machine", lambda: "9.0")
    monkeypatch.setattr(gpu_check, "machine_info", lambda arch: dict(INFO))
    monkeypatch.setattr(gpu_check, "run_stage", _fake_run_stage(durations, clock, failing, log_bytes, kill_seconds))
    code = gpu_check.main(["--out", str(tmp_path), *argv])
    return code, clock


def _summary(tmp_path):
    return next(tmp_path.glob("*_gpu-check_*.md")).read_text()


def test_a_passing_run_writes_at_most_eight_flat_files_under_the_limit(monkeypatch, tmp_path):
    code, clock = _run_main(monkeypatch, tmp_path, {}, log_bytes=20 << 20)  # logs beyond the cap
    assert code == 0
    files = list(tmp_path.rglob("*"))
    assert 0 < len(files) <= 8 and all(f.parent == tmp_path and f.is_file() for f in files), files
    assert all(f.stat().st_size <= 16 << 20 for f in files)
    assert sorted(f.suffix for f in files) == [".json", ".json", ".log", ".md", ".png"]
    summary = _summary(tmp_path)
    for stage in gpu_check.STAGES:
        assert f"| {stage} | passed |" in summary
    assert "NVIDIA Fake GPU" in summary and "abc1234" in summary and "bench.png" in summary


def test_a_slow_build_shortens_the_later_stages_and_skips_what_no_longer_fits(monkeypatch, tmp_path):
    # 300 s budget: the build takes 150, the tests run into their shortened limit (50 s, the later stages'
    # minimums reserved) and their kill takes 30 s more; the sanitizers no longer fit, while the last two do.
    code, clock = _run_main(monkeypatch, tmp_path, {"build": 150, "tests": 1000}, kill_seconds=30,
                            argv=["--budget", "300"])
    assert code == 1
    summary = _summary(tmp_path)
    assert "| build | passed | 150.0 |" in summary or "| build | passed |" in summary
    assert "| tests | timed out |" in summary
    assert "| memcheck | skipped |" in summary and "| racecheck | skipped |" in summary
    assert "| step-times | passed |" in summary and "| benchmark | passed |" in summary
    assert clock.now <= 300 + 30


def test_a_failed_build_skips_everything_after_it(monkeypatch, tmp_path):
    code, _ = _run_main(monkeypatch, tmp_path, {}, failing=("build",))
    assert code == 1
    summary = _summary(tmp_path)
    assert "| build | failed |" in summary
    assert summary.count("the build failed") == len(gpu_check.STAGES) - 1


def test_a_failed_stage_fails_the_run_and_the_rest_still_runs(monkeypatch, tmp_path):
    code, _ = _run_main(monkeypatch, tmp_path, {}, failing=("memcheck",))
    assert code == 1
    summary = _summary(tmp_path)
    assert "| memcheck | failed |" in summary and "| benchmark | passed |" in summary


def test_out_defaults_to_the_out_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args([]).out == str(tmp_path)
    monkeypatch.delenv("OUT")
    assert gpu_check.parse_args([]).out == str(ROOT / "benchmarks" / "results")


def test_stages_run_in_their_fixed_order_whatever_order_they_are_named_in():
    assert gpu_check.parse_args(["--stages", "benchmark,build"]).stages == ["build", "benchmark"]


# ---------------------------------------------------------------------------------------- the command
def _gpu(*args):
    return subprocess.run(["bash", str(ROOT / ".ci" / "gpu"), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: .ci/gpu would run for real")
def test_without_a_gpu_the_command_says_so_in_one_line():
    result = _gpu("--out", "/nonexistent/never-written")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [
        ".ci/gpu: cannot run here: no CUDA GPU is visible (torch.cuda.is_available() is False); this check runs "
        "on a GPU machine, and CI covers the CPU"]


@pytest.mark.parametrize("args,message", [(["--stages", "bogus"], "unknown stage 'bogus'"),
                                          (["--budget", "0"], "--budget must be positive"),
                                          (["--budget", "soon"], "invalid float value")])
def test_bad_arguments_get_a_usage_error_not_a_traceback(args, message):
    result = _gpu(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_dry_run_prints_the_plan_without_a_gpu():
    result = _gpu("--dry-run", "--stages", "tests,benchmark")
    assert result.returncode == 0, result.stderr
    assert "tests" in result.stdout and "benchmark" in result.stdout and "build " not in result.stdout


def test_the_test_stage_collects_the_gpu_suite_and_only_the_cuda_variants_of_the_others():
    cmd = gpu_check.test_command(workers=1)
    collected = subprocess.run([sys.executable, *cmd[1:], "--collect-only"], cwd=ROOT, capture_output=True,
                               text=True, timeout=300).stdout.splitlines()
    ids = [line for line in collected if "::" in line]
    gpu_only = [i for i in ids if i.startswith("tests/test_cuda.py::")]
    variants = [i for i in ids if not i.startswith("tests/test_cuda.py::")]
    assert len(gpu_only) >= 20 and len(variants) >= 100, (len(gpu_only), len(variants))
    assert all("cuda" in i.split("::", 1)[1] for i in variants), [i for i in variants if "cuda" not in i][:5]
    assert {i.split("::")[0] for i in variants} == {f"tests/{s}" for s in gpu_check.CUDA_VARIANT_SUITES}


def test_pytest_summary_lines_are_counted():
    out = "....\nFAILED tests/x.py::t - boom\n3 failed, 120 passed, 4 skipped, 1000 deselected in 88.1s\n"
    assert gpu_check.pytest_counts(out) == {"failed": 3, "passed": 120, "skipped": 4, "deselected": 1000}
    assert gpu_check.pytest_counts("no summary") == {}


# ------------------------------------------------------------------------------------------ workloads
def test_the_sanitizer_workload_runs_every_op_on_the_cpu():
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu_workloads.py"), "smoke", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "every op ran" in result.stdout, result.stderr[-3000:]


def test_the_step_time_workload_runs_and_writes_its_table(tmp_path):
    table = tmp_path / "steps.md"
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu_workloads.py"), "step-times", str(table),
                             "--device", "cpu", "--tiny"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert table.read_text().startswith("| case | dtype | kernel |")


def test_step_kernel_times_are_read_from_profiler_events():
    workloads = _load("gpu_workloads")
    name = ("void gatedrnn::cuda::(anonymous namespace)::lstm_forward_step<float, 4>"
            "(gatedrnn::cuda::(anonymous namespace)::LstmForwardStep<float>)")
    events = [types.SimpleNamespace(key=name, count=100, device_time_total=500.0),
              types.SimpleNamespace(key="ampere_sgemm_128x64_tn", count=1, device_time_total=80.0)]
    prof = types.SimpleNamespace(key_averages=lambda: events)
    assert workloads.kernel_times(prof) == {"lstm_forward_step<float, 4>": (100, 500.0)}


def test_every_step_kernel_has_its_product_size():
    """step-times computes each kernel's GFLOP/s from the gates its product covers: every step kernel that
    .ci/kernel_resources.py checks must have that count."""
    assert set(_load("gpu_workloads").KERNEL_GATES) == set(_load("kernel_resources").KERNELS)
