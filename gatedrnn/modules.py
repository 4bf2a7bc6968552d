"""gatedrnn.LSTM, GRU, LSTMCell, GRUCell: torch.nn's interface over gatedrnn's fused ops.

Parameters have torch.nn's names, shapes, registration order and initialisation, so state_dicts load both
ways and the same seed gives the same weights. Input validation raises torch.nn's exception types with
its messages. These classes deliberately do not subclass torch.nn.RNNBase: Dynamo graph-breaks on
torch.nn's RNN classes, and compiling without a break is one of gatedrnn's reasons to exist.
"""
import math
import numbers
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import _onnx, _ops, functional


def _check_forget_bias(forget_bias, bias):
    """forget_bias (LSTM only): None (torch.nn's initialisation), or the number the forget gate's bias starts at."""
    if forget_bias is None:
        return None
    if isinstance(forget_bias, bool) or not isinstance(forget_bias, numbers.Real):
        raise TypeError(f"forget_bias should be a number or None, got: {type(forget_bias).__name__}")
    if not bias:
        raise ValueError("forget_bias needs bias=True: without biases there is no forget-gate bias to set")
    return float(forget_bias)


@torch.no_grad()
def _set_forget_bias(bias_ih, bias_hh, hidden_size, value):
    """The forget gate's total bias (b_ih + b_hh, in torch's gate order i, f, g, o) becomes `value`: b_ih's
    forget block is set to it and b_hh's to zero, so the state_dict keeps torch.nn's layout (Keras'
    unit_forget_bias with value 1; Jozefowicz et al. 2015)."""
    bias_ih[hidden_size:2 * hidden_size].fill_(value)
    bias_hh[hidden_size:2 * hidden_size].zero_()


def _check_lengths(lengths, input, batch_sizes, is_batched, batch_first):
    """lengths (a forward argument): None, or one length per batch row of padded (dense, batched) input, as a
    1-D integer tensor or a sequence of ints. Returns it as a tensor. Its values are checked by the ops
    (csrc/padded.h), where reading them costs no graph break under torch.compile."""
    if lengths is None:
        return None
    if batch_sizes is not None:
        raise ValueError("lengths is for padded input; a PackedSequence carries its own lengths")
    if not is_batched:
        raise ValueError("lengths needs batched (3-D) input")
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if lengths.dim() != 1 or lengths.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"lengths should be a 1-D int64 or int32 tensor, got a {lengths.dim()}-D {lengths.dtype} "
                         "tensor")
    batch = input.size(0 if batch_first else 1)
    if lengths.size(0) != batch:
        raise ValueError(f"Expected `len(lengths)` to be equal to batch_size, but got {lengths.size(0)} "
                         f"(batch_size={batch})")
    if lengths.device.type != "cpu" and lengths.device != input.device:
        raise RuntimeError(f"lengths should be on the CPU or on the input's device ({input.device}), but is on "
                           f"{lengths.device}")
    return lengths


def _check_probability(name, p, meaning):
    """A variant's probability argument (0: the variant is off), worded like torch.nn's check of dropout."""
    if not isinstance(p, numbers.Number) or isinstance(p, bool) or not 0 <= p <= 1:
        raise ValueError(f"{name} should be a number in range [0, 1] representing the probability {meaning}, "
                         f"got {p!r}")
    return float(p)


def _check_zoneout(name, p):
    return _check_probability(name, p, "that a unit keeps its previous value")


def _variant_repr(module):
    """The extra_repr part of the variants beyond torch.nn that a layer or cell sets (none: torch.nn's repr)."""
    s = ", forget_bias={forget_bias}" if module.forget_bias is not None else ""
    for name in ("zoneout", "zoneout_cell", "weight_dropout", "recurrent_dropout", "input_dropout"):
        if getattr(module, name, 0):
            s += f", {name}={{{name}}}"
    if getattr(module, "reset_after", True) is False:
        s += ", reset_after=False"
    if module.layer_norm:
        s += ", layer_norm=True"
    return s


