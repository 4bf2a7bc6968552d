"""Zoneout (Krueger et al. 2016): `zoneout=p` (the hidden state) and, for the LSTM, `zoneout_cell=p`, inside the
fused kernels (csrc/cells.h).

Oracles: gatedrnn.reference with the same keep values, and the loop users write today over torch.nn's cells
(the paper's equations around nn.LSTMCell / nn.GRUCell), which is independent of both."""
import pytest
import torch
from torch import nn

import gatedrnn
from gatedrnn import _ops, reference
from utils import DEVICES, VARIANT_LENGTHS, VARIANT_SIZES, assert_same_results_and_grads, variant_layer_args

T, B, I, H = VARIANT_SIZES
LENGTHS = VARIANT_LENGTHS


def _keep(rows, draw, generator, p=0.3, dtype=torch.float64):
    """Training keep values (0/1 draws) or evaluation's broadcast p."""
    if draw:
        return torch.empty(rows, H, dtype=dtype).bernoulli_(p, generator=generator)
    return torch.full((1, 1), p, dtype=dtype).expand(rows, H)


def _layer_args(mode, layout, g, device="cpu"):
    return variant_layer_args(mode, layout, g, device)


# (mode, which states zone out: h, c or hc, drawn (training) or p (evaluation))
CASES = [("LSTM", "h", True), ("LSTM", "c", True), ("LSTM", "hc", True), ("LSTM", "hc", False),
         ("GRU", "h", True), ("GRU", "h", False)]


def _case_id(case):
    mode, states, draw = case
    return f"{mode}-{states}-{'train' if draw else 'eval'}"


@pytest.mark.parametrize("layout", ["dense", "packed", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_layer_ops_match_the_reference(case, reverse, layout):
    """Outputs, final states and every gradient of the fused op against gatedrnn.reference given the same keep
    values, float64."""
    mode, states, draw = case
    g = torch.Generator().manual_seed(0)
    args = _layer_args(mode, layout, g)
    rows = args[0].shape[0] if layout == "packed" else T * B
    names = ("h", "c") if mode == "LSTM" else ("h",)
    keep = [_keep(rows, draw, g) if name in states else None for name in names]
    lengths = torch.tensor(LENGTHS) if layout == "lengths" else None
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if mode == "LSTM":
        ours = _ops.lstm_layer(*args, None, reverse, lengths, *keep)
        expected = reference.lstm_layer(*args, None, reverse, lengths=lengths, zoneout=keep[0], zoneout_cell=keep[1])
    else:
        ours = _ops.gru_layer(*args, reverse, lengths, *keep)
        expected = reference.gru_layer(*args, None, reverse, lengths=lengths, zoneout=keep[0])
    assert_same_results_and_grads(ours, expected, inputs, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in CASES if c[2]], ids=_case_id)
def test_gradcheck(case, device):
    mode, states, _ = case
    g = torch.Generator().manual_seed(1)
    args = [a.detach().to(device).requires_grad_() if isinstance(a, torch.Tensor) else a
            for a in _layer_args(mode, "dense", g)]
    names = ("h", "c") if mode == "LSTM" else ("h",)
    keep = [_keep(T * B, True, g, p=0.5).to(device) if name in states else None for name in names]
    if mode == "LSTM":
        fn = lambda *a: _ops.lstm_layer(*a, None, True, None, *keep)  # noqa: E731
    else:
        fn = lambda *a: _ops.gru_layer(*a, True, None, *keep)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_opcheck(mode, device):
    g = torch.Generator().manual_seed(2)
    args = [a.detach().to(device) if isinstance(a, torch.Tensor) else a for a in _layer_args(mode, "dense", g)]
    drawn, expected = _keep(T * B, True, g).to(device), _keep(T * B, False, g).to(device)
    if mode == "LSTM":
        torch.library.opcheck(torch.ops.gatedrnn.lstm_forward, (*args, None, False, True, None, drawn, expected))
        x, _, h0, c0, w_ih, w_hh, _, _ = args
        out, hy, cy, gates, cells = torch.ops.gatedrnn.lstm_forward(*args, None, False, True, None, drawn, expected)
        torch.library.opcheck(torch.ops.gatedrnn.lstm_backward,
                              (torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy), x, None, h0, c0,
                               w_ih, w_hh, None, out, gates, cells, False, [True, True, True], None, drawn, expected))
    else:
        torch.library.opcheck(torch.ops.gatedrnn.gru_forward, (*args, True, True, None, expected))
        x, _, h0, w_ih, w_hh, _, _ = args
        out, hy, saved = torch.ops.gatedrnn.gru_forward(*args, True, True, None, drawn)
        torch.library.opcheck(torch.ops.gatedrnn.gru_backward,
                              (torch.randn_like(out), torch.randn_like(hy), x, None, h0, w_ih, w_hh, out, saved, True,
                               [True, True, True], None, drawn))


