"""layer_norm=True: the LayerNorm LSTM and GRU (Ba et al. 2016, with Haste's placement): LayerNorm on the input
projection and on the recurrent product, each over all gate columns with a gain and a bias of its own, and for the
LSTM on c_t before the tanh that makes h_t (csrc/layer_norm.h; CPU loops in csrc/cpu/layer_norm.cpp).

Oracle: gatedrnn.reference, whose cells apply torch.nn.functional.layer_norm to the same products (float64, every
output and gradient, the norms' parameters included)."""
import pytest
import torch
from torch import nn

import gatedrnn
from gatedrnn import _ops, reference
from utils import DEVICES, VARIANT_LENGTHS, VARIANT_SIZES, assert_same_results_and_grads, variant_layer_args

T, B, I, H = VARIANT_SIZES
NORM_COLUMNS = {"LSTM": 9 * H, "GRU": 6 * H}


def _norm(mode, g):
    """A layer_norm argument [2, columns] away from its initial gain 1 and bias 0, so that both matter."""
    columns = NORM_COLUMNS[mode]
    gains = 1 + 0.5 * torch.randn(columns, generator=g, dtype=torch.float64)
    biases = 0.5 * torch.randn(columns, generator=g, dtype=torch.float64)
    return torch.stack([gains, biases]).requires_grad_()


def _args(mode, layout, g, bias=True):
    args = variant_layer_args(mode, layout, g)
    return args if bias else args[:-2] + [None, None]


def _variants(mode, g, rows, batch):
    """Zoneout keep values (both states for the LSTM) and the three dropout masks, as the modules draw them."""
    gates = 4 if mode == "LSTM" else 3
    options = dict(zoneout=torch.empty(rows, H, dtype=torch.float64).bernoulli_(0.3, generator=g),
                   weight_hh_mask=(torch.rand(gates * H, H, generator=g, dtype=torch.float64) > 0.3).double() / 0.7,
                   recurrent_mask=(torch.rand(batch, H, generator=g, dtype=torch.float64) > 0.4).double() / 0.6,
                   input_mask=(torch.rand(batch, I, generator=g, dtype=torch.float64) > 0.2).double() / 0.8)
    if mode == "LSTM":
        options["zoneout_cell"] = torch.empty(rows, H, dtype=torch.float64).bernoulli_(0.4, generator=g)
    return options


def _layer(mode):
    return (_ops.lstm_layer, reference.lstm_layer) if mode == "LSTM" else (_ops.gru_layer, reference.gru_layer)


def _run(mode, args, reverse, lengths=None, **options):
    """(ours, the reference's) results of one layer and direction."""
    ours, theirs = _layer(mode)
    if mode == "LSTM":
        return (ours(*args, None, reverse, lengths, **options),
                theirs(*args, None, reverse, lengths=lengths, **options))
    return ours(*args, reverse, lengths, **options), theirs(*args, None, reverse, lengths=lengths, **options)


