"""`lengths=`: padded input with one length per batch row (csrc/padded.h).

Oracles: torch.nn on the PackedSequence of the same data (pack_padded_sequence, enforce_sorted=False), and
gatedrnn.reference, which masks every step of the padded batch instead of packing it. The ops must trace
under torch.compile(fullgraph=True), and padded steps must cost no kernel call."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gatedrnn
from gatedrnn import _ops, reference
from test_cpu_tiles import calls_during
from utils import DEVICES, assert_same_results_and_grads, twins

T, B, I, H = 6, 5, 3, 4
LENGTHS = [3, 6, 1, 6, 4]  # unsorted, with a tie, the full length and a single step


def _state_list(state):
    return list(state) if isinstance(state, tuple) else [state]


def _torch_nn_packed(module, x, lengths, hx, batch_first):
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
    output, state = module(packed, hx)
    output, _ = pad_packed_sequence(output, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0])
    return output, _state_list(state)


CASES = [
    # (mode, module kwargs)
    ("LSTM", {}),
    ("LSTM", {"num_layers": 2, "bidirectional": True}),
    ("LSTM", {"proj_size": 2, "bidirectional": True}),
    ("LSTM", {"batch_first": True, "bias": False}),
    ("GRU", {}),
    ("GRU", {"num_layers": 2, "bidirectional": True, "batch_first": True}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("mode,kwargs", CASES, ids=[f"{m}-{'-'.join(k) or 'plain'}" for m, k in CASES])
def test_matches_torch_nn_on_the_packed_sequence(mode, kwargs, dtype, tol, device):
    """Outputs (zero past each length), final states and every gradient equal torch.nn's on the packed
    sequence; hx given, so that the initial state's gradient and reordering are covered too."""
    ref, ours = twins(mode, I, H, dtype=dtype, device=device, **kwargs)
    batch_first = kwargs.get("batch_first", False)
    g = torch.Generator().manual_seed(3)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_()
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    state = kwargs.get("proj_size") or H
    h0 = torch.randn(layers, B, state, generator=g, dtype=dtype).to(device).requires_grad_()
    hx = (h0, torch.randn(layers, B, H, generator=g, dtype=dtype).to(device).requires_grad_()) if mode == "LSTM" \
        else h0
    inputs = [x, *_state_list(hx)]

    expected_out, expected_states = _torch_nn_packed(ref, x, LENGTHS, hx, batch_first)
    output, state = ours(x, hx, lengths=torch.tensor(LENGTHS))
    actual_states = _state_list(state)
    torch.testing.assert_close(output, expected_out, atol=tol, rtol=tol)
    for a, e in zip(actual_states, expected_states):
        torch.testing.assert_close(a, e, atol=tol, rtol=tol)
    steps = torch.arange(T).unsqueeze(1)
    padding = (steps >= torch.tensor(LENGTHS)).to(device)  # [T, B]
    assert (output.transpose(0, 1) if batch_first else output)[padding].abs().max() == 0

    def grads(outputs, params):
        loss = sum(((o * torch.linspace(-1, 1, o.numel(), dtype=dtype, device=device).view_as(o)) ** 2).sum()
                   for o in outputs)
        return torch.autograd.grad(loss, inputs + list(params))

    ours_grads = grads([output, *actual_states], ours.parameters())
    ref_grads = grads([expected_out, *expected_states], ref.parameters())
    for k, (a, e) in enumerate(zip(ours_grads, ref_grads)):
        torch.testing.assert_close(a, e, atol=tol * 10, rtol=tol * 10, msg=lambda m: f"gradient {k}: {m}")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_layer_ops_match_the_masked_reference(mode, reverse):
    """The layer op (which packs) against gatedrnn.reference (which masks every step), float64, forward and
    gradients, lengths as int32 and int64."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()

    gates = 4 if mode == "LSTM" else 3
    x, h0, c0 = rand(T, B, I), rand(B, H), rand(B, H)
    weights = [rand(gates * H, I), rand(gates * H, H), rand(gates * H), rand(gates * H)]
    for dtype in (torch.int64, torch.int32):
        lengths = torch.tensor(LENGTHS, dtype=dtype)
        if mode == "LSTM":
            inputs = [x, h0, c0, *weights]
            ours = _ops.lstm_layer(x, None, h0, c0, *weights, None, reverse, lengths)
            expected = reference.lstm_layer(x, None, h0, c0, *weights, None, reverse, lengths=lengths)
        else:
            inputs = [x, h0, *weights]
            ours = _ops.gru_layer(x, None, h0, *weights, reverse, lengths)
            expected = reference.gru_layer(x, None, h0, *weights, None, reverse, lengths=lengths)
        assert_same_results_and_grads(ours, expected, inputs, g)


def _layer_args(mode, device, requires_grad=True):
    g = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_(requires_grad)

    gates = 4 if mode == "LSTM" else 3
    states = [rand(B, H), rand(B, H)] if mode == "LSTM" else [rand(B, H)]
    return [rand(T, B, I), None, *states, rand(gates * H, I), rand(gates * H, H), rand(gates * H), rand(gates * H)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gradcheck(mode, reverse, device):
    args = _layer_args(mode, device)
    lengths = torch.tensor(LENGTHS)
    if mode == "LSTM":
        fn = lambda *a: _ops.lstm_layer(*a, None, reverse, lengths)  # noqa: E731
    else:
        fn = lambda *a: _ops.gru_layer(*a, reverse, lengths)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_opcheck(mode, device):
    lengths = torch.tensor(LENGTHS)
    for save in (True, False):
        args = _layer_args(mode, device, requires_grad=save)
        if mode == "LSTM":
            op, forward_args = torch.ops.gatedrnn.lstm_forward, (*args, None, True, save, lengths)
        else:
            op, forward_args = torch.ops.gatedrnn.gru_forward, (*args, True, save, lengths)
        torch.library.opcheck(op, forward_args)
    args = _layer_args(mode, device, requires_grad=False)
    if mode == "LSTM":
        x, _, h0, c0, w_ih, w_hh, _, _ = args
        out, hy, cy, gates, cells = torch.ops.gatedrnn.lstm_forward(*args, None, True, True, lengths)
        assert gates.shape == (T * B, 4 * H) and cells.shape == (T * B, H)  # no shape depends on the lengths
        torch.library.opcheck(torch.ops.gatedrnn.lstm_backward,
                              (torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy), x, None, h0, c0,
                               w_ih, w_hh, None, out, gates, cells, True, [True, True, True], lengths))
    else:
        x, _, h0, w_ih, w_hh, _, _ = args
        out, hy, saved = torch.ops.gatedrnn.gru_forward(*args, True, True, lengths)
        assert saved.shape == (T * B, 4 * H)
        torch.library.opcheck(torch.ops.gatedrnn.gru_backward,
                              (torch.randn_like(out), torch.randn_like(hy), x, None, h0, w_ih, w_hh, out, saved,
                               True, [True, False, True], lengths))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_compiles_without_a_graph_break(mode):
    """torch.compile(fullgraph=True) traces a model fed padded input and lengths (fullgraph raises on a
    break), and the compiled model gives eager's outputs and gradients."""
    torch.manual_seed(0)
    rnn = getattr(gatedrnn, mode)(I, H, num_layers=2, bidirectional=True, batch_first=True)
    head = nn.Linear(2 * H, 1)

    def model(x, lengths):
        output, _ = rnn(x, lengths=lengths)
        return head(output).sum(dim=(1, 2))

    x = torch.randn(B, T, I, requires_grad=True)
    lengths = torch.tensor(LENGTHS)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    expected = model(x, lengths)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    actual = compiled(x, lengths)
    (actual_grad,) = torch.autograd.grad(actual.sum(), x)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grad, expected_grad)
    # Other lengths, same shapes: the same graph serves them, and the result follows the new lengths.
    other = torch.tensor([6, 2, 2, 5, 1])
    torch.testing.assert_close(compiled(x, other), model(x, other))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_padded_steps_cost_no_kernel_call(mode):
    """The fused step kernels run once per step of the longest sequence, not per padded step."""
    team = gatedrnn.backend_info()["cpu_team_size"]
    module = getattr(gatedrnn, mode)(I, H)
    x = torch.randn(20, B, I)
    with torch.no_grad():
        calls = calls_during(lambda: module(x, lengths=torch.tensor([3, 1, 2, 3, 3])))
    assert calls[f"{mode.lower()}_forward_step"] == 3 * team


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_double_backward_matches_torch_nn(mode):
    """create_graph=True through a layer with lengths: the differentiable path (the masked reference) gives
    torch.nn's second derivatives on the packed sequence."""
    ref, ours = twins(mode, I, H)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)

    def penalty(output):
        (grad,) = torch.autograd.grad(output.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum(), x)[0]

    expected, _ = _torch_nn_packed(ref, x, LENGTHS, None, False)
    with pytest.warns(UserWarning, match="pure-PyTorch reference"):
        actual = penalty(ours(x, lengths=torch.tensor(LENGTHS))[0])
    torch.testing.assert_close(actual, penalty(expected))


