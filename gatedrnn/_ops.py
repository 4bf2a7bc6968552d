"""Python face of the compiled ops: fake (meta) kernels for torch.compile, and autograd.

The ops are defined in csrc/gatedrnn.cpp. Each forward op covers one layer and direction over a whole
sequence; `register_autograd` routes its backward to our own backward op, so autograd never sees the
per-step math. The functions at the bottom are what gatedrnn.functional calls.
"""
import functools
import warnings

import torch

from . import _extension  # noqa: F401  (loads the library that defines torch.ops.gatedrnn)

_ops = torch.ops.gatedrnn


def _compute_dtype(dtype):
    # Must agree with the kernels (at::toOpMathType; check_saved() in csrc/checks.h): saved activations are
    # kept in float32 for half/bfloat16 storage, on every device.
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _output_shape(input, state_size):
    return (*input.shape[:-1], state_size)


def _dense_like(t):
    # The kernels always return contiguous tensors, whatever the strides of their inputs.
    return t.new_empty(t.shape)


def _rows(input):
    # With lengths, saved activations keep T * B rows too (csrc/padded.h), so no shape depends on the lengths.
    return input.shape[0] if input.dim() == 2 else input.shape[0] * input.shape[1]


# Saved columns per row with layer_norm (csrc/layer_norm.h): the plain cell's, then the norms' x^ and rstd.
def _lstm_norm_cells_width(hidden):
    return 10 * hidden + 3


def _gru_norm_saved_width(hidden):
    return 10 * hidden + 2


# ----------------------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("gatedrnn::lstm_forward")
def _lstm_forward_fake(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse,
                       save_for_backward, lengths=None, zoneout=None, zoneout_cell=None, weight_hh_mask=None,
                       recurrent_mask=None, input_mask=None, layer_norm=None):
    hidden = weight_ih.shape[0] // 4
    state = hx.shape[-1]
    saved_dtype = _compute_dtype(input.dtype)
    rows = _rows(input)
    output = input.new_empty(_output_shape(input, state))
    if save_for_backward:
        gates = input.new_empty((rows, 4 * hidden), dtype=saved_dtype)
        cells_width = hidden if layer_norm is None else _lstm_norm_cells_width(hidden)
        cells = input.new_empty((rows, cells_width), dtype=saved_dtype)
    else:
        gates = input.new_empty((0,), dtype=saved_dtype)
        cells = input.new_empty((0,), dtype=saved_dtype)
    return output, _dense_like(hx), _dense_like(cx), gates, cells


def _grad_or_empty(wanted, like):
    # What the backward ops return for a gradient: dense like its tensor, or empty when not asked for.
    return _dense_like(like) if wanted else like.new_empty((0,))


@torch.library.register_fake("gatedrnn::lstm_backward")
def _lstm_backward_fake(grad_output, grad_hy, grad_cy, input, batch_sizes, hx, cx, weight_ih, weight_hh, weight_hr,
                        output, gates, cells, reverse, output_mask, lengths=None, zoneout=None, zoneout_cell=None,
                        weight_hh_mask=None, recurrent_mask=None, input_mask=None, layer_norm=None):
    want_input, want_weights, want_bias = output_mask
    hidden = weight_ih.shape[0] // 4
    grad_bias = input.new_empty((4 * hidden,) if want_bias else (0,))
    grad_weight_hr = _dense_like(weight_hr) if weight_hr is not None and want_weights else input.new_empty((0,))
    return (_grad_or_empty(want_input, input), _dense_like(hx), _dense_like(cx),
            _grad_or_empty(want_weights, weight_ih), _grad_or_empty(want_weights, weight_hh), grad_bias,
            grad_weight_hr, _norm_grad_fake(input, layer_norm))


def _norm_grad_fake(input, layer_norm):
    # The backward ops always return the layer_norm tensor's gradient when they get one.
    return input.new_empty((0,)) if layer_norm is None else _dense_like(layer_norm)


