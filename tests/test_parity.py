"""gatedrnn.LSTM/GRU against torch.nn over the full feature grid: outputs, final states and gradients."""
import itertools

import pytest
import torch

import gatedrnn
from utils import DEVICES, flat_outputs, make_input, twins, weighted_sum

T, B, I, H, P = 6, 3, 5, 4, 2


def _grid():
    for mode, layers, bidirectional, batch_first, bias, proj, hx_given, packed in itertools.product(
            ["LSTM", "GRU"], [1, 2, 3], [False, True], [False, True], [True, False], [0, P], [False, True],
            [None, "sorted", "unsorted"]):
        if mode == "GRU" and proj:
            continue
        yield mode, layers, bidirectional, batch_first, bias, proj, hx_given, packed


def _ids(case):
    mode, layers, bidirectional, batch_first, bias, proj, hx_given, packed = case
    return (f"{mode}-L{layers}-{'bi' if bidirectional else 'uni'}-{'bf' if batch_first else 'tf'}-"
            f"{'bias' if bias else 'nobias'}-proj{proj}-{'hx' if hx_given else 'nohx'}-{packed or 'dense'}")


def initial_state(mode, layers, bidirectional, proj, dtype, device, seed=3):
    g = torch.Generator().manual_seed(seed)
    d = 2 if bidirectional else 1
    h = torch.randn(layers * d, B, proj or H, generator=g, dtype=dtype).to(device).requires_grad_()
    if mode == "GRU":
        return h, [h]
    c = torch.randn(layers * d, B, H, generator=g, dtype=dtype).to(device).requires_grad_()
    return (h, c), [h, c]


def run_case(module, x, hx, hx_leaves, leaf):
    result = module(x) if hx is None else module(x, hx)
    output, states = flat_outputs(result)
    loss = weighted_sum([output] + states)
    inputs = [leaf] + hx_leaves + list(module.parameters())
    grads = torch.autograd.grad(loss, inputs)
    return [output] + states, grads


def check_case(case, dtype, device, atol, rtol):
    mode, layers, bidirectional, batch_first, bias, proj, hx_given, packed = case
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if proj:
        kwargs["proj_size"] = proj
    reference, ours = twins(mode, I, H, dtype=dtype, device=device, **kwargs)
    hx, hx_leaves = initial_state(mode, layers, bidirectional, proj, dtype, device) if hx_given else (None, [])
    # A fresh input per run: packing is part of the autograd graph, which the first run's backward frees.
    results = []
    for module in (reference, ours):
        x, leaf = make_input(T, B, I, batch_first=batch_first, packed=packed, dtype=dtype, device=device)
        results.append(run_case(module, x, hx, hx_leaves, leaf))
    (expected_out, expected_grads), (actual_out, actual_grads) = results
    names = ["output", "h_n", "c_n"]
    for name, a, e in zip(names, actual_out, expected_out):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    grad_names = ["input"] + [f"hx[{k}]" for k in range(len(hx_leaves))] + [n for n, _ in ours.named_parameters()]
    for name, a, e in zip(grad_names, actual_grads, expected_grads):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("case", list(_grid()), ids=_ids)
def test_matches_torch_nn_float64(case):
    check_case(case, torch.float64, "cpu", atol=1e-12, rtol=1e-10)


# float32: a representative slice of the grid on every device. The tolerances cover float32 GEMMs that
# sum in a different order than torch.nn's (and our own vectorised exp/tanh) over a few steps.
FLOAT32_CASES = [c for c in _grid() if c[1] in (1, 2) and c[4] and c[6]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FLOAT32_CASES, ids=_ids)
def test_matches_torch_nn_float32(case, device):
    check_case(case, torch.float32, device, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_longer_wider_float32(mode, device):
    """A realistic size: T=50, B=16, I=H=64, two bidirectional layers."""
    reference, ours = twins(mode, 64, 64, num_layers=2, bidirectional=True, dtype=torch.float32, device=device)
    x = torch.randn(50, 16, 64, device=device, requires_grad=True)
    out_ref, _ = reference(x)
    out, _ = ours(x)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)
    g_ref = torch.autograd.grad(out_ref.square().sum(), [x] + list(reference.parameters()))
    g = torch.autograd.grad(out.square().sum(), [x] + list(ours.parameters()))
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e, atol=5e-4, rtol=1e-3)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("batched", [True, False])
def test_unbatched_input(mode, batched):
    reference, ours = twins(mode, I, H, num_layers=2)
    x = torch.randn(T, B, I, dtype=torch.float64) if batched else torch.randn(T, I, dtype=torch.float64)
    state_shape = (2, B, H) if batched else (2, H)
    hx = torch.randn(state_shape, dtype=torch.float64)
    hx = (hx, torch.randn(state_shape, dtype=torch.float64)) if mode == "LSTM" else hx
    for args in [(x,), (x, hx)]:
        expected, actual = reference(*args), ours(*args)
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)
        assert actual[0].shape == expected[0].shape


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_matches_reference(mode):
    """The second oracle: gatedrnn.reference through the same orchestration, packed and bidirectional."""
    _, ours = twins(mode, I, H, num_layers=2, bidirectional=True)
    x, _ = make_input(T, B, I, packed="sorted")
    data, batch_sizes = x.data, x.batch_sizes
    states = [torch.randn(4, B, H, dtype=torch.float64) for _ in range(2 if mode == "LSTM" else 1)]
    weights = ours._flat_weights
    kwargs = dict(num_layers=2, bidirectional=True)
    if mode == "LSTM":
        expected = gatedrnn.reference.lstm(data, batch_sizes, *states, weights, **kwargs)
        actual = gatedrnn.functional.lstm(data, batch_sizes, *states, weights, **kwargs)
    else:
        expected = gatedrnn.reference.gru(data, batch_sizes, *states, weights, **kwargs)
        actual = gatedrnn.functional.gru(data, batch_sizes, *states, weights, **kwargs)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 1e-2), (torch.float16, 1.5e-3)])
