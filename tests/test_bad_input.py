"""Bad input: every construction and call torch.nn rejects is rejected the same way (type and message);
what only the raw ops can be given is rejected with a message naming the problem."""
import re

import pytest
import torch
from torch import nn

import gatedrnn
from utils import DEVICES

CONSTRUCTOR_CASES = [
    ("LSTM", (4, 3), dict(dropout=-0.1)),
    ("LSTM", (4, 3), dict(dropout=1.5)),
    ("GRU", (4, 3), dict(dropout=True)),
    ("GRU", (4, 3), dict(dropout="0.1")),
    ("LSTM", (4, 3), dict(bias=1)),
    ("GRU", (4, 3), dict(batch_first=None)),
    ("LSTM", (4.0, 3), {}),
    ("LSTM", (0, 3), {}),
    ("GRU", (4, "3"), {}),
    ("GRU", (4, 0), {}),
    ("LSTM", (4, 3), dict(num_layers=0)),
    ("LSTM", (4, 3), dict(proj_size=-1)),
    ("LSTM", (4, 3), dict(proj_size=3)),
    ("GRU", (4, 3), dict(proj_size=1)),
]


def same_error(make_reference, make_ours):
    with pytest.raises(Exception) as expected:
        make_reference()
    with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
        make_ours()


@pytest.mark.parametrize("mode,args,kwargs", CONSTRUCTOR_CASES)
def test_constructor_errors_match_torch_nn(mode, args, kwargs):
    same_error(lambda: getattr(nn, mode)(*args, **kwargs), lambda: getattr(gatedrnn, mode)(*args, **kwargs))


def test_dropout_warning_matches_torch_nn():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        gatedrnn.GRU(4, 3, dropout=0.5)


def _lstm_hx(layers, batch, hidden, cell=None):
    return (torch.zeros(layers, batch, hidden), torch.zeros(layers, batch, cell or hidden))


FORWARD_CASES = [
    # (mode, module kwargs, input, hx)
    ("LSTM", {}, torch.randn(5), None),
    ("GRU", {}, torch.randn(2, 3, 4, 5), None),
    ("LSTM", {}, torch.randn(5, 2, 7), None),
    ("GRU", {}, torch.randn(5, 2, 7), None),
    ("LSTM", {}, torch.randn(5, 2, 4, dtype=torch.float64), None),
    ("GRU", {}, torch.randint(0, 3, (5, 2, 4)), None),
    ("LSTM", {}, torch.randn(5, 2, 4), _lstm_hx(2, 2, 3)),
    ("LSTM", {}, torch.randn(5, 2, 4), _lstm_hx(1, 3, 3)),
    ("LSTM", {}, torch.randn(5, 2, 4), _lstm_hx(1, 2, 4)),
    ("LSTM", {}, torch.randn(5, 2, 4), _lstm_hx(1, 2, 3, cell=2)),
    ("LSTM", dict(proj_size=2), torch.randn(5, 2, 4), _lstm_hx(1, 2, 3)),
    ("LSTM", {}, torch.randn(5, 2, 4), (torch.zeros(2, 3), torch.zeros(2, 3))),
    ("LSTM", {}, torch.randn(5, 4), _lstm_hx(1, 1, 3)),
    ("GRU", {}, torch.randn(5, 2, 4), torch.zeros(2, 2, 3)),
    ("GRU", dict(bidirectional=True), torch.randn(5, 2, 4), torch.zeros(1, 2, 3)),
    ("GRU", dict(batch_first=True), torch.randn(5, 2, 4), torch.zeros(1, 2, 3)),
    ("GRU", {}, torch.randn(5, 2, 4), torch.zeros(2, 3)),
    ("GRU", {}, torch.randn(5, 4), torch.zeros(1, 1, 3)),
    ("GRU", {}, torch.randn(0, 2, 4), None),
    ("LSTM", dict(batch_first=True), torch.randn(2, 0, 4), None),
]