@torch.library.register_fake("gatedrnn::gru_forward")
def _gru_forward_fake(input, batch_sizes, hx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, save_for_backward,
                      lengths=None, zoneout=None, weight_hh_mask=None, recurrent_mask=None, input_mask=None,
                      reset_after=True, layer_norm=None):
    hidden = weight_ih.shape[0] // 3
    width = 4 * hidden if layer_norm is None else _gru_norm_saved_width(hidden)
    saved_shape = (_rows(input), width) if save_for_backward else (0,)
    saved = input.new_empty(saved_shape, dtype=_compute_dtype(input.dtype))
    return input.new_empty(_output_shape(input, hidden)), _dense_like(hx), saved


@torch.library.register_fake("gatedrnn::gru_backward")
def _gru_backward_fake(grad_output, grad_hy, input, batch_sizes, hx, weight_ih, weight_hh, output, saved, reverse,
                       output_mask, lengths=None, zoneout=None, weight_hh_mask=None, recurrent_mask=None,
                       input_mask=None, reset_after=True, layer_norm=None):
    want_input, want_weights, want_bias = output_mask
    hidden = weight_ih.shape[0] // 3
    bias_shape = (3 * hidden,) if want_bias else (0,)
    return (_grad_or_empty(want_input, input), _dense_like(hx), _grad_or_empty(want_weights, weight_ih),
            _grad_or_empty(want_weights, weight_hh), input.new_empty(bias_shape), input.new_empty(bias_shape),
            _norm_grad_fake(input, layer_norm))


# ----------------------------------------------------------------------------------------- autograd
def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _differentiable_backward(reference_layer, inputs, reverse, options, grad_outputs, extra_inputs, norm_at):
    """The backward of one layer as a differentiable computation, for create_graph=True (gradient penalties,
    double backward): the layer is recomputed with gatedrnn.reference and differentiated by autograd. The
    fused backward kernels compute first-order gradients only, so this path is slower, and says so. norm_at:
    the position of the op's layer_norm argument, whose gradient goes there."""
    warnings.warn("gatedrnn: differentiating through a gatedrnn layer's gradient (create_graph=True) runs the "
                  "layer's pure-PyTorch reference (gatedrnn.reference) for that backward, not the fused kernels; "
                  "it is correct but much slower.", stacklevel=2)
    with torch.enable_grad():
        outputs = reference_layer(*inputs, reverse, **options)
    differentiable = dict(enumerate(inputs))
    differentiable[norm_at] = options.get("layer_norm")
    wanted = [k for k, t in differentiable.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outputs, [differentiable[k] for k in wanted],
                                [_zeros_if_none(g, o) for g, o in zip(grad_outputs, outputs)],
                                create_graph=True, allow_unused=True)
    result = [None] * (len(inputs) + extra_inputs)  # + reverse, save_for_backward and the options
    for k, grad in zip(wanted, grads):
        result[k] = grad
    return tuple(result)


# The ops' optional tensor arguments after save_for_backward, in schema order (csrc/schemas.h): what the
# backward op and the differentiable backward get again.
_LSTM_OPTIONS = ("lengths", "zoneout", "zoneout_cell", "weight_hh_mask", "recurrent_mask", "input_mask", "layer_norm")
_GRU_OPTIONS = ("lengths", "zoneout", "weight_hh_mask", "recurrent_mask", "input_mask")


def _norm_needs_grad(needs, inputs):
    # layer_norm is the op's last argument; a call that left it out has fewer inputs.
    return len(needs) == inputs and needs[-1]