def _torch_nn_loop(cell, x, keeps, state):
    """What users write today: a Python loop over a torch.nn cell with the paper's zoneout equations."""
    outputs = []
    for t in range(x.shape[0]):
        keep = [k[t] for k in keeps]
        if isinstance(cell, nn.LSTMCell):
            (h, c), (h_new, c_new) = state, cell(x[t], state)
            state = (keep[0] * h + (1 - keep[0]) * h_new, keep[1] * c + (1 - keep[1]) * c_new)
            outputs.append(state[0])
        else:
            state = keep[0] * state + (1 - keep[0]) * cell(x[t], state)
            outputs.append(state)
    return torch.stack(outputs), state


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_matches_a_loop_over_torch_nn_cells(mode, training):
    """The module, its draws reproduced from the seed, against torch.nn's cell in a Python loop (training); its
    evaluation against the same loop with keep = p (the expectation). Outputs, final states, gradients."""
    p_h, p_c = 0.3, 0.6
    torch.manual_seed(0)
    kwargs = dict(zoneout=p_h, zoneout_cell=p_c) if mode == "LSTM" else dict(zoneout=p_h)
    module = getattr(gatedrnn, mode)(I, H, dtype=torch.float64, **kwargs).train(training)
    cell = getattr(nn, f"{mode}Cell")(I, H, dtype=torch.float64)
    cell.load_state_dict({k[:-3]: v for k, v in module.state_dict().items()})
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    output, state = module(x)
    torch.manual_seed(7)  # the module draws h's keep values for all steps, then c's (_ops.zoneout_keep)
    ps = (p_h, p_c) if mode == "LSTM" else (p_h,)
    keeps = [_ops.zoneout_keep(p, training, x, H).view(T, B, H) for p in ps]
    zeros = torch.zeros(B, H, dtype=torch.float64)
    expected, final = _torch_nn_loop(cell, x, keeps, (zeros, zeros) if mode == "LSTM" else zeros)
    finals = list(final) if mode == "LSTM" else [final]
    ours = list(state) if mode == "LSTM" else [state]
    torch.testing.assert_close(output, expected, atol=1e-12, rtol=1e-12)
    for a, e in zip(ours, finals):
        torch.testing.assert_close(a.squeeze(0), e, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(output.pow(2).sum() + sum(s.pow(3).sum() for s in ours), [x, *module.parameters()])
    expected_grads = torch.autograd.grad(expected.pow(2).sum() + sum(s.pow(3).sum() for s in finals),
                                         [x, *cell.parameters()])
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


def test_draws_follow_torch_seed_and_change_the_result():
    lstm = gatedrnn.LSTM(I, H, num_layers=2, zoneout=0.5, zoneout_cell=0.5)
    x = torch.randn(T, B, I)
    torch.manual_seed(3)
    first = lstm(x)[0]
    torch.manual_seed(3)
    torch.testing.assert_close(lstm(x)[0], first, atol=0, rtol=0)
    assert not torch.equal(lstm(x)[0], first)  # another draw
    plain = gatedrnn.LSTM(I, H, num_layers=2)
    plain.load_state_dict(lstm.state_dict())
    assert not torch.allclose(lstm.eval()(x)[0], plain(x)[0])  # the expectation differs from no zoneout


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_a_probability_of_one_keeps_the_initial_state(mode):
    kwargs = dict(zoneout=1.0, zoneout_cell=1.0) if mode == "LSTM" else dict(zoneout=1.0)
    module = getattr(gatedrnn, mode)(I, H, **kwargs)
    h0 = torch.randn(1, B, H)
    state = (h0, torch.randn(1, B, H)) if mode == "LSTM" else h0
    for training in (True, False):
        output, final = module.train(training)(torch.randn(T, B, I), state)
        torch.testing.assert_close(output, h0.expand(T, B, H), atol=0, rtol=0)
        torch.testing.assert_close(final, state, atol=0, rtol=0)


def test_zero_is_the_plain_layer():
    """zoneout=0 runs no zoneout code at all: bit for bit the default layer, and torch.nn's numbers."""
    torch.manual_seed(0)
    ref = nn.GRU(I, H, dtype=torch.float64)
    ours, plain = gatedrnn.GRU(I, H, zoneout=0.0, dtype=torch.float64), gatedrnn.GRU(I, H, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    plain.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], plain(x)[0], atol=0, rtol=0)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell"])