def _check_reset_after(reset_after):
    """reset_after (GRU only): True is torch.nn's GRU (the reset gate multiplies W_hn h + b_hn); False is Cho et
    al.'s original GRU and Keras' reset_after=False (the reset gate multiplies h before W_hn)."""
    if not isinstance(reset_after, bool):
        raise TypeError(f"reset_after should be of type bool, got: {type(reset_after).__name__}")
    return reset_after


def _check_layer_norm(layer_norm, mode, proj_size=0, reset_after=True):
    """layer_norm: the LayerNorm LSTM/GRU (README, "layer_norm"): LayerNorm on the input projection and on the
    recurrent product (and the LSTM's cell state), each with its own gain and bias. Combinations the kernels do
    not compute are refused here."""
    if not isinstance(layer_norm, bool):
        raise TypeError(f"layer_norm should be of type bool, got: {type(layer_norm).__name__}")
    if layer_norm and proj_size > 0:
        raise ValueError("layer_norm with proj_size is not supported: the fused kernels normalise the cell's "
                         "own state, which a projection changes")
    if layer_norm and not reset_after:
        raise ValueError("layer_norm with reset_after=False is not supported: its recurrent product of r * h "
                         "cannot be normalised with the other gates' before r is known")
    return layer_norm


def _layer_norm_parts(mode, hidden_size):
    """The norms of the LayerNorm cell and their sizes, in the order of the ops' layer_norm tensor."""
    gates = {"LSTM": 4, "GRU": 3}[mode] * hidden_size
    return [("ih", gates), ("hh", gates)] + ([("cell", hidden_size)] if mode == "LSTM" else [])


def _register_layer_norm(module, mode, hidden_size, suffix, factory_kwargs):
    """Registers the LayerNorm cell's gains and biases, layer_norm_{ih,hh,cell}_{weight,bias}{suffix} (as
    torch.nn.LayerNorm names them), and returns their names."""
    names = []
    for part, size in _layer_norm_parts(mode, hidden_size):
        for kind in ("weight", "bias"):
            name = f"layer_norm_{part}_{kind}{suffix}"
            module.register_parameter(name, nn.Parameter(torch.empty(size, **factory_kwargs)))
            names.append(name)
    return names


def _layer_norm_tensor(module, names):
    """The ops' layer_norm argument [2, columns] from the parameters `names` (gain, bias of each norm)."""
    params = [getattr(module, name) for name in names]
    return torch.stack([torch.cat(params[0::2]), torch.cat(params[1::2])])


@torch.no_grad()
def _reset(module, stdv):
    """torch.nn's initialisation of every torch.nn parameter (in registration order, so the same seed gives
    torch.nn's weights), and torch.nn.LayerNorm's of the layer_norm ones: gain 1, bias 0."""
    for name, param in module.named_parameters():
        if not name.startswith("layer_norm_"):
            nn.init.uniform_(param, -stdv, stdv)
        elif "_weight" in name:
            param.fill_(1.0)
        else:
            param.zero_()


def _keep(p, training, input, size):
    """A cell's zoneout keep values for one step ([B, size]), or None."""
    return _ops.zoneout_keep(p, training, input.unsqueeze(0), size) if p else None


def _check_no_empty_sequence(input, batch_sizes, batch_first):
    if batch_sizes is None and input.size(1 if batch_first else 0) == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")