def test_a_batch_of_zero_rows():
    lstm = gatedrnn.LSTM(I, H)
    output, (hy, cy) = lstm(torch.randn(T, 0, I), lengths=torch.tensor([], dtype=torch.int64))
    assert output.shape == (T, 0, H) and hy.shape == (1, 0, H)


@pytest.mark.parametrize("lengths,error,message", [
    ([3, 6, 0, 6, 4], RuntimeError, r"every length must be in \[1, seq_len = 6\], but lengths\[2\] = 0"),
    ([3, 7, 1, 6, 4], RuntimeError, r"lengths\[1\] = 7"),
    ([3, 6, 1, 6], ValueError, r"Expected `len\(lengths\)` to be equal to batch_size, but got 4 \(batch_size=5\)"),
    (torch.ones(5, 1, dtype=torch.int64), ValueError, "1-D int64 or int32"),
    (torch.ones(5), ValueError, "1-D int64 or int32 tensor, got a 1-D torch.float32"),
])
def test_bad_lengths_are_refused_by_name(lengths, error, message):
    lstm = gatedrnn.LSTM(I, H)
    with pytest.raises(error, match=message):
        lstm(torch.randn(T, B, I), lengths=lengths if isinstance(lengths, torch.Tensor) else torch.tensor(lengths))