def _below_autograd(op, *args, **kwargs):
    """op(*args, **kwargs) past its autograd kernel, for a call where that kernel would only redispatch: grad
    mode is off (an autograd.Function's forward, a backward that is not itself differentiated) or no argument
    requires grad (an inference call). It is what torch.library's autograd wrapper does on that branch
    (torch/_library/autograd.py: redispatch_no_grad), without the wrapper's round trip through Python, which
    cost about 10 us of a 14 us LSTM cell step (B=1 H=128, AMD EPYC Zen 5)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args, **kwargs)


def _lstm_setup_context(ctx, inputs, output):
    input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, save, *options = inputs
    options += [None] * (len(_LSTM_OPTIONS) - len(options))  # the defaults, when the call left them out
    out, _, _, gates, cells = output
    ctx.reverse = reverse
    ctx.saved_forward = save
    ctx.mark_non_differentiable(gates, cells)
    # Undefined output gradients stay None: materialising zeros for the saved activations costs a pass
    # over N x 5H for nothing.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, out, gates,
                          cells, *options)  # see _LSTM_OPTIONS


def _lstm_backward(ctx, grad_output, grad_hy, grad_cy, _grad_gates, _grad_cells):
    if not ctx.saved_forward:
        raise RuntimeError("gatedrnn: lstm_forward was called with save_for_backward=False; it cannot be "
                           "differentiated. Call it with save_for_backward=True when gradients are needed.")
    input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, out, gates, cells, *options = \
        ctx.saved_tensors
    options = dict(zip(_LSTM_OPTIONS, options))
    if torch.is_grad_enabled():  # create_graph=True: this gradient will itself be differentiated
        from .reference import lstm_layer
        return _differentiable_backward(
            lstm_layer, [input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr], ctx.reverse,
            options, (grad_output, grad_hy, grad_cy), extra_inputs=2 + len(_LSTM_OPTIONS),
            norm_at=11 + _LSTM_OPTIONS.index("layer_norm"))
    # An absent bias or projection never needs a gradient, so the mask also says which are present.
    needs = ctx.needs_input_grad
    want_input, want_weights, want_bias = needs[0], needs[4] or needs[5] or needs[8], needs[6] or needs[7]
    grads = _below_autograd(
        _ops.lstm_backward, _zeros_if_none(grad_output, out), _zeros_if_none(grad_hy, hx),
        _zeros_if_none(grad_cy, cx), input, batch_sizes, hx, cx, weight_ih, weight_hh, weight_hr, out, gates, cells,
        ctx.reverse, [want_input, want_weights, want_bias], **options)
    d_input, d_hx, d_cx, d_w_ih, d_w_hh, d_bias, d_w_hr, d_norm = grads
    # Both biases enter the gates as a sum, so they get the same gradient.
    return (d_input if want_input else None, None, d_hx, d_cx, d_w_ih if want_weights else None,
            d_w_hh if want_weights else None, d_bias if want_bias else None, d_bias if want_bias else None,
            d_w_hr if needs[8] else None, None, None, *[None] * (len(_LSTM_OPTIONS) - 1),
            d_norm if _norm_needs_grad(needs, 11 + len(_LSTM_OPTIONS)) else None)


torch.library.register_autograd("gatedrnn::lstm_forward", _lstm_backward, setup_context=_lstm_setup_context)


def _gru_setup_context(ctx, inputs, output):
    input, batch_sizes, hx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, save, *options = inputs
    options, flags = options[:len(_GRU_OPTIONS)], options[len(_GRU_OPTIONS):]
    options += [None] * (len(_GRU_OPTIONS) - len(options))  # the defaults, when the call left them out
    ctx.reset_after = flags[0] if flags else True
    options.append(flags[1] if len(flags) > 1 else None)  # layer_norm, saved with the options
    out, _, saved = output
    ctx.reverse = reverse
    ctx.saved_forward = save
    ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)  # see _lstm_setup_context
    ctx.save_for_backward(input, batch_sizes, hx, weight_ih, weight_hh, bias_ih, bias_hh, out, saved,
                          *options)  # see _GRU_OPTIONS


def _gru_backward(ctx, grad_output, grad_hy, _grad_saved):
    if not ctx.saved_forward:
        raise RuntimeError("gatedrnn: gru_forward was called with save_for_backward=False; it cannot be "
                           "differentiated. Call it with save_for_backward=True when gradients are needed.")
    input, batch_sizes, hx, weight_ih, weight_hh, bias_ih, bias_hh, out, saved, *options = ctx.saved_tensors
    options = dict(zip(_GRU_OPTIONS + ("layer_norm",), options), reset_after=ctx.reset_after)
    if torch.is_grad_enabled():  # create_graph=True: this gradient will itself be differentiated
        from .reference import gru_layer
        return _differentiable_backward(
            lambda *args, **options: gru_layer(*args[:-1], None, args[-1], **options),
            [input, batch_sizes, hx, weight_ih, weight_hh, bias_ih, bias_hh], ctx.reverse,
            options, (grad_output, grad_hy), extra_inputs=4 + len(_GRU_OPTIONS),
            norm_at=10 + len(_GRU_OPTIONS))
    needs = ctx.needs_input_grad  # an absent bias never needs a gradient
    want_input, want_weights, want_bias = needs[0], needs[3] or needs[4], needs[5] or needs[6]
    d_input, d_hx, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_norm = _below_autograd(
        _ops.gru_backward, _zeros_if_none(grad_output, out), _zeros_if_none(grad_hy, hx), input, batch_sizes, hx,
        weight_ih, weight_hh, out, saved, ctx.reverse, [want_input, want_weights, want_bias], **options)
    return (d_input if want_input else None, None, d_hx, d_w_ih if want_weights else None,
            d_w_hh if want_weights else None, d_b_ih if want_bias else None, d_b_hh if want_bias else None, None,
            None, *[None] * len(_GRU_OPTIONS), None,
            d_norm if _norm_needs_grad(needs, 11 + len(_GRU_OPTIONS)) else None)  # ..., reset_after, layer_norm


torch.library.register_autograd("gatedrnn::gru_forward", _gru_backward, setup_context=_gru_setup_context)


def _eager_function(name, op, setup_context, backward):
    """An autograd.Function that runs `op` with its registered setup_context and backward, for eager training
    calls.

    With grad mode on, torch.library's autograd wrapper of an op first refills the arguments the dispatcher
    dropped as defaults (torch._library.utils.fill_defaults), reading the schema's argument list once per
    argument: with these ops' 16-18 arguments, about 50 us per call before anything runs (the op itself takes
    about 14 us for a B=1 H=128 LSTM cell step; pytorch/pytorch#195110 proposes the fix). This Function calls
    the op below autograd (_below_autograd) and applies the same setup_context and backward.

    Its forward takes ctx and calls setup_context itself: a Function with a separate setup_context has
    autograd.Function.apply bind the forward's arguments by inspect.signature on every call (about 11 us of a
    cell step, measured as above). Under torch.compile and torch.export the op is called as it is, and its
    registration (autograd, fake kernel) serves them."""

    def forward(ctx, *inputs):
        output = _below_autograd(op, *inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward), "__doc__": f"{op}'s eager "
                 "training Function (_eager_function)."})


_EagerLstm = _eager_function("_EagerLstm", _ops.lstm_forward, _lstm_setup_context, _lstm_backward)
_EagerGru = _eager_function("_EagerGru", _ops.gru_forward, _gru_setup_context, _gru_backward)


def _forward_op(op, eager_function, save):
    """What a layer calls: under torch.compile the op itself (its registration serves the tracer); in eager
    mode the op's eager Function for a call that saves for backward, else the op below autograd (a call that
    saves nothing has no argument that requires grad, or runs with grad mode off)."""
    if torch.compiler.is_compiling():
        return op
    return eager_function.apply if save else functools.partial(_below_autograd, op)


def _double_backward_unsupported(ctx, *grads):
    raise RuntimeError(
        "gatedrnn: the backward ops (torch.ops.gatedrnn.*_backward) are not differentiable. Differentiating a "
        "gatedrnn layer's gradient works through the layers (gatedrnn.LSTM/GRU, gatedrnn._ops.*_layer), which "
        "switch to a differentiable path when create_graph=True.")


def _no_context(ctx, inputs, output):
    pass


# The backward ops are differentiable in name only: called directly under grad mode they would otherwise fail
# deep inside a kernel; this makes a second differentiation through them fail with a clear message instead.
torch.library.register_autograd("gatedrnn::lstm_backward", _double_backward_unsupported, setup_context=_no_context)
torch.library.register_autograd("gatedrnn::gru_backward", _double_backward_unsupported, setup_context=_no_context)


# ----------------------------------------------------------------------------------------- entry points
def _devices_with_kernels():
    from ._extension import backend_info

    info = backend_info()
    # "meta" runs the fake kernels above (shape propagation, torch.compile tracing).
    return {"meta"} | {device for device in ("cpu", "cuda") if info[device]}


_KERNEL_DEVICES = _devices_with_kernels()


def _check_devices(input, **tensors):
    device = input.device  # once: each .device makes a new torch.device (about 0.2 us at a cell's step)
    if device.type not in _KERNEL_DEVICES:
        raise NotImplementedError(
            f"gatedrnn has no fused kernels for {device.type} tensors in this build "
            f"(it has: {', '.join(sorted(_KERNEL_DEVICES - {'meta'}))}; see gatedrnn.backend_info()). "
            "gatedrnn does not fall back to another implementation.")
    # The kernels check this too, but a meta tensor among CPU ones would reach the shape-only fake kernel.
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise RuntimeError(f"gatedrnn: expected {name} on {device} (the input's device), "
                               f"but it is on {t.device}")


def _needs_saving(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast_enabled(device):
    return device in ("cpu", "cuda") and torch.is_autocast_enabled(device)


def _autocast_dtype(input, always):
    """The dtype autocast runs a layer in, or None to run it as it is. torch.nn's policy: on CUDA its RNNs run
    in the autocast dtype; on the CPU its LSTM does, and its GRU keeps float32 input in float32 (`always`
    is False for the CPU GRU: only an input already in lower precision makes it cast)."""
    device = input.device.type
    if not _autocast_enabled(device):
        return None
    if not always and device == "cpu" and input.dtype == torch.float32:
        return None
    return torch.get_autocast_dtype(device)


def _call_without_autocast(op, input, tensors, dtype, *flags):
    """Calls op(*tensors, *flags), the tensors cast to `dtype` when given, with autocast off inside (the
    kernels' own float32 GEMMs must stay float32)."""
    if dtype is not None:
        tensors = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]
    device = input.device.type
    if not _autocast_enabled(device):
        return op(*tensors, *flags)
    with torch.autocast(device, enabled=False):
        return op(*tensors, *flags)