@pytest.mark.parametrize("case", range(len(FORWARD_CASES)))
def test_forward_errors_match_torch_nn(case):
    mode, kwargs, x, hx = FORWARD_CASES[case]
    reference = getattr(nn, mode)(4, 3, **kwargs)
    ours = getattr(gatedrnn, mode)(4, 3, **kwargs)
    same_error(lambda: reference(x, hx), lambda: ours(x, hx))


CELL_CASES = [
    ("LSTMCell", torch.randn(2, 3, 4), None),
    ("LSTMCell", torch.randn(2, 4), (torch.zeros(2, 3), torch.zeros(2, 3, 1))),
    ("LSTMCell", torch.randn(2, 5), None),
    ("LSTMCell", torch.randn(2, 4), (torch.zeros(3, 3), torch.zeros(2, 3))),
    ("LSTMCell", torch.randn(2, 4), (torch.zeros(2, 3), torch.zeros(2, 2))),
    ("GRUCell", torch.randn(2, 3, 4), None),
    ("GRUCell", torch.randn(2, 4), torch.zeros(2, 3, 1)),
    ("GRUCell", torch.randn(2, 5), None),
    ("GRUCell", torch.randn(2, 4), torch.zeros(3, 3)),
    ("GRUCell", torch.randn(2, 4), torch.zeros(2, 2)),
]


@pytest.mark.parametrize("case", range(len(CELL_CASES)))
def test_cell_errors_match_torch_nn(case):
    mode, x, hx = CELL_CASES[case]
    reference, ours = getattr(nn, mode)(4, 3), getattr(gatedrnn, mode)(4, 3)
    same_error(lambda: reference(x, hx), lambda: ours(x, hx))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_hx_dtype_mismatch_is_named(mode):
    module = getattr(gatedrnn, mode)(4, 3)
    h = torch.zeros(1, 2, 3, dtype=torch.float64)
    hx = (h, torch.zeros(1, 2, 3)) if mode == "LSTM" else h
    with pytest.raises(RuntimeError, match="expected hx to have dtype Float"):
        module(torch.randn(5, 2, 4), hx)


def _op_args(**overrides):
    args = dict(input=torch.randn(4, 3), batch_sizes=torch.tensor([2, 1, 1]), hx=torch.zeros(2, 3),
                weight_ih=torch.randn(9, 3), weight_hh=torch.randn(9, 3), bias_ih=None, bias_hh=None,
                reverse=False, save_for_backward=False)
    args.update(overrides)
    return args


OP_CASES = [
    (dict(batch_sizes=torch.tensor([1, 2, 1])), "batch_sizes must be non-increasing"),
    (dict(batch_sizes=torch.tensor([2, 1, 0, 1])), "batch_sizes must be positive"),
    (dict(batch_sizes=torch.tensor([2, 1])), "batch_sizes sum to 3 but the packed input has 4 rows"),
    (dict(batch_sizes=torch.tensor([2.0, 1.0, 1.0])), "batch_sizes must be a 1-D int64 CPU tensor"),
    (dict(batch_sizes=torch.tensor([[2, 1, 1]])), "batch_sizes must be a 1-D int64 CPU tensor"),
    (dict(input=torch.randn(4, 3, 3)), "packed input must be 2-D"),
    (dict(batch_sizes=None), "dense input must be 3-D"),
    (dict(weight_ih=torch.randn(8, 3)), "weight_ih must have 3 \\* hidden_size rows"),
    (dict(weight_hh=torch.randn(9, 4)), "expected weight_hh of size \\[9, 3\\]"),
    (dict(hx=torch.zeros(3, 3)), "expected hx of size \\[2, 3\\]"),
    (dict(bias_ih=torch.zeros(9)), "bias_ih and bias_hh must be given together"),
    (dict(bias_ih=torch.zeros(8), bias_hh=torch.zeros(8)), "expected bias_ih of size \\[9\\]"),
    (dict(weight_ih=torch.randn(9, 3, dtype=torch.float64)), "expected weight_ih to have dtype Float"),
    (dict(input=torch.ones(4, 3, dtype=torch.int64)), "expected a floating point input"),
    (dict(input=torch.randn(4, 3, dtype=torch.complex64)), "expected a floating point input"),
]


