"""Reliability: odd but valid layouts, devices, inconsistent packing, long sequences, extreme values,
concurrent threads, and how much training saves."""
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import gatedrnn
from utils import flat_outputs, twins, weighted_sum

T, B, I, H = 7, 3, 5, 4


def _compare(reference, ours, make_args, atol=1e-12, rtol=1e-10):
    """Runs both modules on freshly made arguments; compares outputs and the gradients of every leaf."""
    results = []
    for module in (reference, ours):
        args, leaves = make_args()
        output, states = flat_outputs(module(*args))
        grads = torch.autograd.grad(weighted_sum([output] + states), leaves + list(module.parameters()))
        results.append(([output] + states, grads))
    (expected, expected_grads), (actual, actual_grads) = results
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(actual_grads, expected_grads, atol=atol, rtol=rtol)


def _layouts():
    """(name, function making (args, leaves)) for odd but valid input and state layouts."""
    def base(shape):
        return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape)))

    def transposed_input():
        x = base((B, T, I)).requires_grad_()
        return (x.transpose(0, 1),), [x]

    def expanded_input():
        x = base((1, 1, I)).requires_grad_()
        return (x.expand(T, B, I),), [x]

    def sliced_input():
        x = base((2 * T, B, 2 * I)).requires_grad_()
        return (x[::2, :, 1::2],), [x]

    def transposed_state():
        x = base((T, B, I)).requires_grad_()
        h = base((B, 2, H)).requires_grad_()
        return (x, h.transpose(0, 1)), [x, h]

    def expanded_state():
        x = base((T, B, I)).requires_grad_()
        h = base((2, 1, H)).requires_grad_()
        return (x, h.expand(2, B, H)), [x, h]

    return [("transposed input", transposed_input), ("expanded input", expanded_input),
            ("sliced input", sliced_input), ("transposed hx", transposed_state), ("expanded hx", expanded_state)]


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("name,make", _layouts(), ids=[n for n, _ in _layouts()])
def test_odd_layouts_match_torch_nn(mode, name, make):
    reference, ours = twins(mode, I, H, num_layers=2)

    def make_args():
        args, leaves = make()
        if mode == "LSTM" and len(args) == 2:  # give the LSTM a cell state of the same layout
            args = (args[0], (args[1], args[1] * 0.5))
        return args, leaves

    _compare(reference, ours, make_args)


def test_non_contiguous_weights_match_torch_nn():
    reference, ours = twins("GRU", I, H)
    with torch.no_grad():
        for module in (reference, ours):
            w = module.weight_hh_l0.detach().clone()
            module.weight_hh_l0 = nn.Parameter(w.t().contiguous().t())  # same values, transposed strides
    assert not ours.weight_hh_l0.is_contiguous()

    def make_args():
        x = torch.randn(T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        return (x.requires_grad_(),), [x]

    _compare(reference, ours, make_args)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_input_and_state_on_another_device_are_refused_like_torch_nn(mode):
    """The meta device stands in for a second device on a machine with one."""
    reference, ours = twins(mode, I, H, dtype=torch.float32)
    x = torch.randn(T, B, I, device="meta")
    for module in (reference, ours):
        with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device, found "
                                               "input tensor at meta and parameter tensor at cpu"):
            module(x)
    h = torch.zeros(1, B, H, device="meta")
    hx = (h, torch.zeros(1, B, H)) if mode == "LSTM" else h
    for module in (reference, ours):
        with pytest.raises(RuntimeError, match="Input and hidden tensors are not at the same device, found input "
                                               "tensor at cpu and hidden tensor at meta"):
            module(torch.randn(T, B, I), hx)


def test_cell_state_on_another_device_is_refused():
    with pytest.raises(RuntimeError, match="expected hx on cpu .* but it is on meta"):
        gatedrnn.GRUCell(I, H)(torch.randn(2, I), torch.zeros(2, H, device="meta"))


