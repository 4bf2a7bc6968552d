"""Every compiled variant of the CPU path gives torch.nn's answers: each instruction-set version of the tile
kernels (GATEDRNN_CPU_ISA, which also sets the tiles' width), and teams of 1, 2 and 3 threads (uneven shares
of tiles and rows). Both are chosen per process, so each variant runs in a subprocess."""
import json
import os
import subprocess
import sys

import pytest

import gatedrnn

CHECK = r"""
import itertools, json, os, torch, gatedrnn
if "TEST_THREADS" in os.environ:  # more threads than cores is allowed: it tests uneven shares
    torch.set_num_threads(int(os.environ["TEST_THREADS"]))
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
worst = {}
# (I, H, B): hidden sizes past every tile width (16, 8, 4 lanes) and batches past every row block.
for (I, H, B), (dtype, atol) in itertools.product([(7, 24, 12), (3, 5, 1), (19, 33, 7)],
                                                  [(torch.float64, 1e-10), (torch.float32, 1e-4)]):
    for mode, kwargs in [("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=3)),
                         ("GRU", dict(num_layers=2, bidirectional=True))]:
        torch.manual_seed(0)
        ref = getattr(nn, mode)(I, H, **kwargs).to(dtype)
        ours = getattr(gatedrnn, mode)(I, H, **kwargs).to(dtype)
        ours.load_state_dict(ref.state_dict())
        for packed in (False, True):
            results = []
            for module in (ref, ours):
                x = torch.randn(9, B, I, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
                lengths = torch.arange(B, 0, -1).clamp(max=9)
                inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
                out = module(inp)[0]
                out = out.data if packed else out
                grads = torch.autograd.grad(out.square().sum(), [x] + list(module.parameters()))
                results.append([out, *grads])
            err = max(((a - b).abs().max() / (1 + b.abs().max())).item() for a, b in zip(*results))
            worst[f"{mode}{kwargs}-I{I}-H{H}-B{B}-{dtype}-packed={packed}"] = (err, atol)
    # Cells: one step of B <= 16 rows, whose weights the kernels read in place rather than packed.
    for mode in ("LSTMCell", "GRUCell"):
        torch.manual_seed(0)
        ref = getattr(nn, mode)(I, H).to(dtype)
        ours = getattr(gatedrnn, mode)(I, H).to(dtype)
        ours.load_state_dict(ref.state_dict())
        results = []
        for module in (ref, ours):
            g = torch.Generator().manual_seed(1)
            x = torch.randn(B, I, dtype=dtype, generator=g).requires_grad_()
            h, c = torch.randn(B, H, dtype=dtype, generator=g), torch.randn(B, H, dtype=dtype, generator=g)
            out = module(x, (h, c)) if mode == "LSTMCell" else module(x, h)
            out = torch.cat(out, -1) if mode == "LSTMCell" else out
            results.append([out, *torch.autograd.grad(out.square().sum(), [x] + list(module.parameters()))])
        err = max(((a - b).abs().max() / (1 + b.abs().max())).item() for a, b in zip(*results))
        worst[f"{mode}-I{I}-H{H}-B{B}-{dtype}"] = (err, atol)
    # GRU reset_after=False, which torch.nn lacks: against gatedrnn.reference (dense, two layers, both ways).
    torch.manual_seed(0)
    ours = gatedrnn.GRU(I, H, num_layers=2, bidirectional=True, reset_after=False).to(dtype)
    results = []
    for run in (lambda x: ours(x)[0],
                lambda x: gatedrnn.reference.gru(x, None, torch.zeros(4, B, H, dtype=dtype), ours._flat_weights,
                                                 num_layers=2, bidirectional=True, reset_after=False)[0]):
        x = torch.randn(9, B, I, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = run(x)
        results.append([out, *torch.autograd.grad(out.square().sum(), [x] + list(ours.parameters()))])
    err = max(((a - b).abs().max() / (1 + b.abs().max())).item() for a, b in zip(*results))
    worst[f"GRU(reset_after=False)-I{I}-H{H}-B{B}-{dtype}"] = (err, atol)
    # layer_norm, also beyond torch.nn (its row passes are compiled per instruction set too): against the
    # reference in float64 (float32 rounding of two normalisations per product would add up in a float32
    # reference too), with the norms' gains and biases moved off their initial values.
    for mode in ("LSTM", "GRU"):
        torch.manual_seed(0)
        ours = getattr(gatedrnn, mode)(I, H, num_layers=2, bidirectional=True, layer_norm=True).to(dtype)
        names = [n for n, _ in ours.named_parameters()]
        with torch.no_grad():
            for name in names:
                if name.startswith("layer_norm_"):
                    getattr(ours, name).add_(0.5 * torch.randn_like(getattr(ours, name)))
        exact = {n: getattr(ours, n).detach().double().requires_grad_() for n in names}
        norm_names = [n for n in names if n.startswith("layer_norm_")]
        per_direction = 6 if mode == "LSTM" else 4  # gain and bias of each norm
        groups = [norm_names[k:k + per_direction] for k in range(0, len(norm_names), per_direction)]
        norms = [torch.stack([torch.cat([exact[n] for n in g[0::2]]), torch.cat([exact[n] for n in g[1::2]])])
                 for g in groups]
        states = [torch.zeros(4, B, H, dtype=torch.float64)] * (2 if mode == "LSTM" else 1)
        reference = getattr(gatedrnn.reference, mode.lower())
        results = []
        for run, params, x_dtype in (
                (lambda x: ours(x)[0], list(ours.parameters()), dtype),
                (lambda x: reference(x, None, *states, [exact[n] for n in ours._flat_weights_names], num_layers=2,
                                     bidirectional=True, layer_norms=norms)[0], list(exact.values()), torch.float64)):
            x = torch.randn(9, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            x = x.to(x_dtype).requires_grad_()
            out = run(x)
            grads = torch.autograd.grad(out.square().sum(), [x] + params)
            results.append([t.double() for t in (out, *grads)])
        err = max(((a - b).abs().max() / (1 + b.abs().max())).item() for a, b in zip(*results))
        worst[f"{mode}(layer_norm)-I{I}-H{H}-B{B}-{dtype}"] = (err, atol)
print(json.dumps({"info": gatedrnn.backend_info(), "worst": worst}))
"""


