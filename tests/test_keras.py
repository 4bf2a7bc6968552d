"""Keras 3 interchange (gatedrnn.from_keras, gatedrnn.to_keras_weights), with Keras on its torch backend as a
second implementation of the Keras semantics: real Keras layers with random weights, compared output by
output and state by state, and through the input's gradient."""
import os

import numpy as np
import pytest
import torch

import gatedrnn

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="Keras interchange tests need keras 3 (pip install keras)")
if keras.backend.backend() != "torch":
    pytest.skip(f"Keras runs on {keras.backend.backend()} here; these tests need KERAS_BACKEND=torch",
                allow_module_level=True)

# Keras' own variables warn about numpy 2's copy keyword on every get_weights(); that is Keras' business.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

B, T, I, H = 3, 7, 5, 6


def _randomise(layer, seed=1):
    rng = np.random.RandomState(seed)
    layer.set_weights([(rng.randn(*w.shape) * 0.4).astype(w.dtype) for w in layer.get_weights()])


def _keras_layer(kind, dtype="float64", bidirectional=False, **kwargs):
    layer = getattr(keras.layers, kind)(H, return_sequences=True, return_state=True, dtype=dtype, **kwargs)
    if bidirectional:
        layer = keras.layers.Bidirectional(layer, dtype=dtype)
    layer(np.zeros((B, T, I), dtype=dtype))  # builds the weights
    _randomise(layer)
    return layer


def _as_tensors(results):
    return [torch.as_tensor(np.asarray(r.detach().cpu() if isinstance(r, torch.Tensor) else r)) for r in results]


def _ours_like_keras(module, x, kind, bidirectional, initial=None):
    """gatedrnn's results in Keras' return order: sequence, then the states (Bidirectional: forward's, then
    backward's)."""
    output, state = module(x, initial)
    states = list(state) if isinstance(state, tuple) else [state]  # each [directions, B, H]
    per_direction = [[s[d] for s in states] for d in range(2 if bidirectional else 1)]
    return [output] + [s for direction in per_direction for s in direction]


def _keras_initial_state(kind, bidirectional, rng):
    count = (2 if kind == "LSTM" else 1) * (2 if bidirectional else 1)
    return [rng.randn(B, H) for _ in range(count)]


def _our_initial_state(kind, bidirectional, keras_states):
    states = [torch.as_tensor(s) for s in keras_states]
    per_kind = 2 if kind == "LSTM" else 1
    directions = [states[k * per_kind:(k + 1) * per_kind] for k in range(2 if bidirectional else 1)]
    stacked = [torch.stack([d[j] for d in directions]) for j in range(per_kind)]
    return tuple(stacked) if kind == "LSTM" else stacked[0]


CASES = [
    ("LSTM", False, {}),
    ("LSTM", False, {"unit_forget_bias": True}),
    ("LSTM", False, {"use_bias": False}),
    ("LSTM", False, {"go_backwards": True}),
    ("LSTM", True, {}),
    ("GRU", False, {}),
    ("GRU", False, {"use_bias": False}),
    ("GRU", False, {"go_backwards": True}),
    ("GRU", True, {}),
    ("GRU", False, {"reset_after": False}),
    ("GRU", False, {"reset_after": False, "use_bias": False}),
    ("GRU", False, {"reset_after": False, "go_backwards": True}),
    ("GRU", True, {"reset_after": False}),
]


def _tolerance(kwargs):
    """Keras' GRU with reset_after=False is only about 6e-8 exact in float64: measured against a hand-written
    float64 numpy loop of its equations on its own weights (which gatedrnn matches to 4e-16). Its results differ
    from reset_after=True's by O(0.1), so 1e-6 still tells the two cells apart."""
    return dict(atol=1e-6, rtol=1e-6) if kwargs.get("reset_after") is False else dict(atol=1e-12, rtol=1e-10)


def _case_id(case):
    kind, bidirectional, kwargs = case
    return "-".join([kind] + (["Bidirectional"] if bidirectional else []) + [f"{k}={v}" for k, v in kwargs.items()])


@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_from_keras_matches_keras(case, with_initial_state):
    """float64 outputs, final states and the input's gradient equal Keras' own."""
    kind, bidirectional, kwargs = case
    layer = _keras_layer(kind, bidirectional=bidirectional, **kwargs)
    module = gatedrnn.from_keras(layer)
    rng = np.random.RandomState(2)
    x = rng.randn(B, T, I)
    initial = _keras_initial_state(kind, bidirectional, rng) if with_initial_state else None

    x_keras = torch.tensor(x, requires_grad=True)
    expected = layer(x_keras, initial_state=initial) if initial else layer(x_keras)
    x_ours = torch.tensor(x, requires_grad=True)
    ours = _ours_like_keras(module, x_ours, kind, bidirectional,
                            _our_initial_state(kind, bidirectional, initial) if initial else None)
    assert len(ours) == len(expected)
    for k, (a, e) in enumerate(zip(ours, _as_tensors(expected))):
        torch.testing.assert_close(a.detach(), e, **_tolerance(kwargs), msg=lambda m: f"result {k}: {m}")

    weights = [torch.linspace(-1, 1, e.numel(), dtype=torch.float64).view(e.shape) for e in expected]
    (expected_grad,) = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), x_keras)
    (our_grad,) = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ours, weights)), x_ours)
    torch.testing.assert_close(our_grad, expected_grad, **_tolerance(kwargs))


