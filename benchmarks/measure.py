"""Measuring one case: same-weight modules, agreement first, interleaved timing, memory, GEMM roofline."""
import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import gatedrnn

from . import onnx_peer, variants

# Largest output difference (relative to the output's scale) that still counts as agreement, by dtype.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass
class Timing:
    median_ms: float
    min_ms: float


@dataclass
class Result:
    case: object
    device: str
    timings: dict = field(default_factory=dict)  # implementation name -> Timing
    memory_bytes: dict = field(default_factory=dict)  # implementation name -> saved/peak bytes (training)
    max_rel_diff: float = 0.0
    error: str = ""  # non-empty: the case was not timed, and why

    def speedup(self, baseline=None):
        baseline = baseline or self.case.baseline
        if self.error or "gatedrnn" not in self.timings or baseline not in self.timings:
            return None
        return self.timings[baseline].median_ms / self.timings["gatedrnn"].median_ms


def implementations(device, case=None):
    """What is compared on a device: gatedrnn (where it has kernels) and torch.nn, and on CUDA also torch.nn
    with cuDNN disabled (ATen's own RNN kernels); in the CPU inference cases it applies to, also ONNX Runtime
    (onnx_peer.py) where it is installed."""
    names = []
    if gatedrnn.backend_info()[device]:
        names.append("gatedrnn")
    if case is not None and case.variant:
        return names + [variants.LOOP] + ([variants.PLAIN] if names else [])
    names.append("torch.nn")
    if device == "cuda":
        names.append("torch.nn no-cuDNN")
    if case is not None and onnx_peer.applies(case, device):
        names.append(onnx_peer.NAME)
    return names


def _cudnn_disabled(name):
    return name == "torch.nn no-cuDNN"


def _cudnn_flags(name):
    """cuDNN on or off for this implementation, and never TF32: cuDNN's float32 RNNs may use it by default,
    gatedrnn's per-step kernels never do, so float32 is compared (and timed) as IEEE float32 on both sides."""
    return torch.backends.cudnn.flags(enabled=not _cudnn_disabled(name), allow_tf32=False)


class CellSteps(nn.Module):
    """A cell case's model: `cell` called once per step of time-major input, its state carried, as a decoder
    calls it. Returns (the steps' h stacked,), like an RNN layer's output."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        state, outputs = None, []
        for step in x:
            state = self.cell(step, state)
            outputs.append(state[0] if isinstance(state, tuple) else state)
        return (torch.stack(outputs),)


def make_modules(case, device, names):
    torch.manual_seed(0)
    if case.cell:
        reference = getattr(nn, case.name)(case.I, case.H).to(device=device, dtype=case.dtype)
        ours = getattr(gatedrnn, case.name)(case.I, case.H).to(device=device, dtype=case.dtype)
        ours.load_state_dict(reference.state_dict())
        return {name: CellSteps(ours if name == "gatedrnn" else reference) for name in names}
    kwargs = dict(num_layers=case.layers, bidirectional=case.bidirectional)
    reference = getattr(nn, case.mode)(case.I, case.H, **kwargs).to(device=device, dtype=case.dtype)
    modules = {}
    for name in names:
        if name in ("gatedrnn", variants.PLAIN):
            variant = variants.gatedrnn_kwargs(case) if name == "gatedrnn" else {}
            ours = getattr(gatedrnn, case.mode)(case.I, case.H, **kwargs, **variant).to(device=device,
                                                                                         dtype=case.dtype)
            # torch.nn's parameters; a variant's own (layer_norm's norms) keep their initialisation, as the loop's do
            missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
            assert not unexpected and all(key.startswith("layer_norm_") for key in missing), (missing, unexpected)
            modules[name] = ours
        elif name == variants.LOOP:
            modules[name] = variants.CellLoop(case, reference)
        elif name == onnx_peer.NAME:
            modules[name] = onnx_peer.OnnxRuntimeModule(reference, make_input(case, device)[0])
        else:
            modules[name] = reference
    return modules


def make_input(case, device):
    """The module input (a dense tensor or a PackedSequence) and the leaf tensor that gets the gradient."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.T, case.B, case.I, generator=g).to(device=device, dtype=case.dtype)
    if not case.packed:
        return x.requires_grad_(case.training), x
    packed = pack_padded_sequence(x, torch.tensor(case.lengths()), enforce_sorted=False)
    data = packed.data.detach().requires_grad_(case.training)
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), data


def _output_tensor(result):
    output = result[0]
    return output.data if isinstance(output, PackedSequence) else output


def make_step(case, name, module, x, leaf):
    """One timed call: inference under no_grad, or forward + backward of the output's sum. cuDNN's flags are
    set on CUDA only: entering torch.backends.cudnn.flags costs about 6 us a call, which at B=1 on the CPU
    would be timed as part of both sides."""
    on_cuda = leaf.device.type == "cuda"

    def run():
        with _cudnn_flags(name) if on_cuda else contextlib.nullcontext():
            if case.training:
                module.zero_grad(set_to_none=True)
                leaf.grad = None
                _output_tensor(module(x)).sum().backward()
            else:
                with torch.no_grad():
                    module(x)

    return run