def run_variant(env_overrides):
    env = dict(os.environ, **env_overrides)
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


ISA_LEVELS = ["baseline", "avx2", "avx512"]
GEMMS = ["tiles", "aten"]


@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_each_instruction_set_variant(isa):
    report = run_variant({"GATEDRNN_CPU_ISA": isa} if isa != "avx512" else {})
    ran = report["info"]["cpu_isa"]
    # A variant the CPU cannot run is capped to the best one it can; say so instead of passing silently.
    if ISA_LEVELS.index(ran) < ISA_LEVELS.index(isa):
        pytest.skip(f"this CPU cannot run the {isa} variant (ran {ran})")
    assert ran == isa
    for case, (err, atol) in report["worst"].items():
        assert err < atol, (case, err)


USABLE_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.mark.parametrize("threads", sorted({1, 2, 3, USABLE_CPUS + 1}))
def test_each_team_size(threads):
    """Teams of 1, 2 and 3 threads, and one with more threads than this process's CPUs: that team keeps
    libgomp's barrier (csrc/cpu/team.h), the others with more than one thread use gatedrnn's."""
    report = run_variant({"TEST_THREADS": str(threads)})
    assert report["info"]["cpu_team_size"] == threads
    expected = "none" if threads == 1 else "gatedrnn" if threads <= USABLE_CPUS else "openmp"
    assert report["info"]["cpu_team_barrier"] == expected
    for case, (err, atol) in report["worst"].items():
        assert err < atol, (case, err)


@pytest.mark.parametrize("gemm", GEMMS)
def test_each_post_loop_gemm(gemm):
    """The backward's large products on the tiles and on torch.mm (GATEDRNN_CPU_GEMM forces one; by default
    the faster here is taken, and named)."""
    report = run_variant({"GATEDRNN_CPU_GEMM": gemm})
    assert report["info"]["cpu_gemm"] == gemm
    for case, (err, atol) in report["worst"].items():
        assert err < atol, (case, err)


def test_the_default_gemm_is_one_of_them():
    assert gatedrnn.backend_info()["cpu_gemm"] in GEMMS