def test_cells(mode):
    """The cells: one step with zoneout, drawn in training, p in evaluation."""
    torch.manual_seed(0)
    kwargs = dict(zoneout=0.4, zoneout_cell=0.7) if mode == "LSTMCell" else dict(zoneout=0.4)
    ours = getattr(gatedrnn, mode)(I, H, dtype=torch.float64, **kwargs)
    cell = getattr(nn, mode)(I, H, dtype=torch.float64)
    cell.load_state_dict(ours.state_dict())
    x = torch.randn(B, I, dtype=torch.float64)
    state = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64))
    if mode == "GRUCell":
        state = state[0]
    for training in (True, False):
        torch.manual_seed(1)
        result = ours.train(training)(x, state)
        torch.manual_seed(1)
        ps = (0.4, 0.7) if mode == "LSTMCell" else (0.4,)
        keeps = [_ops.zoneout_keep(p, training, x.unsqueeze(0), H).unsqueeze(0) for p in ps]
        _, expected = _torch_nn_loop(cell, x.unsqueeze(0), keeps, state)
        torch.testing.assert_close(result, expected, atol=1e-12, rtol=1e-12)


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="zoneout should be a number in range"):
        gatedrnn.LSTM(I, H, zoneout=1.5)
    with pytest.raises(ValueError, match="zoneout_cell should be a number in range"):
        gatedrnn.LSTMCell(I, H, zoneout_cell=-0.1)
    with pytest.raises(ValueError, match="zoneout with proj_size is not supported"):
        gatedrnn.LSTM(I, H, proj_size=2, zoneout=0.1)
    with pytest.raises(TypeError, match="zoneout_cell is an LSTM argument"):
        gatedrnn.GRU(I, H, zoneout_cell=0.1)
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in _layer_args("LSTM", "dense", torch.Generator().manual_seed(0))]
    op = torch.ops.gatedrnn.lstm_forward
    with pytest.raises(RuntimeError, match=r"expected zoneout of size \[24, 5\]"):
        op(*args, None, False, False, None, torch.zeros(T * B, H + 1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="expected zoneout_cell to be a Double tensor"):
        op(*args, None, False, False, None, None, torch.zeros(T * B, H))
    x, _, _, c0, w_ih, _, b_ih, b_hh = args
    projected = (x, None, torch.zeros(B, 2, dtype=torch.float64), c0, w_ih, torch.zeros(4 * H, 2, dtype=torch.float64),
                 b_ih, b_hh, torch.zeros(2, H, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="zoneout with a projection"):
        op(*projected, False, False, None, torch.zeros(T * B, H, dtype=torch.float64))


def test_repr_and_onnx_refusal():
    assert "zoneout=0.2, zoneout_cell=0.1" in repr(gatedrnn.LSTM(I, H, zoneout=0.2, zoneout_cell=0.1))
    assert "zoneout=0.2" in repr(gatedrnn.GRUCell(I, H, zoneout=0.2))
    pytest.importorskip("onnxscript", reason="the export refusal needs onnxscript")
    with pytest.raises(Exception, match="ONNX export of zoneout is not supported"):
        torch.onnx.export(gatedrnn.GRU(I, H, zoneout=0.2).eval(), (torch.randn(T, B, I),), dynamo=True)