class _RNNBase(nn.Module):
    """Shared by LSTM and GRU: construction, parameters and the checks torch.nn's RNNBase performs."""

    __constants__ = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size"]

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, forget_bias=None, zoneout=0.0,
                 zoneout_cell=0.0, weight_dropout=0.0, recurrent_dropout=0.0, input_dropout=0.0, layer_norm=False):
        super().__init__()
        self.layer_norm = _check_layer_norm(layer_norm, mode, proj_size, getattr(self, "reset_after", True))
        self.forget_bias = _check_forget_bias(forget_bias, bias)
        self.zoneout = _check_zoneout("zoneout", zoneout)
        self.zoneout_cell = _check_zoneout("zoneout_cell", zoneout_cell)
        self.weight_dropout = _check_probability("weight_dropout", weight_dropout, "of a recurrent weight being zeroed")
        self.recurrent_dropout = _check_probability("recurrent_dropout", recurrent_dropout,
                                                    "of a unit of the recurrent state being zeroed (per sequence)")
        self.input_dropout = _check_probability("input_dropout", input_dropout,
                                                "of an input feature being zeroed (per sequence)")
        if proj_size > 0 and self.recurrent_dropout:
            raise ValueError("recurrent_dropout with proj_size is not supported: the fused kernels mask the state "
                             "the recurrence reads, which a projection changes")
        if proj_size > 0 and (self.zoneout or self.zoneout_cell):
            raise ValueError("zoneout with proj_size is not supported: the fused kernels apply zoneout to the "
                             "state the recurrence reads, which a projection changes")
        factory_kwargs = {"device": device, "dtype": dtype}
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}", stacklevel=3)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        gate_size = {"LSTM": 4, "GRU": 3}[mode] * hidden_size
        directions = 2 if bidirectional else 1
        state_size = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names = []
        self._all_weights = []
        self._layer_norm_names = []  # per layer and direction, with layer_norm
        for layer in range(num_layers):
            for direction in range(directions):
                layer_input_size = input_size if layer == 0 else state_size * directions
                suffix = "_reverse" if direction == 1 else ""
                shapes = [("weight_ih", (gate_size, layer_input_size)), ("weight_hh", (gate_size, state_size))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                names = []
                for kind, shape in shapes:
                    name = f"{kind}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
                if self.layer_norm:
                    self._layer_norm_names.append(
                        _register_layer_norm(self, mode, hidden_size, f"_l{layer}{suffix}", factory_kwargs))
        self.reset_parameters()

    @property
    def _flat_weights(self):
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self):
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self):
        """No-op, kept for code written for torch.nn (gatedrnn re-lays weights out per call when needed)."""

    def reset_parameters(self):
        _reset(self, 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0)
        if self.forget_bias is not None:
            for names in self._all_weights:
                _set_forget_bias(getattr(self, names[2]), getattr(self, names[3]), self.hidden_size, self.forget_bias)

    def extra_repr(self):
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return (s + _variant_repr(self)).format(**self.__dict__)

    # ----------------------------------------------------------------------------- torch.nn's checks
    def check_input(self, input, batch_sizes):
        weight = self.weight_ih_l0
        if input.device != weight.device:
            raise RuntimeError("Input and parameter tensors are not at the same device, found input tensor at "
                               f"{input.device} and parameter tensor at {weight.device}")
        weight_dtype = weight.dtype
        if input.dtype != weight_dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                             f"Convert input: input.to({weight_dtype}), or convert model: model.to({input.dtype})")
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {input.size(-1)}")

    def _batch_size(self, input, batch_sizes):
        if batch_sizes is not None:
            return int(batch_sizes[0])
        return input.size(0) if self.batch_first else input.size(1)

    def get_expected_hidden_size(self, input, batch_sizes):
        directions = 2 if self.bidirectional else 1
        state_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (self.num_layers * directions, self._batch_size(input, batch_sizes), state_size)

    def check_hidden_size(self, hx, expected_hidden_size, msg="Expected hidden size {}, got {}"):
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    @staticmethod
    def _check_hidden_device(input, hidden):
        for hx in hidden:
            if hx.device != input.device:
                raise RuntimeError("Input and hidden tensors are not at the same device, found input tensor at "
                                   f"{input.device} and hidden tensor at {hx.device}")

    def _zero_state(self, input, batch, size):
        directions = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * directions, batch, size, dtype=input.dtype, device=input.device)

    def _unpack(self, input):
        """Returns (time-major data, batch_sizes, sorted_indices, unsorted_indices, is_batched)."""
        if torch.onnx.is_in_onnx_export():
            self._check_onnx_export(input)
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            return data, batch_sizes, sorted_indices, unsorted_indices, True
        if input.dim() not in (2, 3):
            raise ValueError(f"{self.mode}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        return input, None, None, None, input.dim() == 3

    def _run(self, input, batch_sizes, states, lengths=None):
        """Runs the layers on checked input (batch-first when batch_first) and returns (output, final states)."""
        if batch_sizes is None and self.batch_first:
            input = input.transpose(0, 1)
        kwargs = dict(bias=self.bias, num_layers=self.num_layers, bidirectional=self.bidirectional,
                      dropout=self.dropout, training=self.training, lengths=lengths,
                      weight_dropout=self.weight_dropout, recurrent_dropout=self.recurrent_dropout,
                      input_dropout=self.input_dropout)
        if self.layer_norm:
            kwargs["layer_norms"] = [_layer_norm_tensor(self, names) for names in self._layer_norm_names]
        if self.mode == "LSTM":
            output, finals = functional.lstm(input, batch_sizes, *states, self._flat_weights,
                                             proj=self.proj_size > 0, zoneout=self.zoneout,
                                             zoneout_cell=self.zoneout_cell, **kwargs)
        else:
            output, hy = functional.gru(input, batch_sizes, *states, self._flat_weights, zoneout=self.zoneout,
                                        reset_after=self.reset_after, **kwargs)
            finals = (hy,)
        if batch_sizes is None and self.batch_first:
            output = output.transpose(0, 1)
        return output, finals

    def _check_onnx_export(self, input):
        """Under torch.onnx.export: the layers export as ONNX LSTM/GRU nodes (gatedrnn/_onnx.py); what those
        nodes cannot express is refused here, by name, rather than exported wrong."""
        _onnx.check_export(projection=self.proj_size > 0, packed=isinstance(input, PackedSequence),
                           zoneout=bool(self.zoneout or self.zoneout_cell), layer_norm=self.layer_norm)


def _permute(states, permutation):
    if permutation is None:
        return states
    return tuple(s.index_select(1, permutation) for s in states)


def _wrap_output(output, batch_sizes, sorted_indices, unsorted_indices):
    if batch_sizes is None:
        return output
    return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)