def max_relative_difference(modules, x, leaf, case):
    """Largest |difference| between each implementation's output (and, when training, input gradient) and the
    baseline's (torch.nn, or for a variant its cell loop), over the baseline's max |value|. Every module runs
    from the same seed, so that a variant's random draws are the same on both sides; gatedrnn's plain layer
    is not compared (it computes another function)."""
    answers = {}
    for name, module in modules.items():
        if name == variants.PLAIN:
            continue
        torch.manual_seed(0)
        with _cudnn_flags(name), torch.set_grad_enabled(case.training):
            output = _output_tensor(module(x))
            values = [output.detach().double()]  # compared in float64, so as not to add rounding of its own
            if case.training:
                values.append(torch.autograd.grad(output.square().sum(), leaf)[0].double())
            answers[name] = values
    worst = 0.0
    for values in answers.values():
        for value, reference in zip(values, answers[case.baseline]):
            scale = reference.abs().max().item() or 1.0
            worst = max(worst, (value - reference).abs().max().item() / scale)
    return worst


def saved_bytes(step):
    """Bytes of the distinct storages autograd saves for backward during one training call (CPU)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def peak_bytes(step, device):
    """Peak CUDA memory allocated during one training call, above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps, device, repeats, warmup):
    """Runs the steps A B C A B C ... so that drift and noise on a shared machine hit all of them alike."""
    samples = {name: [] for name in steps}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing(statistics.median(s), min(s)) for name, s in samples.items()}


def check_dtype(case):
    """The dtype a case's implementations are compared in: the case's own, except for a variant (a Python loop
    against gatedrnn), compared in float64. Both sides compute the same function, but over 100 steps their
    float32 rounding drifts apart by more than TOLERANCE where the recurrence amplifies it: the layer_norm LSTM
    at T=100 B=64 I=H=256 is 0.35% (the loop) and 0.14% (gatedrnn) off its float64 answer, while the two agree
    to 2e-12 in float64."""
    return torch.float64 if case.variant else case.dtype


def measure(case, device, repeats, warmup):
    names = implementations(device, case)
    result = Result(case, device)
    modules = make_modules(case, device, names)
    x, leaf = make_input(case, device)
    if "gatedrnn" in modules:
        dtype = check_dtype(case)
        if dtype == case.dtype:
            result.max_rel_diff = max_relative_difference(modules, x, leaf, case)
        else:  # dense input (variant cases): copies in the check's dtype
            wide = {name: copy.deepcopy(module).to(dtype) for name, module in modules.items()}
            wide_x = x.detach().to(dtype).requires_grad_(case.training)
            result.max_rel_diff = max_relative_difference(wide, wide_x, wide_x, case)
        if not result.max_rel_diff <= TOLERANCE[dtype]:
            result.error = (f"an implementation disagrees with torch.nn: max |diff| / max |output| = "
                            f"{result.max_rel_diff:.3g} > {TOLERANCE[dtype]:g} ({str(dtype)[6:]}); not timed")
            return result
    steps = {name: make_step(case, name, module, x, leaf) for name, module in modules.items()}
    if case.training:
        for name, step in steps.items():
            result.memory_bytes[name] = peak_bytes(step, device) if device == "cuda" else saved_bytes(step)
    result.timings = time_interleaved(steps, device, repeats, warmup)
    return result


def _best_gflops(product, n, device, repeats):
    for _ in range(2):
        product()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        product()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def _onednn_linear(a, b):
    """a @ b.T through oneDNN as torch ships it (the registered mkldnn ops, weight prepacked once), or None
    where this torch has no such op for the dtype."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(b, a.size(0))
        linear = torch.ops.mkldnn._linear_pointwise
        linear(a, packed, None, "none", [], "")
        return lambda: linear(a, packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def gemm_rates(device, dtype, repeats=7):
    """What this device's GEMMs achieve, measured in the same run: {library: GFLOP/s}, the best of several
    large square products (a roofline is a ceiling). On the CPU both libraries torch ships are measured,
    MKL (torch.mm) and oneDNN, since which is faster depends on the CPU (MKL runs its generic path on AMD)."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    if device != "cpu":
        return {"cuBLAS": _best_gflops(lambda: torch.mm(a, b, out=c), n, device, repeats)}
    # torch.mm is MKL for float32/float64 where torch has MKL (bfloat16 goes through oneDNN there too).
    mkl = torch.backends.mkl.is_available() and dtype in (torch.float32, torch.float64)
    rates = {"MKL" if mkl else "torch.mm": _best_gflops(lambda: torch.mm(a, b, out=c), n, device, repeats)}
    onednn = _onednn_linear(a, b)
    if onednn is not None:
        rates["oneDNN"] = _best_gflops(onednn, n, device, repeats)
    return rates

