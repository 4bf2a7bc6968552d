"""`recurrent_dropout=p` and `input_dropout=p`: variational dropout (Keras' recurrent_dropout and dropout; Gal &
Ghahramani 2016), one mask per sequence and unit held over all steps. The recurrent mask multiplies h_{t-1}
where it enters W_hh, inside the fused step kernels; the input mask multiplies x before the input product.

Oracles: gatedrnn.reference given the same masks, and Keras 3 (torch backend) with gatedrnn's masks put in its
cells' mask caches (one mask repeated for every gate: gatedrnn's masks are tied across the gates)."""
import os

import numpy as np
import pytest
import torch

import gatedrnn
from gatedrnn import _ops, reference
from utils import DEVICES, VARIANT_LENGTHS, VARIANT_SIZES, assert_same_results_and_grads, variant_layer_args

T, B, I, H = VARIANT_SIZES
LENGTHS = VARIANT_LENGTHS


def _mask(p, batch, size, g):
    return (torch.rand(batch, size, generator=g, dtype=torch.float64) >= p).double() / (1 - p)


def _layer_args(mode, layout, g, device="cpu"):
    return variant_layer_args(mode, layout, g, device)


def _run(mode, args, reverse, lengths, masks, impl):
    if impl == "ops":
        layer = _ops.lstm_layer if mode == "LSTM" else _ops.gru_layer
        extra = [None] if mode == "LSTM" else []  # weight_hr
        return layer(*args, *extra, reverse, lengths, **masks)
    layer = reference.lstm_layer if mode == "LSTM" else reference.gru_layer
    return layer(*args, None, reverse, lengths=lengths, **masks)


