"""Keras 3 interchange: gatedrnn.from_keras(layer) and gatedrnn.to_keras_weights(module).

Keras keeps an LSTM's weights as kernel [input, 4H], recurrent_kernel [H, 4H] and one bias [4H], gates in the
order i, f, c, o (torch's i, f, g, o); a GRU's as kernel [input, 3H], recurrent_kernel [H, 3H], gates z, r, h
(torch's r, z, n), and with reset_after=True (Keras' default, torch's formulation) a bias of two rows, the
input one and the recurrent one; with reset_after=False (gatedrnn's GRU(reset_after=False)) one bias [3H],
which all enters the pre-activations directly. Keras' RNNs are batch-first and single-layer; Bidirectional
wraps a forward and a backward layer and concatenates their outputs (merge_mode="concat"), as torch's
bidirectional RNNs do.

Keras is never imported here unless the caller passes a Keras layer (which has imported it already).
"""
import torch
from torch import nn



def _swap_gru_gates(t):
    """A GRU tensor's gate blocks (dim 0) from torch's order r, z, n to Keras' z, r, h; the same swap goes back."""
    r, z, n = t.chunk(3, dim=0)
    return torch.cat([z, r, n])


class GoBackwards(nn.Module):
    """A Keras layer with go_backwards=True: the wrapped batch-first gatedrnn module run over the sequence
    reversed in time, its outputs in processing order (last input step first), as Keras returns them."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, input, hx=None):
        return self.module(input.flip(1), hx)


def _config(layer):
    return layer.get_config()


def _check_supported(layer, config, kind):
    for name, expected in (("activation", "tanh"), ("recurrent_activation", "sigmoid")):
        if config.get(name) != expected:
            raise ValueError(f"gatedrnn.from_keras: {kind} with {name}={config.get(name)!r} is not supported "
                             f"(gatedrnn's cells use {expected})")
    if config.get("stateful"):
        raise ValueError(f"gatedrnn.from_keras: a stateful {kind} is not supported: pass the state explicitly "
                         "as hx")
    if not layer.built:
        raise ValueError(f"gatedrnn.from_keras: the {kind} layer has no weights yet; build it first (call it on "
                         "an input once)")


def _kind(layer):
    name = type(layer).__name__
    if name not in ("LSTM", "GRU") or not type(layer).__module__.startswith("keras"):
        raise TypeError(f"gatedrnn.from_keras expects a keras.layers.LSTM, GRU or Bidirectional layer, got "
                        f"{type(layer).__module__}.{name}")
    return name


def _numpy_weights(layer):
    """kernel, recurrent_kernel and bias (or None) of a built Keras LSTM or GRU layer, as numpy arrays."""
    weights = layer.get_weights()
    return weights[0], weights[1], (weights[2] if len(weights) > 2 else None)


def _torch_direction(kind, layer, dtype):
    """(weight_ih, weight_hh, bias_ih, bias_hh) in torch's layout from one Keras layer."""
    kernel, recurrent, bias = (None if w is None else torch.as_tensor(w, dtype=dtype) for w in _numpy_weights(layer))
    w_ih, w_hh = kernel.t(), recurrent.t()
    if kind == "LSTM":  # the same gate order; Keras' single bias goes to b_ih
        return w_ih, w_hh, bias, None if bias is None else torch.zeros_like(bias)
    if bias is not None and bias.dim() == 1:  # reset_after=False: one bias, to b_ih
        bias = torch.stack([bias, torch.zeros_like(bias)])
    b_ih, b_hh = (None, None) if bias is None else (_swap_gru_gates(bias[0]), _swap_gru_gates(bias[1]))
    return _swap_gru_gates(w_ih), _swap_gru_gates(w_hh), b_ih, b_hh


