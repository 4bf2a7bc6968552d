"""Module contract: parameters, initialisation, state_dict interchange, serialisation, cells, repr."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import gatedrnn
from utils import DEVICES, twins

CONFIGS = [
    ("LSTM", dict()),
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2, bias=False)),
    ("GRU", dict()),
    ("GRU", dict(num_layers=3, bidirectional=True, batch_first=True, dropout=0.25)),
]


@pytest.mark.parametrize("mode,kwargs", CONFIGS)
def test_same_parameters_and_initialisation(mode, kwargs):
    torch.manual_seed(7)
    reference = getattr(nn, mode)(5, 4, **kwargs)
    torch.manual_seed(7)
    ours = getattr(gatedrnn, mode)(5, 4, **kwargs)
    ref_params, our_params = list(reference.named_parameters()), list(ours.named_parameters())
    assert [n for n, _ in our_params] == [n for n, _ in ref_params]
    for (name, a), (_, e) in zip(our_params, ref_params):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert torch.equal(a, e), name  # same seed, same order, same init
    for attr in ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size", "_flat_weights_names", "_all_weights"]:
        assert getattr(ours, attr) == getattr(reference, attr), attr
    assert [[p.shape for p in ws] for ws in ours.all_weights] == [[p.shape for p in ws] for ws in reference.all_weights]
    assert repr(ours).replace("gatedrnn.", "") == repr(reference)


@pytest.mark.parametrize("mode,kwargs", CONFIGS)
def test_state_dict_both_ways(mode, kwargs):
    reference = getattr(nn, mode)(5, 4, **kwargs)
    ours = getattr(gatedrnn, mode)(5, 4, **kwargs)
    ours.load_state_dict(reference.state_dict(), strict=True)
    fresh = getattr(nn, mode)(5, 4, **kwargs)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for a, e in zip(fresh.parameters(), reference.parameters()):
        assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_device_and_dtype_arguments(dtype):
    m = gatedrnn.LSTM(3, 4, num_layers=2, device="cpu", dtype=dtype)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in m.parameters())
    c = gatedrnn.GRUCell(3, 4, device="cpu", dtype=dtype)
    assert all(p.dtype == dtype for p in c.parameters())


def _roundtrips(module):
    yield copy.deepcopy(module)
    yield pickle.loads(pickle.dumps(module))
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    yield torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("mode,kwargs", CONFIGS + [("LSTMCell", {}), ("GRUCell", {})])
def test_deepcopy_pickle_save_load(mode, kwargs):
    module = getattr(gatedrnn, mode)(5, 4, **kwargs).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64) if "Cell" in mode else torch.randn(6, 2, 5, dtype=torch.float64)
    expected = module(x)
    for copied in _roundtrips(module):
        assert type(copied) is type(module)
        torch.testing.assert_close(copied(x), expected, atol=0, rtol=0)
        # the copy owns its parameters: changing it leaves the original alone
        with torch.no_grad():
            next(copied.parameters()).add_(1)
        torch.testing.assert_close(module(x), expected, atol=0, rtol=0)


def test_parameter_replacement_is_used():
    """Assigning a new Parameter (as weight-norm style code does) takes effect on the next call."""
    reference, ours = twins("LSTM", 3, 4)
    new = nn.Parameter(torch.randn_like(reference.weight_hh_l0))
    reference.weight_hh_l0 = new
    ours.weight_hh_l0 = nn.Parameter(new.detach().clone())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-12, rtol=1e-10)


def test_not_a_torch_nn_rnn_subclass():
    for cls in (gatedrnn.LSTM, gatedrnn.GRU):
        assert not issubclass(cls, nn.RNNBase)


# ----------------------------------------------------------------------------------------------- cells
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("hx_given", [True, False])
def test_cells_match_torch_nn(mode, bias, batched, hx_given, device):
    reference, ours = twins(mode, 5, 4, bias=bias, device=device)
    shape = (3, 5) if batched else (5,)
    state_shape = (3, 4) if batched else (4,)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    if hx_given:
        h = torch.randn(state_shape, dtype=torch.float64, device=device, requires_grad=True)
        c = torch.randn(state_shape, dtype=torch.float64, device=device, requires_grad=True)
        args, leaves = ((x, (h, c)) if mode == "LSTMCell" else (x, h)), [x, h] + ([c] if mode == "LSTMCell" else [])
    else:
        args, leaves = (x,), [x]
    results = []
    for module in (reference, ours):
        out = module(*args)
        outs = list(out) if isinstance(out, tuple) else [out]
        loss = sum((o * (k + 1)).sum() for k, o in enumerate(outs))
        results.append((outs, torch.autograd.grad(loss, leaves + list(module.parameters()))))
    (expected, expected_grads), (actual, actual_grads) = results
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(actual_grads, expected_grads, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell"])
def test_cell_loop_matches_layer(mode):
    """Stepping a cell over a sequence gives the layer's output (same weights)."""
    layer_mode = mode.replace("Cell", "")
    layer = getattr(gatedrnn, layer_mode)(5, 4).double()
    cell = getattr(gatedrnn, mode)(5, 4).double()
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    x = torch.randn(7, 2, 5, dtype=torch.float64)
    expected, _ = layer(x)
    state = None
    outputs = []
    for t in range(7):
        state = cell(x[t]) if state is None else cell(x[t], state)
        outputs.append(state[0] if isinstance(state, tuple) else state)
    torch.testing.assert_close(torch.stack(outputs), expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell", "LSTM", "GRU"])
def test_gradcheck_inputs_and_parameters(mode):
    """gradcheck with respect to input, state and every parameter (through torch.func.functional_call)."""
    module = getattr(gatedrnn, mode)(3, 4).double()
    shape = (2, 3) if "Cell" in mode else (4, 2, 3)
    state_shape = (2, 4) if "Cell" in mode else (1, 2, 4)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    h = torch.randn(state_shape, dtype=torch.float64, requires_grad=True)
    c = torch.randn(state_shape, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in module.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def run(x, h, c, *weights):
        state = (h, c) if mode.startswith("LSTM") else h
        result = torch.func.functional_call(module, dict(zip(names, weights)), (x, state))
        return tuple(torch.utils._pytree.tree_leaves(result))

    assert torch.autograd.gradcheck(run, (x, h, c, *weights))


def test_bias_gradients_do_not_alias():
    """Both LSTM biases get the same gradient value from one backward tensor: their .grad must still be two
    tensors, or an in-place change to one (clipping, an optimizer) would change the other."""
    module = gatedrnn.LSTM(3, 4)
    module(torch.randn(5, 2, 3))[0].sum().backward()
    assert module.bias_ih_l0.grad.data_ptr() != module.bias_hh_l0.grad.data_ptr()
    torch.testing.assert_close(module.bias_ih_l0.grad, module.bias_hh_l0.grad)


@pytest.mark.parametrize("mode", ["GRUCell", "LSTMCell"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("given_state", [False, True], ids=["no-hx", "hx"])
def test_cells_with_hidden_size_zero_behave_as_torch_nn(mode, batched, bias, given_state):
    """torch.nn's cells accept hidden_size=0 and return an empty state whose backward works (the input's
    gradient is zeros); gatedrnn's do the same (its layers reject 0, as torch.nn's do)."""
    reference, ours = twins(mode, 10, 0, bias=bias)
    shape = (3, 10) if batched else (10,)
    results = []
    for module in (reference, ours):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        state_shape = (3, 0) if batched else (0,)
        hx = None
        if given_state:
            hx = torch.zeros(state_shape, dtype=torch.float64, requires_grad=True)
            hx = (hx, hx.clone()) if mode == "LSTMCell" else hx
        out = module(x, hx)
        outs = list(out) if isinstance(out, tuple) else [out]
        sum(o.sum() for o in outs).backward()
        results.append(([o.shape for o in outs], x.grad, [p.grad.shape for p in module.parameters()]))
    assert results[0][0] == results[1][0] == [torch.Size(state_shape)] * (2 if mode == "LSTMCell" else 1)
    torch.testing.assert_close(results[1][1], results[0][1])
    assert results[1][2] == results[0][2]


@pytest.mark.parametrize("mode", ["LSTM", "LSTMCell"])
@pytest.mark.parametrize("value", [1.0, -0.5, 3])
def test_forget_bias_sets_the_forget_gates_total_bias_and_nothing_else(mode, value):
    """forget_bias=b (Keras' unit_forget_bias with b=1): b_ih's forget block is b and b_hh's is 0, so the gate's
    bias is b; every other parameter is torch.nn's initialisation from the same seed; the state_dict is plain."""
    kwargs = dict(num_layers=2, bidirectional=True) if mode == "LSTM" else {}
    torch.manual_seed(0)
    reference = getattr(nn, mode)(3, 5, **kwargs)
    torch.manual_seed(0)
    ours = getattr(gatedrnn, mode)(3, 5, forget_bias=value, **kwargs)
    assert f"forget_bias={float(value)}" in repr(ours)
    forget = slice(5, 10)
    for name, p in ours.named_parameters():
        expected = reference.state_dict()[name].clone()
        if name.startswith("bias_ih"):
            expected[forget] = value
        elif name.startswith("bias_hh"):
            expected[forget] = 0
        torch.testing.assert_close(p.detach(), expected, atol=0, rtol=0, msg=name)
    reference.load_state_dict(ours.state_dict())  # torch.nn's layout: loads as is
    with torch.no_grad():
        for p in ours.parameters():
            p.zero_()
    ours.reset_parameters()  # re-initialising applies it again
    assert all(torch.all(getattr(ours, n)[forget] == value) for n, _ in ours.named_parameters() if "bias_ih" in n)


def test_forget_bias_refusals():
    with pytest.raises(TypeError, match="forget_bias is an LSTM argument"):
        gatedrnn.GRU(3, 5, forget_bias=1.0)
    with pytest.raises(TypeError):
        gatedrnn.GRUCell(3, 5, forget_bias=1.0)
    with pytest.raises(TypeError, match="forget_bias should be a number or None, got: bool"):
        gatedrnn.LSTM(3, 5, forget_bias=True)
    with pytest.raises(ValueError, match="forget_bias needs bias=True"):
        gatedrnn.LSTMCell(3, 5, bias=False, forget_bias=1.0)