@pytest.mark.parametrize("variants", [False, True], ids=["plain", "variants"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", ["dense", "packed", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_layer_op_matches_the_reference(mode, reverse, layout, bias, variants):
    """Outputs, final states and every gradient (h0's, c0's and the norms' parameters' included) against
    gatedrnn.reference, float64; with `variants`, zoneout and all three dropout masks at once."""
    g = torch.Generator().manual_seed(0)
    args = _args(mode, layout, g, bias)
    norm = _norm(mode, g)
    rows = args[0].shape[0] if layout == "packed" else T * B
    batch = len(VARIANT_LENGTHS) if layout == "packed" else B
    options = _variants(mode, g, rows, batch) if variants else {}
    lengths = torch.tensor(VARIANT_LENGTHS) if layout == "lengths" else None
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + [norm]
    ours, expected = _run(mode, args, reverse, lengths, layer_norm=norm, **options)
    assert_same_results_and_grads(ours, expected, inputs, g)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_each_norm_matters(mode):
    """The cell differs from the plain one, and from itself with any one norm's gain or bias changed: a test
    that passes with layer_norm really runs every norm."""
    g = torch.Generator().manual_seed(1)
    args = _args(mode, "dense", g)
    norm = _norm(mode, g).detach()
    layer = _layer(mode)[0]
    extra = [None] if mode == "LSTM" else []  # the LSTM's weight_hr
    result = layer(*args, *extra, False, layer_norm=norm)[0]
    assert not torch.allclose(result, layer(*args, *extra, False)[0])
    parts = [(0, 4 * H), (4 * H, 8 * H), (8 * H, 9 * H)] if mode == "LSTM" else [(0, 3 * H), (3 * H, 6 * H)]
    for row in (0, 1):
        for start, end in parts:
            changed = norm.clone()
            changed[row, start:end] += 0.25
            assert not torch.allclose(result, layer(*args, *extra, False, layer_norm=changed)[0]), (row, start)


def test_the_fused_kernels_ran():
    before = gatedrnn._extension.kernel_calls()
    for module in (gatedrnn.LSTM(I, H, layer_norm=True), gatedrnn.GRU(I, H, layer_norm=True)):
        module(torch.randn(T, B, I, requires_grad=True))[0].sum().backward()
    after = gatedrnn._extension.kernel_calls()
    assert after["layer_norm_input_projection"] >= before.get("layer_norm_input_projection", 0) + 2
    for label in ("layer_norm_recurrent_product", "layer_norm_backward_product"):
        assert after[label] >= before.get(label, 0) + 2 * T, label  # at least once per step
    for label in ("lstm_forward_step", "gru_forward_step", "lstm_backward_step", "gru_backward_step"):
        assert after.get(label, 0) == before.get(label, 0), label  # not the plain cells' kernels


@pytest.mark.parametrize("variants", [False, True], ids=["plain", "variants"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_gradcheck(mode, variants):
    g = torch.Generator().manual_seed(2)
    args = _args(mode, "dense", g)
    norm = _norm(mode, g)
    options = _variants(mode, g, T * B, B) if variants else {}
    layer = _layer(mode)[0]
    extra = [None] if mode == "LSTM" else []

    def run(*a):
        return layer(*a[:-1], *extra, True, None, layer_norm=a[-1], **options)

    assert torch.autograd.gradcheck(run, (*args, norm))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_opcheck(mode):
    g = torch.Generator().manual_seed(3)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _args(mode, "dense", g)]
    norm = _norm(mode, g).detach()
    options = dict(layer_norm=norm)
    ops = torch.ops.gatedrnn
    if mode == "LSTM":
        x, _, h0, c0, w_ih, w_hh, _, _ = args
        torch.library.opcheck(ops.lstm_forward, (*args, None, False, True), options)
        torch.library.opcheck(ops.lstm_forward, (*args, None, True, False), options)
        out, hy, cy, gates, cells = ops.lstm_forward(*args, None, False, True, **options)
        torch.library.opcheck(ops.lstm_backward,
                              (torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy), x, None, h0, c0,
                               w_ih, w_hh, None, out, gates, cells, False, [True, True, True]), options)
    else:
        x, _, h0, w_ih, w_hh, _, _ = args
        torch.library.opcheck(ops.gru_forward, (*args, False, True), options)
        torch.library.opcheck(ops.gru_forward, (*args, True, False), options)
        out, hy, saved = ops.gru_forward(*args, False, True, **options)
        torch.library.opcheck(ops.gru_backward,
                              (torch.randn_like(out), torch.randn_like(hy), x, None, h0, w_ih, w_hh, out, saved,
                               False, [True, True, True]), options)


def _randomise_norms(module, seed):
    """Moves every norm parameter away from its initial value (gain 1, bias 0), so that a mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.startswith("layer_norm_"):
                param.add_(0.5 * torch.randn(param.shape, generator=g, dtype=param.dtype))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_module_matches_the_reference(mode, batch_first):
    """Two bidirectional layers through the module against the reference's own orchestration of its layers,
    with the module's norm parameters assembled by hand in the ops' layout."""
    torch.manual_seed(0)
    module = getattr(gatedrnn, mode)(I, H, num_layers=2, bidirectional=True, batch_first=batch_first,
                                     layer_norm=True, dtype=torch.float64)
    _randomise_norms(module, 4)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64, requires_grad=True)
    states = [torch.randn(4, B, H, dtype=torch.float64, requires_grad=True) for _ in range(2 if mode == "LSTM" else 1)]
    parts = ("ih", "hh", "cell") if mode == "LSTM" else ("ih", "hh")
    norms = [torch.stack([torch.cat([getattr(module, f"layer_norm_{part}_{kind}_l{layer}{suffix}") for part in parts])
                          for kind in ("weight", "bias")])
             for layer in range(2) for suffix in ("", "_reverse")]
    data = x.transpose(0, 1) if batch_first else x
    if mode == "LSTM":
        output, (hy, cy) = module(x, tuple(states))
        expected, (e_hy, e_cy) = reference.lstm(data, None, *states, module._flat_weights, num_layers=2,
                                                bidirectional=True, layer_norms=norms)
        ours, theirs = (output, hy, cy), [expected, e_hy, e_cy]
    else:
        output, hy = module(x, states[0])
        expected, e_hy = reference.gru(data, None, states[0], module._flat_weights, num_layers=2,
                                       bidirectional=True, layer_norms=norms)
        ours, theirs = (output, hy), [expected, e_hy]
    if batch_first:
        theirs[0] = theirs[0].transpose(0, 1)
    g = torch.Generator().manual_seed(5)
    assert_same_results_and_grads(ours, theirs, [x, *states, *module.parameters()], g)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_parameters_names_order_and_initialisation(mode):
    """torch.nn's parameters keep their names, order and (for a seed) values; each layer and direction's norm
    parameters follow its weights, named as torch.nn.LayerNorm names its own, initialised to gain 1, bias 0."""
    torch.manual_seed(7)
    plain = getattr(nn, mode)(I, H, num_layers=2, bidirectional=True)
    torch.manual_seed(7)
    module = getattr(gatedrnn, mode)(I, H, num_layers=2, bidirectional=True, layer_norm=True)
    parts = ("ih", "hh", "cell") if mode == "LSTM" else ("ih", "hh")
    expected = []
    for layer in range(2):
        for suffix in ("", "_reverse"):
            expected += [f"{kind}_l{layer}{suffix}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            expected += [f"layer_norm_{part}_{kind}_l{layer}{suffix}" for part in parts for kind in ("weight", "bias")]
    assert list(module.state_dict()) == expected
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(module.state_dict()[name], value, atol=0, rtol=0)
    gates = 4 if mode == "LSTM" else 3
    for name, value in module.state_dict().items():
        if name.startswith("layer_norm_"):
            size = H if "_cell_" in name else gates * H
            assert value.shape == (size,)
            assert torch.equal(value, torch.full_like(value, 1.0 if "_weight" in name else 0.0)), name
    assert module._flat_weights_names == list(plain._flat_weights_names)
    restored = getattr(gatedrnn, mode)(I, H, num_layers=2, bidirectional=True, layer_norm=True)
    restored.load_state_dict(module.state_dict())  # strict: the names round-trip


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_cell_matches_the_reference(mode):
    torch.manual_seed(0)
    cell = getattr(gatedrnn, f"{mode}Cell")(I, H, layer_norm=True, dtype=torch.float64)
    _randomise_norms(cell, 6)
    parts = ("ih", "hh", "cell") if mode == "LSTM" else ("ih", "hh")
    norm = torch.stack([torch.cat([getattr(cell, f"layer_norm_{part}_{kind}") for part in parts])
                        for kind in ("weight", "bias")])
    x = torch.randn(B, I, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(B, H, dtype=torch.float64, requires_grad=True) for _ in range(2 if mode == "LSTM" else 1)]
    weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    if mode == "LSTM":
        _, e_h, e_c = reference.lstm_cell(x, *states, *weights, layer_norm=norm)
        ours, expected = cell(x, tuple(states)), (e_h, e_c)
        unbatched, first = cell(x[0], (states[0][0], states[1][0]))[0], e_h[0]
    else:
        e_h, _ = reference.gru_cell(x, states[0], *weights, layer_norm=norm)
        ours, expected = (cell(x, states[0]),), (e_h,)
        unbatched, first = cell(x[0], states[0][0]), e_h[0]
    g = torch.Generator().manual_seed(6)
    assert_same_results_and_grads(ours, expected, [x, *states, *cell.parameters()], g)
    torch.testing.assert_close(unbatched, first, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-5), (torch.bfloat16, 3e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_low_precision_against_float64(mode, dtype, tol):
    """float32, and bfloat16 (computed in float32 and rounded on output), within the dtype's resolution of the
    float64 answer: outputs and gradients, relative to each tensor's largest magnitude."""
    torch.manual_seed(0)
    exact = getattr(gatedrnn, mode)(I, H, layer_norm=True, dtype=torch.float64)
    _randomise_norms(exact, 8)
    ours = getattr(gatedrnn, mode)(I, H, layer_norm=True, dtype=dtype)
    ours.load_state_dict(exact.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    results = []
    for module, data in ((exact, x.clone()), (ours, x.to(dtype))):
        data.requires_grad_()
        output, _ = module(data)
        output.float().pow(2).sum().backward()
        results.append([output, data.grad, *(p.grad for p in module.parameters())])
    for a, e in zip(results[1], results[0]):
        assert a.dtype == dtype
        assert ((a.double() - e).abs().max() / e.abs().max()).item() < tol


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_double_backward_runs_the_reference(mode):
    """create_graph=True differentiates the gradient through the reference of the same cell (with a warning),
    the norm parameters' second-order terms included."""
    torch.manual_seed(0)
    module = getattr(gatedrnn, mode)(I, H, layer_norm=True, dtype=torch.float64)
    _randomise_norms(module, 9)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    gain = module.layer_norm_hh_weight_l0

    def penalty(run):
        (grad,) = torch.autograd.grad(run(x).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum(), (x, gain))

    with pytest.warns(UserWarning, match="reference"):
        ours = penalty(lambda data: module(data)[0])
    norm = [torch.stack([torch.cat([p for n, p in module.named_parameters() if n.startswith("layer_norm_") and
                                    f"_{kind}_" in n]) for kind in ("weight", "bias")])]
    states = [torch.zeros(1, B, H, dtype=torch.float64)] * (2 if mode == "LSTM" else 1)
    run_reference = getattr(reference, mode.lower())
    expected = penalty(lambda data: run_reference(data, None, *states, module._flat_weights, layer_norms=norm)[0])
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_compiles_without_a_graph_break(mode):
    """Padded input with lengths, forward and backward, under torch.compile(fullgraph=True)."""
    torch.manual_seed(0)
    module = getattr(gatedrnn, mode)(I, H, layer_norm=True, batch_first=True)
    x = torch.randn(B, T, I)
    lengths = torch.tensor([T, 2, 5, 1])
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, lengths=lengths)[0], module(x, lengths=lengths)[0], atol=0, rtol=0)
    compiled(x, lengths=lengths)[0].sum().backward()
    assert module.layer_norm_hh_weight_l0.grad is not None


def test_repr_and_refusals():
    assert "layer_norm=True" in repr(gatedrnn.LSTM(I, H, layer_norm=True))
    assert "layer_norm" not in repr(gatedrnn.LSTM(I, H))
    assert "layer_norm=True" in repr(gatedrnn.GRUCell(I, H, layer_norm=True))
    with pytest.raises(TypeError, match="layer_norm should be of type bool"):
        gatedrnn.GRU(I, H, layer_norm=1)
    with pytest.raises(ValueError, match="layer_norm with proj_size is not supported"):
        gatedrnn.LSTM(I, H, proj_size=2, layer_norm=True)
    with pytest.raises(ValueError, match="layer_norm with reset_after=False is not supported"):
        gatedrnn.GRU(I, H, reset_after=False, layer_norm=True)
    with pytest.raises(ValueError, match="layer_norm with reset_after=False is not supported"):
        gatedrnn.GRUCell(I, H, reset_after=False, layer_norm=True)


def test_the_ops_refuse_what_they_cannot_run():
    """Called directly, the ops name the problem: a projection, reset_after=False, a layer_norm tensor of the
    wrong size or dtype."""
    g = torch.Generator().manual_seed(10)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _args("LSTM", "dense", g)]
    norm = _norm("LSTM", g).detach()
    ops = torch.ops.gatedrnn
    with pytest.raises(RuntimeError, match="layer_norm does not support a projection"):
        ops.lstm_forward(*args[:2], args[2][:, :2].contiguous(), *args[3:], torch.randn(2, H, dtype=torch.float64),
                         False, False, layer_norm=norm)
    with pytest.raises(RuntimeError, match=r"expected layer_norm of size \[2, 45\]"):
        ops.lstm_forward(*args, None, False, False, layer_norm=norm[:, :-1])
    with pytest.raises(RuntimeError, match="expected layer_norm to be a Double tensor"):
        ops.lstm_forward(*args, None, False, False, layer_norm=norm.float())
    gru_args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _args("GRU", "dense", g)]
    with pytest.raises(RuntimeError, match="layer_norm does not support reset_after=False"):
        ops.gru_forward(*gru_args, False, False, reset_after=False, layer_norm=_norm("GRU", g).detach())