@pytest.mark.parametrize("overrides,message", OP_CASES)
def test_raw_op_rejects_bad_arguments(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.gatedrnn.gru_forward(**_op_args(**overrides))


def test_raw_lstm_op_checks_cell_state_and_projection():
    x, h, c = torch.randn(5, 2, 3), torch.zeros(2, 2), torch.zeros(2, 4)
    w_ih, w_hh, w_hr = torch.randn(16, 3), torch.randn(16, 2), torch.randn(2, 4)
    op = torch.ops.gatedrnn.lstm_forward
    with pytest.raises(RuntimeError, match="expected cx of size \\[2, 4\\]"):
        op(x, None, h, torch.zeros(2, 3), w_ih, w_hh, None, None, w_hr, False, False)
    with pytest.raises(RuntimeError, match="weight_hr must be \\[proj_size, 4\\]"):
        op(x, None, h, c, w_ih, w_hh, None, None, torch.randn(2, 3), False, False)
    out, hy, cy, _, _ = op(x, None, h, c, w_ih, w_hh, None, None, w_hr, False, False)
    assert out.shape == (5, 2, 2) and hy.shape == (2, 2) and cy.shape == (2, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_raw_backward_ops_check_saved_activations_and_gradients(device):
    """The backward ops validate what they read besides the forward's arguments: gradients and saved
    activations of the right size, dtype and device (a kernel would otherwise read out of bounds)."""
    x, h, c = torch.randn(5, 2, 3, device=device), torch.zeros(2, 4, device=device), torch.zeros(2, 4, device=device)
    w_ih, w_hh = torch.randn(16, 3, device=device), torch.randn(16, 4, device=device)
    out, hy, cy, gates, cells = torch.ops.gatedrnn.lstm_forward(x, None, h, c, w_ih, w_hh, None, None, None, False,
                                                                True)
    args = [torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy), x, None, h, c, w_ih, w_hh, None, out,
            gates, cells, False, [True, True, True]]
    cases = [(11, torch.empty(0, device=device), "saved activations \\(gates\\) are missing"),
             (12, cells.double(), "saved activations \\(cells\\)"),
             (0, torch.randn(5, 2, 3, device=device), "expected grad_output to have 40 elements"),
             (1, torch.randn(2, 3, device=device), "expected grad_hy to have 8 elements"),
             (0, torch.randn_like(out, device="cpu"), None), (12, cells.cpu(), None)]
    for index, value, message in cases:
        if message is None:  # a tensor on another device
            if device == "cpu":
                continue
            message = "(expected grad_output to be on|saved activations \\(cells\\))"
        bad = list(args)
        bad[index] = value
        with pytest.raises(RuntimeError, match=message):
            torch.ops.gatedrnn.lstm_backward(*bad)
    torch.ops.gatedrnn.lstm_backward(*args)  # the unmodified arguments pass

    w_ih, w_hh = torch.randn(12, 3, device=device), torch.randn(12, 4, device=device)
    out, hy, saved = torch.ops.gatedrnn.gru_forward(x, None, h, w_ih, w_hh, None, None, False, True)
    with pytest.raises(RuntimeError, match="saved activations \\(r, z, n, hn\\)"):
        torch.ops.gatedrnn.gru_backward(torch.randn_like(out), torch.randn_like(hy), x, None, h, w_ih, w_hh, out,
                                        saved[:, :12], False, [True, True, True])


def test_zero_batch_matches_torch_nn():
    for mode in ("LSTM", "GRU"):
        reference = getattr(nn, mode)(4, 3)
        ours = getattr(gatedrnn, mode)(4, 3)
        ours.load_state_dict(reference.state_dict())
        x = torch.randn(5, 0, 4)
        torch.testing.assert_close(ours(x), reference(x))
