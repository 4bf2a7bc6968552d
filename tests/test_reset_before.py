"""GRU `reset_after=False`: Cho et al.'s GRU (Keras' reset_after=False, ONNX's linear_before_reset=0), in which
the reset gate multiplies h_{t-1} before W_hn: two dependent fused products per step (csrc/cells.h, "GRU, reset
before the product"; csrc/cpu/gru_reset_before.cpp, csrc/cuda/gru_reset_before.cu).

Oracles: gatedrnn.reference (float64, every output and gradient), and two independent implementations of the
same cell: Keras (test_keras.py) and ONNX Runtime (test_onnx.py)."""
import pytest
import torch
from torch import nn

import gatedrnn
from gatedrnn import _ops, reference
from utils import DEVICES, VARIANT_LENGTHS, VARIANT_SIZES, assert_same_results_and_grads, variant_layer_args

T, B, I, H = VARIANT_SIZES


def _args(layout, g, bias=True, device="cpu"):
    args = variant_layer_args("GRU", layout, g, device)
    return args if bias else args[:-2] + [None, None]


def _masks(g, rows, keep_p=0.3):
    """Zoneout keep values and the three dropout masks, as the modules draw them."""
    return dict(zoneout=torch.empty(rows, H, dtype=torch.float64).bernoulli_(keep_p, generator=g),
                weight_hh_mask=(torch.rand(3 * H, H, generator=g, dtype=torch.float64) > 0.3).double() / 0.7,
                recurrent_mask=(torch.rand(B, H, generator=g, dtype=torch.float64) > 0.4).double() / 0.6,
                input_mask=(torch.rand(B, I, generator=g, dtype=torch.float64) > 0.2).double() / 0.8)