def zoneout_keep(p, training, input, size):
    """Zoneout keep values (csrc/cells.h) for one layer and direction over `input` (dense or packed rows), or
    None when p is 0: in training a fresh draw per row, unit and step, 1 with probability p, from torch's
    generator (torch.manual_seed reproduces it); in evaluation p itself, broadcast without memory."""
    if not p:
        return None
    dtype = _compute_dtype(input.dtype)
    if training:  # rand < p: a third of bernoulli_'s time on the CPU, the same distribution
        return torch.rand(_rows(input), size, dtype=dtype, device=input.device).lt_(p)
    return torch.full((1, 1), p, dtype=dtype, device=input.device).expand(_rows(input), size)


def weight_dropout_mask(p, training, weight_hh):
    """A DropConnect mask for one layer and direction's W_hh and one call (AWD-LSTM's weight dropout), or None
    outside training or when p is 0: each weight kept with probability 1 - p and scaled by 1 / (1 - p), as
    torch.nn.functional.dropout does, from torch's generator."""
    if not p or not training:
        return None
    if p == 1:
        return torch.zeros_like(weight_hh, requires_grad=False)
    return torch.rand_like(weight_hh, requires_grad=False).ge_(p).div_(1 - p)


def sequence_dropout_mask(p, training, batch, size, dtype, device):
    """A variational dropout mask [batch, size] (Keras' dropout and recurrent_dropout, Gal & Ghahramani 2016):
    one draw per sequence and unit, held over all steps, each kept with probability 1 - p and scaled by
    1 / (1 - p); None outside training or when p is 0."""
    if not p or not training:
        return None
    if p == 1:
        return torch.zeros(batch, size, dtype=dtype, device=device)
    return torch.rand(batch, size, dtype=dtype, device=device).ge_(p).div_(1 - p)


