"""ONNX export: gatedrnn's ops as standard ONNX LSTM and GRU nodes.

torch.onnx.export(model, args, dynamo=True) traces a model into gatedrnn::lstm_forward / gru_forward nodes,
one per layer and direction, and translates each node with a function from onnxscript's torch_lib registry,
which the exporter reads before it traces. gatedrnn's translations are added to that registry as soon as the
registry's module is imported (by the exporter, or by anything else; at `import gatedrnn` if it already was),
so a plain torch.onnx.export call needs nothing more, and `import gatedrnn` does not import onnxscript (which
would double its import time). Each translation is one ONNX node with torch.nn's semantics: the LSTM's gates
reordered from torch's i, f, g, o to ONNX's i, o, f, c; the GRU's from r, z, n to z, r, h, with
linear_before_reset=1 (torch's GRU applies the reset gate after W_hn h + b_hn), or 0 for reset_after=False
(the reset gate multiplies h before W_hn: ONNX's default GRU). Batch and sequence length stay dynamic.
Padded input with `lengths` becomes the node's sequence_lens, which has the same meaning (zero
outputs past a sequence's length, final states from its own last step, reverse from its own last element).
Projections and packed input have no standard node: the modules refuse them by name when they
see an export in progress, and the translations refuse them too (an export whose capture does not run the
modules' Python still reaches those), so a wrong graph never comes out.
"""
import importlib.abc
import importlib.util
import sys

# Why ONNX export cannot work in this process, or None once the translations are registered.
_unavailable = "not registered yet"
_SIXTEEN_BIT = ("FLOAT16", "BFLOAT16")
# The module of onnxscript's torch_lib registry: the translations are registered once it has been imported.
_REGISTRY_MODULE = "onnxscript.function_libs.torch_lib.registration"