def test_module_configuration():
    lstm = gatedrnn.from_keras(_keras_layer("LSTM", dtype="float32", unit_forget_bias=True))
    assert isinstance(lstm, gatedrnn.LSTM)
    assert (lstm.input_size, lstm.hidden_size, lstm.batch_first, lstm.forget_bias) == (I, H, True, 1.0)
    assert lstm.weight_ih_l0.dtype == torch.float32
    gru = gatedrnn.from_keras(_keras_layer("GRU", go_backwards=True))
    assert isinstance(gru, gatedrnn.GoBackwards) and isinstance(gru.module, gatedrnn.GRU)
    assert gru.module.weight_hh_l0.dtype == torch.float64 and gru.module.reset_after
    assert not gatedrnn.from_keras(_keras_layer("GRU", reset_after=False)).reset_after


@pytest.mark.parametrize("case", [c for c in CASES if not c[2].get("go_backwards")], ids=_case_id)
def test_to_keras_weights_round_trip(case):
    """A torch.nn-initialised gatedrnn module's weights, set on a fresh Keras layer, give the module's
    results in Keras; and from_keras of that layer gives the module's parameters back (an LSTM's two biases, and
    a reset_after=False GRU's, come back summed into bias_ih, as Keras keeps one)."""
    kind, bidirectional, kwargs = case
    torch.manual_seed(0)
    variant = {"reset_after": kwargs["reset_after"]} if "reset_after" in kwargs else {}
    module = getattr(gatedrnn, kind)(I, H, batch_first=True, bidirectional=bidirectional,
                                     bias=kwargs.get("use_bias", True), dtype=torch.float64, **variant)
    layer = _keras_layer(kind, bidirectional=bidirectional, **kwargs)
    layer.set_weights(gatedrnn.to_keras_weights(module))
    x = torch.randn(B, T, I, dtype=torch.float64)
    with torch.no_grad():
        ours = _ours_like_keras(module, x, kind, bidirectional)
    for a, e in zip(ours, _as_tensors(layer(x.numpy()))):
        torch.testing.assert_close(a, e, **_tolerance(kwargs))
    back = gatedrnn.from_keras(layer)
    for name, p in module.named_parameters():
        expected = p.detach()
        one_bias = kind == "LSTM" or not kwargs.get("reset_after", True)
        if one_bias and name.startswith("bias_ih"):
            expected = expected + getattr(module, name.replace("bias_ih", "bias_hh")).detach()
        elif one_bias and name.startswith("bias_hh"):
            expected = torch.zeros_like(expected)
        torch.testing.assert_close(getattr(back, name).detach(), expected, atol=1e-15, rtol=0, msg=name)


@pytest.mark.parametrize("make,message", [
    (lambda: _keras_layer("LSTM", activation="relu"), "activation='relu' is not supported"),
    (lambda: _keras_layer("GRU", recurrent_activation="hard_sigmoid"), "recurrent_activation='hard_sigmoid'"),
    (lambda: keras.layers.LSTM(H), "has no weights yet"),
    (lambda: keras.layers.Bidirectional(keras.layers.GRU(H), merge_mode="sum"), "merge_mode='sum'"),
    (lambda: keras.layers.SimpleRNN(H), "expects a keras.layers.LSTM, GRU or Bidirectional"),
    (lambda: torch.nn.LSTM(I, H), "expects a keras.layers.LSTM, GRU or Bidirectional"),
])
def test_what_has_no_equivalent_is_refused_by_name(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        gatedrnn.from_keras(make())


def test_to_keras_weights_refuses_what_keras_lacks():
    with pytest.raises(ValueError, match="one layer"):
        gatedrnn.to_keras_weights(gatedrnn.LSTM(I, H, num_layers=2))
    with pytest.raises(ValueError, match="no projection"):
        gatedrnn.to_keras_weights(gatedrnn.LSTM(I, H, proj_size=2))
    with pytest.raises(TypeError, match="expects a gatedrnn.LSTM or GRU"):
        gatedrnn.to_keras_weights(gatedrnn.LSTMCell(I, H))