@pytest.mark.parametrize("which", ["recurrent", "input", "both"])
@pytest.mark.parametrize("layout", ["dense", "packed", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_layer_ops_match_the_reference(mode, reverse, layout, which):
    """Outputs, final states and every gradient (h0's included, which reaches the first step through the
    mask) of the fused op against gatedrnn.reference given the same masks, float64."""
    g = torch.Generator().manual_seed(0)
    args = _layer_args(mode, layout, g)
    masks = {}
    if which in ("recurrent", "both"):
        masks["recurrent_mask"] = _mask(0.3, B, H, g)
    if which in ("input", "both"):
        masks["input_mask"] = _mask(0.4, B, I, g)
    lengths = torch.tensor(LENGTHS) if layout == "lengths" else None
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    ours = _run(mode, args, reverse, lengths, masks, "ops")
    expected = _run(mode, args, reverse, lengths, masks, "reference")
    assert_same_results_and_grads(ours, expected, inputs, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_gradcheck_and_opcheck(mode, device):
    g = torch.Generator().manual_seed(1)
    args = _layer_args(mode, "dense", g, device)
    masks = dict(recurrent_mask=_mask(0.3, B, H, g).to(device), input_mask=_mask(0.4, B, I, g).to(device))
    assert torch.autograd.gradcheck(lambda *a: _run(mode, a, True, None, masks, "ops"), args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    op = torch.ops.gatedrnn.lstm_forward if mode == "LSTM" else torch.ops.gatedrnn.gru_forward
    extra = [None] if mode == "LSTM" else []
    torch.library.opcheck(op, (*plain, *extra, True, True), masks)
    outputs = op(*plain, *extra, True, True, **masks)
    if mode == "LSTM":
        x, _, h0, c0, w_ih, w_hh, _, _ = plain
        out, hy, cy, gates, cells = outputs
        grads = (torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy))
        torch.library.opcheck(torch.ops.gatedrnn.lstm_backward,
                              (*grads, x, None, h0, c0, w_ih, w_hh, None, out, gates, cells, True, [True, True, True]),
                              masks)
    else:
        x, _, h0, w_ih, w_hh, _, _ = plain
        out, hy, saved = outputs
        torch.library.opcheck(torch.ops.gatedrnn.gru_backward,
                              (torch.randn_like(out), torch.randn_like(hy), x, None, h0, w_ih, w_hh, out, saved, True,
                               [True, True, True]), masks)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_module_draws_masks_in_training_only(mode):
    module = getattr(gatedrnn, mode)(I, H, num_layers=2, bidirectional=True, recurrent_dropout=0.5,
                                     input_dropout=0.5)
    plain = getattr(gatedrnn, mode)(I, H, num_layers=2, bidirectional=True)
    plain.load_state_dict(module.state_dict())
    x = torch.randn(T, B, I)
    torch.manual_seed(3)
    first = module(x)[0]
    torch.manual_seed(3)
    torch.testing.assert_close(module(x)[0], first, atol=0, rtol=0)
    assert not torch.equal(module(x)[0], first)
    module.eval()
    torch.testing.assert_close(module(x)[0], plain(x)[0], atol=0, rtol=0)


def test_probability_one_cuts_what_it_drops():
    """recurrent_dropout=1: W_hh never sees h (as if it were zero); input_dropout=1: the input is zero."""
    x = torch.randn(T, B, I)
    lstm = gatedrnn.LSTM(I, H, recurrent_dropout=1.0)
    cut = gatedrnn.LSTM(I, H)
    cut.load_state_dict(lstm.state_dict())
    with torch.no_grad():
        cut.weight_hh_l0.zero_()
    torch.testing.assert_close(lstm(x, (torch.randn(1, B, H), torch.zeros(1, B, H)))[0],
                               cut(x, (torch.zeros(1, B, H), torch.zeros(1, B, H)))[0], atol=1e-7, rtol=0)
    gru = gatedrnn.GRU(I, H, input_dropout=1.0)
    plain = gatedrnn.GRU(I, H)
    plain.load_state_dict(gru.state_dict())
    torch.testing.assert_close(gru(x)[0], plain(torch.zeros_like(x))[0], atol=0, rtol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(recurrent_dropout=2), "recurrent_dropout should be a number in range"),
    (dict(input_dropout=-1), "input_dropout should be a number in range"),
    (dict(proj_size=2, recurrent_dropout=0.1), "recurrent_dropout with proj_size is not supported"),
])
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gatedrnn.LSTM(I, H, **kwargs)
    assert "recurrent_dropout=0.1, input_dropout=0.2" in repr(gatedrnn.GRU(I, H, recurrent_dropout=0.1,
                                                                             input_dropout=0.2))


def test_ops_refuse_bad_masks_by_name():
    args = [a.detach() if isinstance(a, torch.Tensor) else a
            for a in _layer_args("GRU", "dense", torch.Generator().manual_seed(0))]
    with pytest.raises(RuntimeError, match=r"expected recurrent_mask of size \[4, 5\]"):
        torch.ops.gatedrnn.gru_forward(*args, False, False, recurrent_mask=torch.ones(B, H + 1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="expected input_mask to be a Double tensor"):
        torch.ops.gatedrnn.gru_forward(*args, False, False, input_mask=torch.ones(B, I))


# ------------------------------------------------------------------------------------------ Keras as oracle
os.environ.setdefault("KERAS_BACKEND", "torch")


@pytest.fixture(scope="module")
def keras():
    keras = pytest.importorskip("keras", reason="the Keras oracle needs keras 3 (pip install keras)")
    if keras.backend.backend() != "torch":
        pytest.skip(f"Keras runs on {keras.backend.backend()} here; the oracle needs KERAS_BACKEND=torch")
    return keras


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_training_matches_keras_given_the_same_masks(keras, mode):
    """A Keras layer with dropout and recurrent_dropout, trained-mode call, with gatedrnn's masks placed in its
    cell's mask caches (repeated for each gate), against gatedrnn.from_keras of it drawing those masks from
    the same seed: outputs, final states and the input's gradient, float64."""
    layer = getattr(keras.layers, mode)(H, return_sequences=True, return_state=True, dtype="float64", dropout=0.3,
                                        recurrent_dropout=0.4)
    layer(np.zeros((B, T, I)))
    rng = np.random.RandomState(1)
    layer.set_weights([rng.randn(*w.shape) * 0.4 for w in layer.get_weights()])
    module = gatedrnn.from_keras(layer)
    assert (module.input_dropout, module.recurrent_dropout) == (0.3, 0.4)
    x = np.random.RandomState(2).randn(B, T, I)
    x_ours = torch.tensor(x, requires_grad=True)
    torch.manual_seed(5)
    output, state = module(x_ours)
    torch.manual_seed(5)  # gatedrnn draws the recurrent mask, then the input mask
    recurrent = _ops.sequence_dropout_mask(0.4, True, B, H, torch.float64, "cpu")
    inputs = _ops.sequence_dropout_mask(0.3, True, B, I, torch.float64, "cpu")
    gates = 4 if mode == "LSTM" else 3
    layer.cell._recurrent_dropout_mask = [recurrent] * gates
    layer.cell._dropout_mask = [inputs] * gates
    x_keras = torch.tensor(x, requires_grad=True)
    expected = layer(x_keras, training=True)
    ours = [output] + [s.squeeze(0) for s in (state if isinstance(state, tuple) else (state,))]
    # Keras' per-gate path (implementation=1, which recurrent_dropout selects) is not exact in float64: with
    # all-ones masks it differs from a hand-written float64 loop by about 4e-8. A wrong mask would differ by
    # the size of the activations.
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)
    weights = [torch.linspace(-1, 1, e.numel(), dtype=torch.float64).view(e.shape) for e in expected]
    (expected_grad,) = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), x_keras)
    (our_grad,) = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ours, weights)), x_ours)
    torch.testing.assert_close(our_grad, expected_grad, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(output, module.eval()(x_ours)[0], atol=1e-3)  # the masks did change the result