def from_keras(layer):
    """A gatedrnn module with the weights and the semantics of a built Keras 3 ``LSTM``, ``GRU`` or
    ``Bidirectional`` layer (merge_mode="concat"): batch-first, so that it takes Keras' input layout, and
    returning torch.nn's ``(output, h_n)`` / ``(output, (h_n, c_n))``, where output is the whole sequence
    (Keras' return_sequences=True) and h_n, c_n are Keras' final states. A layer with ``go_backwards=True`` comes
    back wrapped in :class:`gatedrnn.GoBackwards`. An LSTM with ``unit_forget_bias`` gets ``forget_bias=1.0``;
    Keras' ``dropout`` and ``recurrent_dropout`` become ``input_dropout`` and ``recurrent_dropout``, with one
    difference in training: Keras draws a mask per gate, gatedrnn one shared by the gates (Gal & Ghahramani's
    tied variant; the fused product reads h once). A GRU keeps its ``reset_after``. Activations other than
    tanh/sigmoid and stateful layers are refused by name."""
    from . import modules

    name = type(layer).__name__
    bidirectional = name == "Bidirectional" and type(layer).__module__.startswith("keras")
    if bidirectional:
        if layer.merge_mode != "concat":
            raise ValueError(f"gatedrnn.from_keras: Bidirectional with merge_mode={layer.merge_mode!r} is not "
                             "supported; torch's bidirectional RNNs concatenate the two directions ('concat')")
        directions = [layer.forward_layer, layer.backward_layer]
    else:
        directions = [layer]
    kind = _kind(directions[0])
    for d in directions:
        _check_supported(d, _config(d), kind)
        if _kind(d) != kind:
            raise ValueError("gatedrnn.from_keras: Bidirectional over two different kinds of layer")
    config = _config(directions[0])
    if bidirectional and (directions[0].go_backwards or not directions[1].go_backwards):
        raise ValueError("gatedrnn.from_keras: a Bidirectional layer's backward layer must have go_backwards=True "
                         "and its forward layer False")

    kernel = directions[0].get_weights()[0]
    dtype = getattr(torch, str(kernel.dtype))
    kwargs = dict(bias=config["use_bias"], batch_first=True, bidirectional=bidirectional, dtype=dtype)
    if kind == "LSTM" and config["use_bias"] and config.get("unit_forget_bias"):
        kwargs["forget_bias"] = 1.0
    if kind == "GRU":
        kwargs["reset_after"] = config.get("reset_after", True)
    # Keras' dropout is on the input, held over the steps (variational), like gatedrnn's input_dropout.
    kwargs.update(input_dropout=config.get("dropout", 0.0), recurrent_dropout=config.get("recurrent_dropout", 0.0))
    module = getattr(modules, kind)(kernel.shape[0], config["units"], **kwargs)
    with torch.no_grad():
        for suffix, d in zip(("", "_reverse"), directions):
            values = _torch_direction(kind, d, dtype)
            for name, value in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), values):
                if value is not None:
                    getattr(module, f"{name}_l0{suffix}").copy_(value)
    if not bidirectional and config.get("go_backwards"):
        return GoBackwards(module)
    return module


def _keras_direction(module, suffix):
    kind = module.mode
    w_ih = getattr(module, f"weight_ih_l0{suffix}").detach().cpu()
    w_hh = getattr(module, f"weight_hh_l0{suffix}").detach().cpu()
    weights = [w_ih, w_hh]
    if kind == "GRU":
        weights = [_swap_gru_gates(w) for w in weights]
    weights = [w.t().contiguous() for w in weights]
    if module.bias:
        b_ih = getattr(module, f"bias_ih_l0{suffix}").detach().cpu()
        b_hh = getattr(module, f"bias_hh_l0{suffix}").detach().cpu()
        if kind == "LSTM" or not module.reset_after:
            weights.append(_swap_gru_gates(b_ih + b_hh) if kind == "GRU" else b_ih + b_hh)  # one sum enters the gates
        else:
            weights.append(torch.stack([_swap_gru_gates(b_ih), _swap_gru_gates(b_hh)]))
    # numpy has no bfloat16: such weights come back as float32.
    return [(w.float() if w.dtype == torch.bfloat16 else w).numpy() for w in weights]


def to_keras_weights(module):
    """Keras' weight list (``layer.set_weights(...)``) for a single-layer ``gatedrnn.LSTM`` or ``GRU``: kernel,
    recurrent_kernel and, with bias, the bias (an LSTM's two biases summed; a GRU's as Keras' two rows for
    reset_after=True, summed for reset_after=False), forward direction then backward for a bidirectional
    module (Keras' Bidirectional order). Keras has no projections and one layer per RNN layer: proj_size and
    num_layers > 1 are refused."""
    if isinstance(module, GoBackwards):
        module = module.module
    if getattr(module, "mode", None) not in ("LSTM", "GRU"):
        raise TypeError(f"gatedrnn.to_keras_weights expects a gatedrnn.LSTM or GRU, got {type(module).__name__}")
    if module.num_layers != 1:
        raise ValueError(f"gatedrnn.to_keras_weights: a Keras RNN layer has one layer, this module has "
                         f"{module.num_layers}; convert each layer of a Keras stack separately")
    if getattr(module, "proj_size", 0):
        raise ValueError("gatedrnn.to_keras_weights: Keras' LSTM has no projection (proj_size)")
    if module.layer_norm:
        raise ValueError("gatedrnn.to_keras_weights: Keras' LSTM and GRU layers have no layer normalisation "
                         "(layer_norm=True)")
    suffixes = ("", "_reverse") if module.bidirectional else ("",)
    return [w for suffix in suffixes for w in _keras_direction(module, suffix)]
