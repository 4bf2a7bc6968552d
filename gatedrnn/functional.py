"""Multi-layer and bidirectional orchestration over the per-layer ops.

The math of one layer and direction lives in the compiled ops (gatedrnn._ops); what is left here is the
part torch.nn keeps in its own C++: looping over layers and directions, concatenating the two
directions' outputs, inter-layer dropout and stacking the final states. gatedrnn.reference runs this same
orchestration over its pure-PyTorch layers, so the two differ only in the per-layer math.

Tensors are time-major: dense input is [T, B, I]; packed input is a PackedSequence's data [N, I] with its
batch_sizes. Dense input may come with `lengths` ([B] integers): row b holds a sequence of lengths[b] steps,
its outputs past that are zero and its final state is its own last step's (as if packed). `weights` is the
flat list torch.nn's RNN modules keep (``_flat_weights``): for each layer, for each direction, weight_ih,
weight_hh, then bias_ih, bias_hh if `bias`, then weight_hr if projecting.
"""
import functools

import torch
import torch.nn.functional as F

from . import _ops


def _layer_weights(weights, index, bias, proj):
    per_layer = 2 + (2 if bias else 0) + (1 if proj else 0)
    w = weights[index * per_layer:(index + 1) * per_layer]
    w_ih, w_hh = w[0], w[1]
    b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
    w_hr = w[-1] if proj else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def run_layers(layer_fn, input, batch_sizes, states, weights, *, bias, proj, num_layers, bidirectional, dropout,
               training, lengths=None, zoneout=(), weight_dropout=0.0, recurrent_dropout=0.0, input_dropout=0.0,
               layer_norms=None):
    """Runs `layer_fn` over layers x directions.

    states: tuple of [num_layers * directions, B, *] initial states (hx,) or (hx, cx).
    layer_fn(input, batch_sizes, *states_of_one_layer, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths, zoneout)
    returns (output, *final_states). zoneout: the zoneout probability of each state, in the order of `states`
    (0: none); each layer and direction gets its own keep values (_ops.zoneout_keep), and with weight_dropout
    in training its own W_hh mask for this call (_ops.weight_dropout_mask) and its own per-sequence masks for
    recurrent_dropout and input_dropout (_ops.sequence_dropout_mask), drawn in that order. layer_norms: for
    each layer and direction (in _flat_weights' order) the LayerNorm cell's gains and biases (the ops'
    layer_norm argument), or None for the plain cell. Returns (output, tuple of stacked final states).
    """
    directions = 2 if bidirectional else 1
    finals = [[] for _ in states]
    layer_input = input
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            layer_states = [s[index] for s in states]
            keep = [_ops.zoneout_keep(p, training, layer_input, s.shape[-1])
                    for p, s in zip(zoneout or (0.0,) * len(states), layer_states)]
            layer_weights = _layer_weights(weights, index, bias, proj)
            masks = dict(weight_hh_mask=_ops.weight_dropout_mask(weight_dropout, training, layer_weights[1]),
                         **_sequence_masks(recurrent_dropout, input_dropout, training, layer_input, layer_states[0]))
            if layer_norms is not None:
                masks["layer_norm"] = layer_norms[index]
            output, *final = layer_fn(layer_input, batch_sizes, *layer_states, *layer_weights,
                                      reverse=direction == 1, lengths=lengths, zoneout=keep, **masks)
            outputs.append(output)
            for collected, state in zip(finals, final):
                collected.append(state)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)
    return layer_input, tuple(torch.stack(f, dim=0) for f in finals)


def _sequence_masks(recurrent_dropout, input_dropout, training, layer_input, h0):
    batch, device = h0.shape[0], h0.device
    return dict(
        recurrent_mask=_ops.sequence_dropout_mask(recurrent_dropout, training, batch, h0.shape[-1],
                                                  _ops._compute_dtype(layer_input.dtype), device),
        input_mask=_ops.sequence_dropout_mask(input_dropout, training, batch, layer_input.shape[-1], layer_input.dtype,
                                              device))


def lstm_over(layer_fn):
    """A multi-layer LSTM built on `layer_fn` (one layer and direction -> (output, hy, cy))."""

    def lstm(input, batch_sizes, hx, cx, weights, *, bias=True, proj=False, num_layers=1, bidirectional=False,
             dropout=0.0, training=False, lengths=None, zoneout=0.0, zoneout_cell=0.0, weight_dropout=0.0,
             recurrent_dropout=0.0, input_dropout=0.0, layer_norms=None):
        """Multi-layer LSTM over time-major input. Returns (output, (h_n, c_n)) as torch.nn.LSTM does."""
        return run_layers(layer_fn, input, batch_sizes, (hx, cx), weights, bias=bias, proj=proj,
                          num_layers=num_layers, bidirectional=bidirectional, dropout=dropout, training=training,
                          lengths=lengths, zoneout=(zoneout, zoneout_cell), weight_dropout=weight_dropout,
                          recurrent_dropout=recurrent_dropout, input_dropout=input_dropout, layer_norms=layer_norms)

    return lstm


def gru_over(layer_fn):
    """A multi-layer GRU built on `layer_fn` (one layer and direction -> (output, hy))."""

    def gru(input, batch_sizes, hx, weights, *, bias=True, num_layers=1, bidirectional=False, dropout=0.0,
            training=False, lengths=None, zoneout=0.0, weight_dropout=0.0, recurrent_dropout=0.0, input_dropout=0.0,
            reset_after=True, layer_norms=None):
        """Multi-layer GRU over time-major input. Returns (output, h_n) as torch.nn.GRU does. reset_after=False
        is Cho et al.'s GRU (Keras' reset_after=False): the reset gate multiplies h_{t-1} before W_hn."""
        output, (hy,) = run_layers(functools.partial(layer_fn, reset_after=reset_after), input, batch_sizes, (hx,),
                                   weights, bias=bias, proj=False, num_layers=num_layers,
                                   bidirectional=bidirectional, dropout=dropout,
                                   training=training, lengths=lengths, zoneout=(zoneout,),
                                   weight_dropout=weight_dropout, recurrent_dropout=recurrent_dropout,
                                   input_dropout=input_dropout, layer_norms=layer_norms)
        return output, hy

    return gru


def _lstm_layer(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths=None, zoneout=(None, None),
                **masks):
    return _ops.lstm_layer(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths, *zoneout,
                           **masks)


def _gru_layer(input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths=None, zoneout=(None,),
               **options):
    return _ops.gru_layer(input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, reverse, lengths, *zoneout, **options)


lstm = lstm_over(_lstm_layer)
gru = gru_over(_gru_layer)