@pytest.mark.parametrize("variants", [False, True], ids=["plain", "variants"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", ["dense", "packed", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_layer_op_matches_the_reference(reverse, layout, bias, variants):
    """Outputs, final state and every gradient (h0's included) against gatedrnn.reference, float64; with
    `variants`, zoneout and all three dropout masks at once."""
    g = torch.Generator().manual_seed(0)
    args = _args(layout, g, bias)
    rows = args[0].shape[0] if layout == "packed" else T * B
    options = _masks(g, rows) if variants else {}
    if variants and layout == "packed":
        options["recurrent_mask"] = options["recurrent_mask"][:len(VARIANT_LENGTHS)]
    lengths = torch.tensor(VARIANT_LENGTHS) if layout == "lengths" else None
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    ours = _ops.gru_layer(*args, reverse, lengths, reset_after=False, **options)
    expected = reference.gru_layer(*args, None, reverse, lengths=lengths, reset_after=False, **options)
    assert_same_results_and_grads(ours, expected, inputs, g)


def test_the_cell_differs_from_torch_nn():
    """The same parameters give another function: a test that compares with reset_after=False really runs it."""
    g = torch.Generator().manual_seed(1)
    args = _args("dense", g)
    assert not torch.allclose(_ops.gru_layer(*args, False, reset_after=False)[0], _ops.gru_layer(*args, False)[0])


def test_the_fused_kernels_ran():
    before = gatedrnn._extension.kernel_calls()
    gru = gatedrnn.GRU(I, H, reset_after=False)
    gru(torch.randn(T, B, I, requires_grad=True))[0].sum().backward()
    after = gatedrnn._extension.kernel_calls()
    assert after["gru_reset_before_input_projection"] > before.get("gru_reset_before_input_projection", 0)
    for label in ("gru_reset_before_gates_step", "gru_reset_before_candidate_step", "gru_reset_before_backward_step",
                  "gru_reset_before_reset_backward_step"):
        assert after[label] >= before.get(label, 0) + T, label  # at least once per step
    assert after.get("gru_forward_step", 0) == before.get("gru_forward_step", 0)  # not the plain GRU's kernel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variants", [False, True], ids=["plain", "variants"])
def test_gradcheck(device, variants):
    g = torch.Generator().manual_seed(2)
    args = [a.detach().to(device).requires_grad_() if isinstance(a, torch.Tensor) else a
            for a in _args("dense", g)]
    options = {k: v.to(device) for k, v in _masks(g, T * B, 0.5).items()} if variants else {}
    assert torch.autograd.gradcheck(lambda *a: _ops.gru_layer(*a, True, None, reset_after=False, **options), args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(3)
    args = [a.detach().to(device) if isinstance(a, torch.Tensor) else a for a in _args("dense", g)]
    options = dict(reset_after=False)
    torch.library.opcheck(torch.ops.gatedrnn.gru_forward, (*args, False, True), options)
    torch.library.opcheck(torch.ops.gatedrnn.gru_forward, (*args, True, False), options)
    x, _, h0, w_ih, w_hh, _, _ = args
    out, hy, saved = torch.ops.gatedrnn.gru_forward(*args, False, True, **options)
    torch.library.opcheck(torch.ops.gatedrnn.gru_backward,
                          (torch.randn_like(out), torch.randn_like(hy), x, None, h0, w_ih, w_hh, out, saved, False,
                           [True, True, True]), options)


@pytest.mark.parametrize("batch_first", [False, True])
def test_module_matches_the_reference(batch_first):
    """Two bidirectional layers with inter-layer dropout off, through the module, against the reference's own
    orchestration of its layers; parameters and state_dict are torch.nn.GRU's."""
    torch.manual_seed(0)
    module = gatedrnn.GRU(I, H, num_layers=2, bidirectional=True, batch_first=batch_first, reset_after=False,
                          dtype=torch.float64)
    plain = nn.GRU(I, H, num_layers=2, bidirectional=True, batch_first=batch_first, dtype=torch.float64)
    module.load_state_dict(plain.state_dict())  # the same parameters, names and shapes
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, B, H, dtype=torch.float64, requires_grad=True)
    output, hy = module(x, h0)
    data = x.transpose(0, 1) if batch_first else x
    expected, expected_hy = reference.gru(data, None, h0, module._flat_weights, num_layers=2, bidirectional=True,
                                          reset_after=False)
    if batch_first:
        expected = expected.transpose(0, 1)
    inputs = [x, h0, *module.parameters()]
    g = torch.Generator().manual_seed(5)
    assert_same_results_and_grads((output, hy), (expected, expected_hy), inputs, g)


def test_cell_matches_the_reference():
    torch.manual_seed(0)
    cell = gatedrnn.GRUCell(I, H, reset_after=False, dtype=torch.float64)
    x = torch.randn(B, I, dtype=torch.float64, requires_grad=True)
    h = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    expected, _ = reference.gru_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh,
                                     reset_after=False)
    g = torch.Generator().manual_seed(6)
    assert_same_results_and_grads((cell(x, h),), (expected,), [x, h, *cell.parameters()], g)
    torch.testing.assert_close(cell(x[0], h[0]), expected[0], atol=1e-12, rtol=1e-12)  # unbatched


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)], ids=["float32", "bfloat16"])
def test_low_precision_against_float64(dtype, tol):
    """float32, and bfloat16 (computed in float32 and rounded on output), within the dtype's resolution of the
    float64 answer: outputs and gradients, relative to each tensor's largest magnitude."""
    torch.manual_seed(0)
    exact = gatedrnn.GRU(I, H, reset_after=False, dtype=torch.float64)
    ours = gatedrnn.GRU(I, H, reset_after=False, dtype=dtype)
    ours.load_state_dict(exact.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    results = []
    for module, data in ((exact, x.clone()), (ours, x.to(dtype))):
        data.requires_grad_()
        output, hy = module(data)
        output.float().pow(2).sum().backward()
        results.append([output, hy, data.grad, *(p.grad for p in module.parameters())])
    for a, e in zip(results[1], results[0]):
        assert a.dtype == dtype
        assert ((a.double() - e).abs().max() / e.abs().max()).item() < tol


def test_double_backward_runs_the_reference():
    """create_graph=True differentiates the gradient through the reference of the same cell (with a warning)."""
    torch.manual_seed(0)
    module = gatedrnn.GRU(I, H, reset_after=False, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)

    def penalty(run):
        (grad,) = torch.autograd.grad(run(x).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum(), x)[0]

    with pytest.warns(UserWarning, match="reference"):
        ours = penalty(lambda data: module(data)[0])
    expected = penalty(lambda data: reference.gru(data, None, torch.zeros(1, B, H, dtype=torch.float64),
                                                  module._flat_weights, reset_after=False)[0])
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=1e-10)


def test_compiles_without_a_graph_break():
    torch.manual_seed(0)
    module = gatedrnn.GRU(I, H, reset_after=False)
    x = torch.randn(T, B, I)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x)[0], module(x)[0], atol=0, rtol=0)


def test_repr_and_refusals():
    assert "reset_after=False" in repr(gatedrnn.GRU(I, H, reset_after=False))
    assert "reset_after" not in repr(gatedrnn.GRU(I, H))
    assert "reset_after=False" in repr(gatedrnn.GRUCell(I, H, reset_after=False))
    with pytest.raises(TypeError, match="reset_after should be of type bool"):
        gatedrnn.GRU(I, H, reset_after=0)
    with pytest.raises(TypeError, match="reset_after"):
        gatedrnn.LSTM(I, H, reset_after=False)