def register_translations():
    """Adds gatedrnn's op translations to onnxscript's registry, if onnxscript is installed: now if the
    registry's module is imported already, else right after its import (_RegisterAfterImport). Never raises:
    a failure is kept and reported by check_export() when an export is attempted."""
    global _unavailable
    if _unavailable is None:
        return
    if importlib.util.find_spec("onnxscript") is None:
        _unavailable = "onnxscript is not installed (pip install onnxscript)"
        return
    if _REGISTRY_MODULE not in sys.modules:
        if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())
        return
    try:
        from onnxscript import ir
        from onnxscript import opset18 as op
        from onnxscript.function_libs.torch_lib.registration import torch_op

        _define(op, ir, torch_op)
        _unavailable = None
    except Exception as e:  # an onnxscript whose registry API changed: export says so, import still works
        _unavailable = f"registering gatedrnn's ONNX translations with onnxscript failed: {type(e).__name__}: {e}"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """An import hook, used once: finds the registry's module as the other finders would, and has its loader
    call register_translations() just after running the module."""

    def find_spec(self, name, path=None, target=None):
        if name != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # before the search below, which must not come back here
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """A module's own loader, then register_translations() once the module has run."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register_translations()

    def __getattr__(self, name):  # get_source, get_data, ...: the module's own loader's
        return getattr(self._loader, name)


def check_export(projection=False, packed=False, zoneout=False, layer_norm=False):
    """Raises when an ONNX export cannot produce a correct graph: a feature ONNX's nodes lack (an LSTM
    projection, packed input, zoneout, layer_norm), or no translations in this process."""
    if projection:
        raise RuntimeError("gatedrnn: ONNX export of an LSTM with proj_size is not supported: ONNX's LSTM node "
                           "has no projection")
    if packed:
        raise RuntimeError("gatedrnn: ONNX export of PackedSequence input is not supported: export the model "
                           "with padded input and lengths= instead (it becomes the nodes' sequence_lens)")
    if zoneout:
        raise RuntimeError("gatedrnn: ONNX export of zoneout is not supported: ONNX's LSTM and GRU nodes cannot mix "
                           "the previous state into the new one (zoneout's evaluation-time expectation)")
    if layer_norm:
        raise RuntimeError("gatedrnn: ONNX export of layer_norm=True is not supported: ONNX's LSTM and GRU nodes "
                           "have no normalisation inside the recurrence")
    if _unavailable is not None:
        raise RuntimeError(f"gatedrnn: ONNX export is unavailable: {_unavailable}")


def _define(op, ir, torch_op):
    def reorder(tensor, blocks, order):
        """tensor's row blocks (gates) in a new order along axis 0. Slices, not one Split: the exporter's
        optimizer folds slices of the weights into new constants, and it leaves a multi-output Split alone."""
        rows = tensor.shape[0] // blocks
        return op.Concat(*[op.Slice(tensor, [k * rows], [(k + 1) * rows], [0]) for k in order], axis=0)

    def refuse_what_has_no_node(batch_sizes, weight_hr=None, zoneout=(), masks=(), layer_norm=None):
        # The modules refuse these before tracing; this guards the ops called directly, or traced by a
        # capture that does not run the modules' Python (a wrong graph must never come out).
        check_export(projection=weight_hr is not None, packed=batch_sizes is not None,
                     zoneout=any(z is not None for z in zoneout), layer_norm=layer_norm is not None)
        if any(m is not None for m in masks):
            raise RuntimeError("gatedrnn: ONNX export of a layer with dropout masks (training mode) is not "
                               "supported: export the model in evaluation mode (model.eval())")

    def bias(b_ih, b_hh, blocks, order):
        if b_ih is None:
            return None
        return op.Unsqueeze(op.Concat(reorder(b_ih, blocks, order), reorder(b_hh, blocks, order), axis=0), [0])

    def sequence_lens(lengths):
        return None if lengths is None else op.Cast(lengths, to=ir.DataType.INT32)

    def saved(input, like, columns, save):
        """The saved-activation outputs: inference graphs never read them, so zeros of their declared shape
        (rows x columns, float32 for 16-bit input) or empty when the op was traced without saving."""
        dtype = ir.DataType.FLOAT if input.dtype is not None and input.dtype.name in _SIXTEEN_BIT else None
        zero = op.Constant(value_float=0.0)
        zero = op.Cast(zero, to=dtype) if dtype is not None else op.CastLike(zero, like)
        if not save:
            return op.Expand(zero, op.Constant(value_ints=[0]))
        shape = op.Shape(input)
        rows = op.Mul(op.Slice(shape, [0], [1]), op.Slice(shape, [1], [2]))
        return op.Expand(zero, op.Concat(rows, op.Constant(value_ints=[columns]), axis=0))

    # Every tensor parameter has a default of None: the exporter matches the traced node's arguments against
    # this signature, and the optional ones (batch_sizes, biases, weight_hr) arrive as None.
    @torch_op("gatedrnn::lstm_forward", trace_only=True)
    def gatedrnn_lstm_forward(input, batch_sizes=None, hx=None, cx=None, weight_ih=None, weight_hh=None, bias_ih=None,
                              bias_hh=None, weight_hr=None, reverse: bool = False, save_for_backward: bool = False,
                              lengths=None, zoneout=None, zoneout_cell=None, weight_hh_mask=None,
                              recurrent_mask=None, input_mask=None, layer_norm=None):
        refuse_what_has_no_node(batch_sizes, weight_hr, (zoneout, zoneout_cell),
                                (weight_hh_mask, recurrent_mask, input_mask), layer_norm)
        hidden = weight_hh.shape[1]
        order = (0, 3, 1, 2)  # torch i, f, g, o -> ONNX i, o, f, c
        y, y_h, y_c = op.LSTM(input, op.Unsqueeze(reorder(weight_ih, 4, order), [0]),
                              op.Unsqueeze(reorder(weight_hh, 4, order), [0]), bias(bias_ih, bias_hh, 4, order),
                              sequence_lens(lengths), op.Unsqueeze(hx, [0]), op.Unsqueeze(cx, [0]),
                              direction="reverse" if reverse else "forward", hidden_size=hidden)
        hy, cy = op.Squeeze(y_h, [0]), op.Squeeze(y_c, [0])
        return (op.Squeeze(y, [1]), hy, cy, saved(input, hy, 4 * hidden, save_for_backward),
                saved(input, hy, hidden, save_for_backward))

    @torch_op("gatedrnn::gru_forward", trace_only=True)
    def gatedrnn_gru_forward(input, batch_sizes=None, hx=None, weight_ih=None, weight_hh=None, bias_ih=None,
                             bias_hh=None, reverse: bool = False, save_for_backward: bool = False, lengths=None,
                             zoneout=None, weight_hh_mask=None, recurrent_mask=None, input_mask=None,
                             reset_after: bool = True, layer_norm=None):
        refuse_what_has_no_node(batch_sizes, None, (zoneout,), (weight_hh_mask, recurrent_mask, input_mask),
                                layer_norm)
        hidden = weight_hh.shape[1]
        order = (1, 0, 2)  # torch r, z, n -> ONNX z, r, h
        y, y_h = op.GRU(input, op.Unsqueeze(reorder(weight_ih, 3, order), [0]),
                        op.Unsqueeze(reorder(weight_hh, 3, order), [0]), bias(bias_ih, bias_hh, 3, order),
                        sequence_lens(lengths),
                        op.Unsqueeze(hx, [0]), direction="reverse" if reverse else "forward", hidden_size=hidden,
                        linear_before_reset=1 if reset_after else 0)
        hy = op.Squeeze(y_h, [0])
        return op.Squeeze(y, [1]), hy, saved(input, hy, 4 * hidden, save_for_backward)