def test_half_precision_against_float64(mode, dtype, bound, device):
    """bfloat16/float16 storage, float32 compute: within the storage type's resolution of the float64 answer
    (outputs and gradients), and no further from it than torch.nn's own path in that dtype."""
    reference, ours = twins(mode, 16, 16, num_layers=2, dtype=torch.float64)
    x = torch.randn(20, 4, 16, dtype=torch.float64)
    exact, _ = reference(x)
    exact_grad = torch.autograd.grad(reference(x)[0].sum(), reference.weight_hh_l1)[0]
    ours_low = ours.to(device, dtype)
    out, _ = ours_low(x.to(device, dtype))
    assert out.dtype == dtype
    grad = torch.autograd.grad(out.float().sum(), ours_low.weight_hh_l1)[0]
    assert grad.dtype == dtype
    out, grad = out.cpu(), grad.cpu()
    error = (out.double() - exact).abs().max().item()
    torch_error = (reference.to(device, dtype)(x.to(device, dtype))[0].double().cpu() - exact).abs().max().item()
    assert error < bound, error
    assert error <= max(2 * torch_error, bound / 3), (error, torch_error)
    grad_error = (grad.double() - exact_grad).abs().max().item() / exact_grad.abs().max().item()
    assert grad_error < 2 * bound, grad_error


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_dropout(mode):
    """Inter-layer dropout: p=1 zeroes the second layer's input exactly as torch.nn does; in eval mode and
    with p=0 there is none; p between gives a different output in training only."""
    reference, ours = twins(mode, I, H, num_layers=2, dropout=1.0)
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], reference(x)[0], atol=1e-12, rtol=1e-10)
    reference.eval(), ours.eval()
    torch.testing.assert_close(ours(x)[0], reference(x)[0], atol=1e-12, rtol=1e-10)

    _, ours = twins(mode, I, H, num_layers=2, dropout=0.5)
    ours.eval()
    eval_out = ours(x)[0]
    ours.train()
    assert not torch.allclose(ours(x)[0], eval_out)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0, 300.0])
def test_float32_activations_across_ranges(mode, scale):
    """The CPU's own float exp/tanh, from tiny pre-activations (tanh's series branch) to saturation: the
    float32 result stays within float32 rounding of the float64 one."""
    reference, ours = twins(mode, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(scale)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(6, 4, 8, dtype=torch.float64)
    exact, _ = reference(x)
    out, _ = ours.float()(x.float())
    torch.testing.assert_close(out.double(), exact, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_nan_propagates_like_torch_nn(mode):
    reference, ours = twins(mode, I, H, dtype=torch.float32)
    x = torch.randn(T, B, I)
    x[2, 1, 0] = float("nan")
    expected, actual = reference(x)[0], ours(x)[0]
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))


@pytest.mark.parametrize("mode,proj", [("LSTM", 0), ("LSTM", 48), ("GRU", 0)])
@pytest.mark.parametrize("packed", [None, "unsorted"])
def test_wider_multithreaded_matches_torch_nn(mode, proj, packed):
    """Wider than the grid (H=96, B=24, 4 threads on any machine), two bidirectional layers, and packed so
    that rows join and leave mid-sequence."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        kwargs = dict(num_layers=2, bidirectional=True, **({"proj_size": proj} if proj else {}))
        reference, ours = twins(mode, 16, 96, **kwargs)
        lengths = [9, 3, 7, 1, 9, 5] * 4
        results = []
        for module in (reference, ours):
            x, leaf = make_input(9, 24, 16, packed=packed, lengths=lengths if packed else None)
            out, states = flat_outputs(module(x))
            grads = torch.autograd.grad(weighted_sum([out] + states), [leaf] + list(module.parameters()))
            results.append(([out] + states, grads))
        (expected, expected_grads), (actual, actual_grads) = results
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(actual_grads, expected_grads, atol=1e-12, rtol=1e-10)
    finally:
        torch.set_num_threads(threads)