class LSTM(_RNNBase):
    """Drop-in replacement for torch.nn.LSTM (same arguments, parameters, inputs and outputs). layer_norm=True (a
    keyword argument) is the LayerNorm LSTM: LayerNorm on the input projection, the recurrent product and the
    cell state, with parameters of its own after torch.nn's."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    def get_expected_cell_size(self, input, batch_sizes):
        directions = 2 if self.bidirectional else 1
        return (self.num_layers * directions, self._batch_size(input, batch_sizes), self.hidden_size)

    def check_forward_args(self, input, hidden, batch_sizes):
        self.check_input(input, batch_sizes)
        self._check_hidden_device(input, hidden)
        self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def forward(self, input, hx=None, lengths=None):
        """torch.nn.LSTM's forward. `lengths` (optional, padded input only): one length per batch row; each
        row then runs as its own sequence of that many steps, exactly as the packed path would run it: outputs
        past its length are zero, its final state is its own last step's, and in reverse it starts at its own
        last element. Lengths must be in [1, seq_len]."""
        data, batch_sizes, sorted_indices, unsorted_indices, is_batched = self._unpack(input)
        lengths = _check_lengths(lengths, data, batch_sizes, is_batched, self.batch_first)
        state_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if batch_sizes is None:
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                data = data.unsqueeze(batch_dim)
            if hx is not None:
                expected = 3 if is_batched else 2
                if hx[0].dim() != expected or hx[1].dim() != expected:
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    raise RuntimeError(f"For {kind} input, hx and cx should also be {expected}-D but got "
                                       f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                if not is_batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        batch = self._batch_size(data, batch_sizes)
        if hx is None:
            hx = (self._zero_state(data, batch, state_size), self._zero_state(data, batch, self.hidden_size))
        self.check_forward_args(data, hx, batch_sizes)
        _check_no_empty_sequence(data, batch_sizes, self.batch_first)
        hx = _permute(hx, sorted_indices)
        output, (hy, cy) = self._run(data, batch_sizes, hx, lengths)
        hy, cy = _permute((hy, cy), unsorted_indices)
        if batch_sizes is None and not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hy, cy = hy.squeeze(1), cy.squeeze(1)
        return _wrap_output(output, batch_sizes, sorted_indices, unsorted_indices), (hy, cy)


class GRU(_RNNBase):
    """Drop-in replacement for torch.nn.GRU (same arguments, parameters, inputs and outputs). reset_after=False
    (a keyword argument) runs Cho et al.'s GRU on the same parameters. layer_norm=True (with reset_after=True)
    adds LayerNorm on the input projection and the recurrent product, with parameters of its own."""

    def __init__(self, *args, reset_after=True, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if "forget_bias" in kwargs:
            raise TypeError("forget_bias is an LSTM argument: a GRU has no forget gate")
        if "zoneout_cell" in kwargs:
            raise TypeError("zoneout_cell is an LSTM argument: a GRU has no cell state (use zoneout)")
        self.reset_after = _check_reset_after(reset_after)
        super().__init__("GRU", *args, **kwargs)

    def check_forward_args(self, input, hidden, batch_sizes):
        self.check_input(input, batch_sizes)
        self._check_hidden_device(input, (hidden,))
        self.check_hidden_size(hidden, self.get_expected_hidden_size(input, batch_sizes))

    def forward(self, input, hx=None, lengths=None):
        """torch.nn.GRU's forward, with `lengths` as in gatedrnn.LSTM.forward."""
        data, batch_sizes, sorted_indices, unsorted_indices, is_batched = self._unpack(input)
        lengths = _check_lengths(lengths, data, batch_sizes, is_batched, self.batch_first)
        if batch_sizes is None:
            if not is_batched:
                data = data.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                expected = 3 if is_batched else 2
                if hx.dim() != expected:
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    raise RuntimeError(f"For {kind} input, hx should also be {expected}-D but got "
                                       f"{hx.dim()}-D tensor")
                if not is_batched:
                    hx = hx.unsqueeze(1)
        if hx is None:
            hx = self._zero_state(data, self._batch_size(data, batch_sizes), self.hidden_size)
        self.check_forward_args(data, hx, batch_sizes)
        _check_no_empty_sequence(data, batch_sizes, self.batch_first)
        (hx,) = _permute((hx,), sorted_indices)
        output, (hy,) = self._run(data, batch_sizes, (hx,), lengths)
        (hy,) = _permute((hy,), unsorted_indices)
        if batch_sizes is None and not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hy = hy.squeeze(1)
        return _wrap_output(output, batch_sizes, sorted_indices, unsorted_indices), hy


