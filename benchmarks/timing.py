"""Side-by-side timing of gatedrnn and torch.nn: interleaved repeats, medians, agreement check first."""
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

import gatedrnn


@dataclass(frozen=True)
class Case:
    mode: str  # "LSTM" or "GRU"
    T: int
    B: int
    I: int
    H: int
    training: bool  # forward + backward, else inference (no grad)

    def label(self):
        kind = "train" if self.training else "infer"
        return f"{self.mode} {kind} T={self.T} B={self.B} I={self.I} H={self.H}"


@dataclass
class Result:
    case: Case
    torch_nn_ms: float
    gatedrnn_ms: float
    max_abs_diff: float

    @property
    def speedup(self):
        return self.torch_nn_ms / self.gatedrnn_ms


def _make_pair(case, dtype=torch.float32):
    torch.manual_seed(0)
    reference = getattr(nn, case.mode)(case.I, case.H).to(dtype)
    ours = getattr(gatedrnn, case.mode)(case.I, case.H).to(dtype)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _step_fn(module, x, training):
    if training:
        def step():
            module.zero_grad(set_to_none=True)
            x.grad = None
            out, _ = module(x)
            out.sum().backward()
    else:
        def step():
            with torch.no_grad():
                module(x)
    return step


def check_agreement(reference, ours, x):
    """Largest output difference between the two modules on this input (float32: expect ~1e-5)."""
    with torch.no_grad():
        return (reference(x)[0] - ours(x)[0]).abs().max().item()


def time_case(case, repeats=7, warmup=2, tolerance=1e-3):
    """Times torch.nn and gatedrnn alternately (A B A B ...) so drift and noise hit both alike."""
    reference, ours = _make_pair(case)
    x = torch.randn(case.T, case.B, case.I, requires_grad=case.training)
    diff = check_agreement(reference, ours, x)
    if not diff <= tolerance:
        raise AssertionError(f"{case.label()}: gatedrnn and torch.nn disagree (max |diff| = {diff:.3g}); not timed")
    steps = [_step_fn(reference, x, case.training), _step_fn(ours, x, case.training)]
    samples = [[], []]
    for _ in range(warmup):
        for step in steps:
            step()
    for _ in range(repeats):
        for k, step in enumerate(steps):
            start = time.perf_counter()
            step()
            samples[k].append(time.perf_counter() - start)
    ms = [statistics.median(s) * 1e3 for s in samples]
    return Result(case, ms[0], ms[1], diff)


def format_table(results):
    lines = [f"{'case':<40} {'torch.nn ms':>12} {'gatedrnn ms':>12} {'speed-up':>9} {'max|diff|':>10}"]
    for r in results:
        lines.append(f"{r.case.label():<40} {r.torch_nn_ms:>12.2f} {r.gatedrnn_ms:>12.2f} {r.speedup:>8.2f}x "
                     f"{r.max_abs_diff:>10.1e}")
    return "\n".join(lines)