def _keep_for(keep, dtype):
    # Keep values are in the op-math dtype of the dtype the op runs in (autocast may change it).
    return None if keep is None else keep.to(_compute_dtype(dtype))


def _mask_for(mask, dtype):
    # A weight dropout mask is in the dtype the weights run in (autocast casts them with the input).
    return None if mask is None else mask.to(dtype)


def lstm_layer(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths=None,
               zoneout=None, zoneout_cell=None, weight_hh_mask=None, recurrent_mask=None, input_mask=None,
               layer_norm=None):
    """One LSTM layer and direction. Returns (output, hy, cy). zoneout, zoneout_cell: keep values
    (zoneout_keep) or None; weight_hh_mask: a weight dropout mask (weight_dropout_mask) or None;
    recurrent_mask, input_mask: variational dropout masks (sequence_dropout_mask) or None; layer_norm: the
    LayerNorm cell's [2, 9H] gains and biases (csrc/layer_norm.h), or None."""
    _check_devices(input, hx=hx, cx=cx, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih,
                   bias_hh=bias_hh, weight_hr=weight_hr, zoneout=zoneout, zoneout_cell=zoneout_cell,
                   weight_hh_mask=weight_hh_mask, recurrent_mask=recurrent_mask, input_mask=input_mask,
                   layer_norm=layer_norm)
    save = _needs_saving(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, layer_norm)
    tensors = [input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr]
    dtype = _autocast_dtype(input, always=True)
    runs_in = dtype or input.dtype
    output, hy, cy, _, _ = _call_without_autocast(_forward_op(_ops.lstm_forward, _EagerLstm, save), input, tensors,
                                                  dtype, reverse, save, lengths,
                                                  _keep_for(zoneout, runs_in), _keep_for(zoneout_cell, runs_in),
                                                  _mask_for(weight_hh_mask, runs_in),
                                                  _keep_for(recurrent_mask, runs_in), _mask_for(input_mask, runs_in),
                                                  _mask_for(layer_norm, runs_in))
    return output, hy, cy