def test_keras_weights_are_refused():
    with pytest.raises(ValueError, match="no layer normalisation"):
        gatedrnn.to_keras_weights(gatedrnn.GRU(I, H, layer_norm=True))


def test_a_torch_nn_state_dict_loads_without_the_norms():
    """torch.nn's parameters load into a layer_norm module (strict=False names the norms as missing), and with
    the norms at their initialisation the module computes the reference's LayerNorm cell on those weights."""
    torch.manual_seed(11)
    plain = nn.LSTM(I, H, dtype=torch.float64)
    module = gatedrnn.LSTM(I, H, layer_norm=True, dtype=torch.float64)
    missing, unexpected = module.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == sorted(n for n in module.state_dict() if n.startswith("layer_norm_"))
    x = torch.randn(T, B, I, dtype=torch.float64)
    zeros = torch.zeros(1, B, H, dtype=torch.float64)
    norm = [torch.stack([torch.ones(9 * H, dtype=torch.float64), torch.zeros(9 * H, dtype=torch.float64)])]
    expected = reference.lstm(x, None, zeros, zeros, plain._flat_weights, layer_norms=norm)[0]
    torch.testing.assert_close(module(x)[0], expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES[1:])  # CUDA only: the CPU ops are the oracle
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_cuda_matches_the_cpu(mode, device):
    """The CUDA kernels (csrc/cuda/layer_norm.cu) against the CPU ops, float64: a bidirectional module with
    padded input and lengths, outputs and every gradient."""
    torch.manual_seed(12)
    cpu = getattr(gatedrnn, mode)(I, H, bidirectional=True, layer_norm=True, dtype=torch.float64)
    _randomise_norms(cpu, 13)
    gpu = getattr(gatedrnn, mode)(I, H, bidirectional=True, layer_norm=True, dtype=torch.float64).to(device)
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([T, 2, 5, 1])
    results = []
    for module, data in ((cpu, x.clone().requires_grad_()), (gpu, x.to(device).requires_grad_())):
        output = module(data, lengths=lengths)[0]
        output.pow(2).sum().backward()
        results.append([output, data.grad, *(p.grad for p in module.parameters())])
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a.cpu(), e, atol=1e-10, rtol=1e-10)