@pytest.mark.parametrize("batch_sizes,message", [
    ([2, 3, 1], "batch_sizes must be non-increasing"),
    ([3, 2, 2], "batch_sizes sum to 7 but the packed input has 6 rows"),
    ([3, 0, 3], "batch_sizes must be positive"),
])
def test_inconsistent_packed_sequence_is_refused(batch_sizes, message):
    packed = PackedSequence(torch.randn(6, I), torch.tensor(batch_sizes))
    for mode in ("LSTM", "GRU"):
        with pytest.raises(RuntimeError, match=message):
            getattr(gatedrnn, mode)(I, H)(packed)


# ----------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_ten_thousand_steps(mode):
    """10,000 steps: float64 matches torch.nn (outputs and gradients); float32 stays finite."""
    reference, ours = twins(mode, 3, 6)
    x = torch.randn(10_000, 2, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for module in (reference, ours):
        output, states = flat_outputs(module(x))
        grads = torch.autograd.grad(weighted_sum([output] + states), [x] + list(module.parameters()))
        results.append(([output] + states, grads))
    torch.testing.assert_close(results[1], results[0], atol=1e-10, rtol=1e-8)

    ours = ours.float()
    x32 = x.detach().float().mul(10).requires_grad_()
    output, states = flat_outputs(ours(x32))
    output.sum().backward()
    assert torch.isfinite(output).all() and all(torch.isfinite(s).all() for s in states)
    assert torch.isfinite(x32.grad).all() and all(torch.isfinite(p.grad).all() for p in ours.parameters())


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
@pytest.mark.parametrize("where", ["input", "hx"])
def test_extreme_values_propagate_like_torch_nn(mode, value, where):
    reference, ours = twins(mode, I, H, num_layers=2, dtype=torch.float32)
    x = torch.randn(T, B, I)
    h = torch.randn(2, B, H)
    (x if where == "input" else h)[1, 1, 2] = value
    hx = (h, torch.randn(2, B, H)) if mode == "LSTM" else h
    expected, actual = reference(x, hx), ours(x, hx)
    for e, a in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(actual)):
        assert torch.equal(torch.isnan(a), torch.isnan(e))
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4, equal_nan=True)


# ----------------------------------------------------------------------------------------------- threads
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_concurrent_threads_match_serial_runs(mode):
    """Several Python threads run forward and backward on one shared module at once (inference and training
    interleaved, different shapes); each gets what a serial run gives."""
    module = getattr(gatedrnn, mode)(16, 32, num_layers=2, bidirectional=True).double()
    params = list(module.parameters())
    inputs = [torch.randn(5 + 3 * k, 1 + k, 16, dtype=torch.float64) for k in range(6)]

    def work(x, training):
        if not training:
            with torch.no_grad():
                return [module(x)[0]]
        x = x.clone().requires_grad_()
        out = module(x)[0]
        return [out.detach(), *torch.autograd.grad(out.square().sum(), [x] + params)]

    jobs = [(x, k % 2 == 0) for k, x in enumerate(inputs)] * 3
    expected = [work(x, training) for x, training in jobs]
    results = [None] * len(jobs)
    errors = []

    def run(k):
        try:
            results[k] = work(*jobs[k])
        except Exception as error:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------- memory
def _saved_bytes(module, x):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return sum(storages.values()), out


@pytest.mark.parametrize("mode,kwargs", [
    ("LSTM", {}), ("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=8)),
    ("GRU", {}), ("GRU", dict(num_layers=2, bidirectional=True)),
])
@pytest.mark.parametrize("packed", [False, True])
def test_training_saves_no_more_than_torch_nn(mode, kwargs, packed):
    reference, ours = twins(mode, 16, 32, dtype=torch.float32, **kwargs)
    x = torch.randn(20, 8, 16, requires_grad=True)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([20, 18, 15, 15, 9, 5, 2, 1]))
    theirs, _ = _saved_bytes(reference, x)
    mine, _ = _saved_bytes(ours, x)
    assert 0 < mine <= theirs, (mine, theirs)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_inference_saves_nothing(mode):
    module = getattr(gatedrnn, mode)(16, 32)
    with torch.no_grad():
        saved, _ = _saved_bytes(module, torch.randn(20, 8, 16))
    assert saved == 0
    saved, _ = _saved_bytes(module.requires_grad_(False), torch.randn(20, 8, 16))  # nothing needs a gradient
    assert saved == 0