def gru_layer(input, batch_sizes, hx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, lengths=None, zoneout=None,
              weight_hh_mask=None, recurrent_mask=None, input_mask=None, reset_after=True, layer_norm=None):
    """One GRU layer and direction. Returns (output, hy). zoneout: keep values (zoneout_keep) or None;
    weight_hh_mask: a weight dropout mask (weight_dropout_mask) or None; recurrent_mask, input_mask: variational
    dropout masks (sequence_dropout_mask) or None; reset_after=False: Cho et al.'s GRU, the reset gate applied
    to h_{t-1} before W_hn; layer_norm: the LayerNorm cell's [2, 6H] gains and biases (csrc/layer_norm.h), or
    None."""
    _check_devices(input, hx=hx, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh,
                   zoneout=zoneout, weight_hh_mask=weight_hh_mask, recurrent_mask=recurrent_mask,
                   input_mask=input_mask, layer_norm=layer_norm)
    save = _needs_saving(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, layer_norm)
    tensors = [input, batch_sizes, hx, weight_ih, weight_hh, bias_ih, bias_hh]
    dtype = _autocast_dtype(input, always=False)
    output, hy, _ = _call_without_autocast(_forward_op(_ops.gru_forward, _EagerGru, save), input, tensors, dtype,
                                           reverse, save, lengths,
                                           _keep_for(zoneout, dtype or input.dtype),
                                           _mask_for(weight_hh_mask, dtype or input.dtype),
                                           _keep_for(recurrent_mask, dtype or input.dtype),
                                           _mask_for(input_mask, dtype or input.dtype), reset_after,
                                           _mask_for(layer_norm, dtype or input.dtype))
    return output, hy