# --------------------------------------------------------------------------------------------- cells
class _CellBase(nn.Module):
    """Shared by LSTMCell and GRUCell: torch.nn.RNNCellBase's parameters, init and checks."""

    def __init__(self, name, input_size, hidden_size, bias, num_chunks, device=None, dtype=None, forget_bias=None,
                 zoneout=0.0, zoneout_cell=0.0, layer_norm=False):
        super().__init__()
        mode = name[:-len("Cell")]
        self.layer_norm = _check_layer_norm(layer_norm, mode, reset_after=getattr(self, "reset_after", True))
        self.forget_bias = _check_forget_bias(forget_bias, bias)
        self.zoneout = _check_zoneout("zoneout", zoneout)
        self.zoneout_cell = _check_zoneout("zoneout_cell", zoneout_cell)
        factory_kwargs = {"device": device, "dtype": dtype}
        self._name = name
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((num_chunks * hidden_size, input_size), **factory_kwargs))
        self.weight_hh = nn.Parameter(torch.empty((num_chunks * hidden_size, hidden_size), **factory_kwargs))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self._layer_norm_names = (_register_layer_norm(self, mode, hidden_size, "", factory_kwargs)
                                  if self.layer_norm else [])
        self.reset_parameters()

    def extra_repr(self):
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        return (s + _variant_repr(self)).format(**self.__dict__)

    def reset_parameters(self):
        _reset(self, 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0)
        if self.forget_bias is not None:
            _set_forget_bias(self.bias_ih, self.bias_hh, self.hidden_size, self.forget_bias)

    def _check_input_dim(self, input):
        if input.dim() not in (1, 2):
            raise ValueError(f"{self._name}: Expected input to be 1D or 2D, got {input.dim()}D instead")

    def _check_sizes(self, input, states):
        """The checks torch.nn's fused cell ops make, with their messages."""
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        for index, state in enumerate(states):
            if input.size(0) != state.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{index} batch size "
                                   f"{state.size(0)}")
            if state.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{index} has inconsistent hidden_size: got {state.size(1)}, expected "
                                   f"{self.hidden_size}")

    def _layer_norm_arg(self):
        return _layer_norm_tensor(self, self._layer_norm_names) if self.layer_norm else None

    def _zeros(self, input):
        return torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)

    def _empty_state(self, input, hx):
        """The [B, 0] state of a cell with hidden_size 0 (torch.nn's cells allow it; its layers do not). There is
        no step to compute, so no kernel runs: the result is the products torch.nn forms, all empty, which keep
        the autograd graph (the input's gradient is zeros, as torch.nn's)."""
        state = input @ self.weight_ih.t() + hx @ self.weight_hh.t()
        if self.bias:
            state = state + self.bias_ih + self.bias_hh
        return state