def test_lengths_need_padded_batched_input():
    gru = gatedrnn.GRU(I, H)
    packed = pack_padded_sequence(torch.randn(T, B, I), torch.tensor(LENGTHS), enforce_sorted=False)
    with pytest.raises(ValueError, match="a PackedSequence carries its own lengths"):
        gru(packed, lengths=torch.tensor(LENGTHS))
    with pytest.raises(ValueError, match="batched"):
        gru(torch.randn(T, I), lengths=torch.tensor([T]))
    # A list works like a tensor, as in pack_padded_sequence.
    torch.testing.assert_close(gru(torch.ones(T, B, I), lengths=LENGTHS)[0],
                               gru(torch.ones(T, B, I), lengths=torch.tensor(LENGTHS))[0])


def test_ops_refuse_bad_lengths_and_states():
    """The ops themselves (torch.ops.gatedrnn.*), which are public: packed input with lengths, a state whose
    batch does not match (which reordering would otherwise cut silently), saved activations of another size."""
    x, _, h0, c0, w_ih, w_hh, b_ih, b_hh = _layer_args("LSTM", "cpu", requires_grad=False)
    op = torch.ops.gatedrnn.lstm_forward
    lengths = torch.tensor(LENGTHS)
    with pytest.raises(RuntimeError, match="packed input .* carries its own lengths"):
        op(x.view(T * B, I), torch.tensor([B] * T), h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, False, lengths)
    with pytest.raises(RuntimeError, match=r"expected hx of 5 rows \(the input's batch size\)"):
        op(x, None, torch.zeros(B + 1, H, dtype=x.dtype), c0, w_ih, w_hh, b_ih, b_hh, None, False, False, lengths)
    out, hy, cy, gates, cells = op(x, None, h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, True, lengths)
    with pytest.raises(RuntimeError, match="saved activations have the wrong size for padded input"):
        torch.ops.gatedrnn.lstm_backward(out, hy, cy, x, None, h0, c0, w_ih, w_hh, None, out, gates[:-1], cells,
                                         False, [True, True, True], lengths)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_padding_is_never_read(mode):
    """What lies past a sequence's length (NaN here) reaches neither the outputs nor any gradient: the ops
    run the packed rows only."""
    module = getattr(gatedrnn, mode)(I, H, bidirectional=True)
    x = torch.randn(T, B, I)
    x[torch.arange(T).unsqueeze(1) >= torch.tensor(LENGTHS)] = float("nan")
    x.requires_grad_()
    output, state = module(x, lengths=torch.tensor(LENGTHS))
    states = list(state) if isinstance(state, tuple) else [state]
    assert all(torch.isfinite(t).all() for t in [output, *states])
    (output.sum() + sum(s.sum() for s in states)).backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in module.parameters())
