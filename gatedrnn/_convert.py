"""gatedrnn.convert: swap torch.nn's recurrent modules in a model for gatedrnn's (or back), without touching
the model's code.

The new module takes over the old one's Parameter objects themselves (not copies), so the weights, device,
dtype and requires_grad stay as they were, an optimizer built on the old module keeps optimising the same
tensors, and state_dict keys are unchanged (both libraries name and order their parameters alike). Its
training mode and hooks carry over too.
"""
import copy
import warnings

import torch
from torch import nn

from . import modules

# Exact types only: a subclass of nn.LSTM may override forward or add state, which a swap would lose.
_TO_GATEDRNN = {nn.LSTM: modules.LSTM, nn.GRU: modules.GRU, nn.LSTMCell: modules.LSTMCell,
                nn.GRUCell: modules.GRUCell}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_GATEDRNN.items()}
_RECURRENT = (nn.RNNBase, nn.RNNCellBase, modules._RNNBase, modules._CellBase)
_RECURRENT_NAMES = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")
# Per-module hook tables that nn.Module keeps, carried over to the new module where the old one has them.
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
                "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


def _constructor_args(module):
    if isinstance(module, (nn.RNNCellBase, modules._CellBase)):
        return {"input_size": module.input_size, "hidden_size": module.hidden_size, "bias": module.bias}
    args = {"input_size": module.input_size, "hidden_size": module.hidden_size, "num_layers": module.num_layers,
            "bias": module.bias, "batch_first": module.batch_first, "dropout": module.dropout,
            "bidirectional": module.bidirectional}
    if module.mode == "LSTM" and module.proj_size:
        args["proj_size"] = module.proj_size
    return args


# gatedrnn's variants that change what a module computes (forget_bias only initialises, so it converts).
_VARIANTS = ("zoneout", "zoneout_cell", "weight_dropout", "recurrent_dropout", "input_dropout")


def _plan(module, table):
    """("swap", None), ("keep", None) for a module that already is of the target kind, ("skip", reason) for a
    recurrent module that cannot be swapped, or ("recurse", None) for anything else."""
    if type(module) in table:
        in_use = [f"{name}={getattr(module, name)}" for name in _VARIANTS if getattr(module, name, 0)]
        if getattr(module, "reset_after", True) is False:  # Cho et al.'s GRU: another function of the same weights
            in_use.append("reset_after=False")
        if getattr(module, "layer_norm", False):  # its own parameters besides torch.nn's
            in_use.append("layer_norm=True")
        if in_use:  # only gatedrnn modules have these
            return "skip", f"it uses {', '.join(in_use)}, which torch.nn has no equivalent for"
        return "swap", None
    if isinstance(module, tuple(table.values())):
        return "keep", None
    if isinstance(module, torch.jit.ScriptModule):  # compiled: its submodules cannot be replaced
        if getattr(module, "original_name", "") in _RECURRENT_NAMES:
            return "skip", "it is a TorchScript module"
        return "keep", None
    if not isinstance(module, _RECURRENT):
        return "recurse", None
    if torch.nn.utils.parametrize.is_parametrized(module):  # parametrize makes a subclass: checked first
        return "skip", "its parameters are parametrized (torch.nn.utils.parametrize, e.g. weight_norm)"
    for source in table:
        if isinstance(module, source):
            return "skip", f"it subclasses {source.__module__}.{source.__qualname__}; a swap would lose its overrides"
    return "skip", f"{type(module).__module__}.{type(module).__qualname__} has no counterpart"


def _swap(module, target):
    """A target-class module that owns module's parameters, training mode and hooks."""
    with torch.device("meta"):  # no memory, no initialisation cost: every parameter is replaced below
        new = target(**_constructor_args(module))
    names = [name for name, _ in new.named_parameters(recurse=False)]
    old_names = [name for name, _ in module.named_parameters(recurse=False)]
    if names != old_names:  # cannot happen for the supported types; a safety net against silent mismatch
        raise RuntimeError(f"gatedrnn.convert: parameter names differ ({old_names} vs {names})")
    for name in names:
        setattr(new, name, getattr(module, name))
    if isinstance(new, nn.RNNBase):
        new.flatten_parameters()  # torch.nn on CUDA: one contiguous cuDNN buffer, as its constructor makes
    new.train(module.training)
    for table in _HOOK_TABLES:
        if getattr(module, table, None):
            setattr(new, table, copy.copy(getattr(module, table)))
    return new


def convert(model, inplace=False, to="gatedrnn"):
    """Returns `model` with every nn.LSTM, nn.GRU, nn.LSTMCell and nn.GRUCell in it replaced by gatedrnn's
    (`to="gatedrnn"`), or every gatedrnn module by torch.nn's (`to="torch"`). The model itself may be one of
    those modules.

    inplace=True changes `model` and keeps its Parameter objects, so an optimizer built on it goes on
    working; inplace=False (the default) converts a deep copy and leaves `model` untouched, so build the
    optimizer on the returned model. Any other recurrent module (nn.RNN, a subclass of nn.LSTM, a
    parametrized one, a TorchScript module) is left as it is, and a warning names each one and why.
    """
    if to not in ("gatedrnn", "torch"):
        raise ValueError(f"gatedrnn.convert: to must be 'gatedrnn' or 'torch', got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"gatedrnn.convert expects an nn.Module, got {type(model).__name__}")
    table = _TO_GATEDRNN if to == "gatedrnn" else _TO_TORCH
    if not inplace:
        model = copy.deepcopy(model)
    skipped = []

    def convert_child(module, path):
        """The module to put at path: module itself, converted, or module with its children converted."""
        action, reason = _plan(module, table)
        if action == "swap":
            return _swap(module, table[type(module)])
        if action == "skip":
            skipped.append(f"{path or 'the model itself'} ({reason})")
        if action == "recurse":
            for name, child in list(module.named_children()):
                new = convert_child(child, f"{path}.{name}" if path else name)
                if new is not child:
                    setattr(module, name, new)
        return module

    model = convert_child(model, "")
    if skipped:
        warnings.warn("gatedrnn.convert left these recurrent modules as they are: " + "; ".join(skipped),
                      stacklevel=2)
    return model
