"""The pytest-benchmark suite: `pytest benchmarks/` (add --benchmark-group-by=group to compare side by side).

Every standard case on every available device, each implementation a separate benchmark in the case's
group. The agreement check runs first: a case where gatedrnn and torch.nn disagree fails instead of timing.
"""
import pytest
import torch

from benchmarks.cases import standard_cases
from benchmarks.measure import TOLERANCE, implementations, make_input, make_modules, make_step, max_relative_difference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PARAMS = [(device, case, name) for device in DEVICES for case in standard_cases(device)
          for name in implementations(device, case)]


@pytest.mark.parametrize("device,case,name", PARAMS,
                         ids=[f"{d}-{c.slug()}-{n.replace(' ', '-')}" for d, c, n in PARAMS])
def test_rnn(benchmark, device, case, name):
    modules = make_modules(case, device, implementations(device, case))
    x, leaf = make_input(case, device)
    if "gatedrnn" in modules:
        diff = max_relative_difference(modules, x, leaf, case)
        assert diff <= TOLERANCE[case.dtype], f"gatedrnn and torch.nn disagree on {case.label()}: {diff:.3g}"
    step = make_step(case, name, modules[name], x, leaf)
    if device == "cuda":
        def run():
            step()
            torch.cuda.synchronize()
    else:
        run = step
    benchmark.group = f"{device}: {case.label()}"
    benchmark.extra_info.update(implementation=name, gemm_flops=case.gemm_flops(), steps=case.T)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
