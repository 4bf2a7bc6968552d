"""ThreadSanitizer over the CUDA sources' CPU emulation: a race detector for the kernels' shared memory.

csrc/cuda/emulation.h runs a block's threads as CPU threads whose only ordering is the __syncthreads()
barrier, over one shared object per kernel (its shared memory). Built with -fsanitize=thread, any pair of
shared-memory accesses that no barrier separates is reported. .ci/sanitize runs test_cuda_emulated.py under
that build (GATEDRNN_EMULATION_SANITIZER=thread), where any report fails CI. This file proves that the
detector can fail: it removes each __syncthreads() of the CUDA sources in turn (at run time, through
GATEDRNN_EMULATION_SKIP_BARRIER) and expects a reported race on the block's shared memory, after a control run
of the same workload with every barrier in place that must report nothing.

The runs are subprocesses that start with the ThreadSanitizer runtime preloaded, over the emulation's
ThreadSanitizer build (about a minute for the 8 runs, after that build), so they run in .ci/sanitize
(GATEDRNN_EMULATION_SANITIZER=thread), not in the main test command."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

import emulated_cuda

TESTS = pathlib.Path(__file__).resolve().parent
CUDA_SOURCES = sorted((emulated_cuda.ROOT / "csrc" / "cuda").glob("*.cu*"))

pytestmark = pytest.mark.skipif(
    os.environ.get("GATEDRNN_EMULATION_SANITIZER") != "thread" or emulated_cuda.tsan_runtime() is None,
    reason="ThreadSanitizer race tests run in .ci/sanitize (GATEDRNN_EMULATION_SANITIZER=thread, with gcc's libtsan)")

# Every kernel, both matmul paths (FMA: float64; tensor cores: bfloat16), one and several K chunks, every
# rows-per-thread shape, and layer_norm's row kernels (their block reductions): the configurations under which
# each barrier separates some pair of accesses.
WORKLOAD = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import torch
import emulated_cuda
emulated_cuda.load_library("thread")
ops = torch.ops.gatedrnn_emulated
for mode, batch, proj, dtype in [("LSTM", 12, 0, torch.float64), ("LSTM", 3, 20, torch.float64),
                                 ("GRU", 40, 0, torch.float64), ("LSTM", 40, 0, torch.bfloat16),
                                 ("GRU", 3, 0, torch.bfloat16)]:
    args = emulated_cuda.make_args(mode, batch, 40, True, True, proj, dtype)
    emulated_cuda.run_forward_backward(ops, mode, args, False)
for mode, columns in [("LSTM", 9 * 40), ("GRU", 6 * 40)]:
    args = emulated_cuda.make_args(mode, 3, 40, True, True, 0, torch.float64)
    norm = torch.stack([torch.ones(columns, dtype=torch.float64), torch.zeros(columns, dtype=torch.float64)])
    emulated_cuda.run_forward_backward(ops, mode, args, False, layer_norm=norm)
print("workload done")
"""


def barrier_sites():
    """FILE:LINE of every __syncthreads() call in the CUDA sources."""
    sites = []
    for path in CUDA_SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("//", 1)[0]
            if re.search(r"\b__syncthreads\(\)\s*;", code):
                sites.append(f"{path.name}:{number}")
    return sites


def run_workload(skip_barrier=None):
    env = dict(os.environ, LD_PRELOAD=emulated_cuda.tsan_runtime(), TSAN_OPTIONS="halt_on_error=1",
               GATEDRNN_EMULATION_SANITIZER="thread",
               # torch's OpenMP runtime is not instrumented: the sanitizer cannot see its synchronisation and
               # would report races inside the CPU ops. The emulated kernels use no OpenMP.
               OMP_NUM_THREADS="1")
    env.pop("GATEDRNN_EMULATION_SKIP_BARRIER", None)
    if skip_barrier:
        env["GATEDRNN_EMULATION_SKIP_BARRIER"] = skip_barrier
    # sys.executable, not a `python` on PATH: wrapper scripts (pyenv's shims) crash under the preloaded runtime.
    return subprocess.run([sys.executable, "-c", WORKLOAD], env=env, capture_output=True, text=True, timeout=900)


def test_barrier_sites_are_found():
    sites = barrier_sites()
    assert len(sites) >= 7 and all(s.startswith(("step_tile.cuh:", "layer_norm.cu:")) for s in sites), sites


def test_workload_with_every_barrier_reports_nothing():
    result = run_workload()
    assert result.returncode == 0 and "ThreadSanitizer" not in result.stderr, result.stderr[-6000:]
    assert "workload done" in result.stdout


@pytest.mark.parametrize("site", barrier_sites())
def test_a_removed_barrier_is_reported_as_a_race(site):
    result = run_workload(skip_barrier=site)
    assert result.returncode != 0 and "WARNING: ThreadSanitizer: data race" in result.stderr, (
        f"no race reported with the barrier at {site} removed:\n{result.stderr[-6000:]}")
    # The race is on the block's shared memory (the GATEDRNN_TILE_STORAGE object, or a row kernel's reduction
    # array), between two of its threads.
    assert re.search(r"Location is global '[^']*(tile_bytes|shared)'", result.stderr), result.stderr[-6000:]