class LSTMCell(_CellBase):
    """Drop-in replacement for torch.nn.LSTMCell: one step, run by the fused LSTM op with T = 1."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, forget_bias=None, zoneout=0.0,
                 zoneout_cell=0.0, layer_norm=False):
        super().__init__("LSTMCell", input_size, hidden_size, bias, 4, device=device, dtype=dtype,
                         forget_bias=forget_bias, zoneout=zoneout, zoneout_cell=zoneout_cell, layer_norm=layer_norm)

    def forward(self, input, hx=None):
        self._check_input_dim(input)
        if hx is not None:
            for index, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = (self._zeros(input), self._zeros(input))
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        self._check_sizes(input, hx)
        if self.hidden_size == 0:
            hy, cy = self._empty_state(input, hx[0]), self._empty_state(input, hx[1])
            return (hy, cy) if is_batched else (hy.squeeze(0), cy.squeeze(0))
        if torch.onnx.is_in_onnx_export():
            _onnx.check_export(zoneout=bool(self.zoneout or self.zoneout_cell), layer_norm=self.layer_norm)
        size = self.hidden_size
        _, hy, cy = _ops.lstm_layer(input.unsqueeze(0), None, hx[0], hx[1], self.weight_ih, self.weight_hh,
                                    self.bias_ih, self.bias_hh, None, False, None,
                                    _keep(self.zoneout, self.training, input, size),
                                    _keep(self.zoneout_cell, self.training, input, size),
                                    layer_norm=self._layer_norm_arg())
        if not is_batched:
            hy, cy = hy.squeeze(0), cy.squeeze(0)
        return hy, cy


class GRUCell(_CellBase):
    """Drop-in replacement for torch.nn.GRUCell: one step, run by the fused GRU op with T = 1."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, zoneout=0.0, reset_after=True,
                 layer_norm=False):
        self.reset_after = _check_reset_after(reset_after)
        super().__init__("GRUCell", input_size, hidden_size, bias, 3, device=device, dtype=dtype, zoneout=zoneout,
                         layer_norm=layer_norm)

    def forward(self, input, hx=None):
        self._check_input_dim(input)
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = self._zeros(input)
        elif not is_batched:
            hx = hx.unsqueeze(0)
        self._check_sizes(input, (hx,))
        if self.hidden_size == 0:
            hy = self._empty_state(input, hx)
            return hy if is_batched else hy.squeeze(0)
        if torch.onnx.is_in_onnx_export():
            _onnx.check_export(zoneout=bool(self.zoneout), layer_norm=self.layer_norm)
        _, hy = _ops.gru_layer(input.unsqueeze(0), None, hx, self.weight_ih, self.weight_hh, self.bias_ih,
                               self.bias_hh, False, None, _keep(self.zoneout, self.training, input, self.hidden_size),
                               reset_after=self.reset_after, layer_norm=self._layer_norm_arg())
        return hy if is_batched else hy.squeeze(0)
