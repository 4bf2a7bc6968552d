"""The compiled ops themselves: gradcheck in float64, opcheck, and the reference layer functions."""
import contextlib

import pytest
import torch

import gatedrnn
from gatedrnn import _ops, reference
from utils import DEVICES

I, H, P = 3, 4, 2


def lstm_args(packed, reverse, bias, proj, device="cpu", dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)

    state = P if proj else H
    if packed:
        batch_sizes = torch.tensor([3, 3, 2, 1])
        x = rand(int(batch_sizes.sum()), I)
    else:
        batch_sizes = None
        x = rand(4, 3, I)
    return (x, batch_sizes, rand(3, state), rand(3, H), rand(4 * H, I), rand(4 * H, state),
            rand(4 * H) if bias else None, rand(4 * H) if bias else None, rand(P, H) if proj else None, reverse)


def gru_args(packed, reverse, bias, device="cpu", dtype=torch.float64, requires_grad=True):
    x, batch_sizes, h, _, _, _, _, _, _, _ = lstm_args(packed, reverse, False, False, device, dtype, requires_grad)
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)

    return (x, batch_sizes, h, rand(3 * H, I), rand(3 * H, H), rand(3 * H) if bias else None,
            rand(3 * H) if bias else None, reverse)


CONFIGS = [
    # (packed, reverse, bias, proj)
    (False, False, True, False),
    (False, True, True, False),
    (True, False, True, False),
    (True, True, True, False),
    (False, False, False, False),
    (False, False, True, True),
    (True, True, False, True),
]


def _id(config):
    packed, reverse, bias, proj = config
    return f"{'packed' if packed else 'dense'}-{'rev' if reverse else 'fwd'}-{'bias' if bias else 'nobias'}" + (
        "-proj" if proj else "")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_lstm_gradcheck(config, device):
    packed, reverse, bias, proj = config
    args = lstm_args(packed, reverse, bias, proj, device)
    assert torch.autograd.gradcheck(lambda *a: _ops.lstm_layer(*a), args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [c for c in CONFIGS if not c[3]], ids=_id)
def test_gru_gradcheck(config, device):
    packed, reverse, bias, _ = config
    args = gru_args(packed, reverse, bias, device)
    assert torch.autograd.gradcheck(lambda *a: _ops.gru_layer(*a), args)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_eager_training_skips_torch_librarys_argument_refill(mode, monkeypatch):
    """An eager training call enters through gatedrnn's own autograd.Function (_EagerLstm/_EagerGru: the op's
    registered setup_context and backward), not torch.library's wrapper, whose fill_defaults costs about 50 us
    a call with these ops' 16-18 arguments. The op called as it is still takes the registered path (what
    torch.compile traces), and both give the same gradients."""
    import torch._library.utils as library_utils

    refills = []
    real_fill_defaults = library_utils.fill_defaults
    monkeypatch.setattr(library_utils, "fill_defaults", lambda *a: refills.append(1) or real_fill_defaults(*a))
    args = lstm_args(False, False, True, False) if mode == "lstm" else gru_args(False, False, True)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outputs = 3 if mode == "lstm" else 2  # output, hy (, cy); then the saved activations
    layer = _ops.lstm_layer if mode == "lstm" else _ops.gru_layer
    eager = torch.autograd.grad(sum(o.square().sum() for o in layer(*args)), leaves)
    assert refills == []
    op = torch.ops.gatedrnn.lstm_forward if mode == "lstm" else torch.ops.gatedrnn.gru_forward
    registered = torch.autograd.grad(sum(o.square().sum() for o in op(*args, True)[:outputs]), leaves)
    assert refills, "the registered path was not taken, so this test could not tell the two apart"
    for a, b in zip(eager, registered):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_module_gradcheck(mode):
    """gradcheck through a whole module: 2 layers, bidirectional, packed, with hx."""
    module = getattr(gatedrnn, mode)(I, H, num_layers=2, bidirectional=True).double()
    lengths = torch.tensor([4, 2, 3])
    x = torch.randn(4, 3, I, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 3, H, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, H, dtype=torch.float64, requires_grad=True)

    def run(x, h, c):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, state = module(packed, (h, c) if mode == "LSTM" else h)
        return (out.data, *(state if mode == "LSTM" else (state,)))

    assert torch.autograd.gradcheck(run, (x, h, c))


def _opcheck_samples(device):
    for config in CONFIGS:
        packed, reverse, bias, proj = config
        for requires_grad in (True, False):
            args = lstm_args(packed, reverse, bias, proj, device, requires_grad=requires_grad)
            yield torch.ops.gatedrnn.lstm_forward, (*args, requires_grad)
            if not proj:
                args = gru_args(packed, reverse, bias, device, requires_grad=requires_grad)
                yield torch.ops.gatedrnn.gru_forward, (*args, requires_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward_ops(device):
    count = 0
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)
        count += 1
    assert count == 24  # 7 LSTM and 5 GRU configurations, with and without grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]], ids=str)
def test_opcheck_backward_ops(packed, mask, device):
    args = lstm_args(packed, True, True, True, device, requires_grad=False)
    x, batch_sizes, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, reverse = args
    out, hy, cy, gates, cells = torch.ops.gatedrnn.lstm_forward(*args, True)
    grads = (torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy))
    torch.library.opcheck(torch.ops.gatedrnn.lstm_backward,
                          (*grads, x, batch_sizes, h, c, w_ih, w_hh, w_hr, out, gates, cells, reverse, mask))

    x, batch_sizes, h, w_ih, w_hh, b_ih, b_hh, reverse = gru_args(packed, True, True, device, requires_grad=False)
    out, hy, saved = torch.ops.gatedrnn.gru_forward(x, batch_sizes, h, w_ih, w_hh, b_ih, b_hh, reverse, True)
    torch.library.opcheck(torch.ops.gatedrnn.gru_backward,
                          (torch.randn_like(out), torch.randn_like(hy), x, batch_sizes, h, w_ih, w_hh, out, saved,
                           reverse, mask))


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_layers_match_reference(config):
    """Op level against gatedrnn.reference: outputs and every gradient, float64."""
    packed, reverse, bias, proj = config
    args = lstm_args(packed, reverse, bias, proj)
    for fn, ref in [(_ops.lstm_layer, reference.lstm_layer)] + (
            [] if proj else [(_ops.gru_layer, reference.gru_layer)]):
        call_args = args if fn is _ops.lstm_layer else gru_args(packed, reverse, bias)
        ref_args = call_args if fn is _ops.lstm_layer else (*call_args[:-1], None, call_args[-1])
        actual, expected = fn(*call_args), ref(*ref_args)
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)
        leaves = [a for a in call_args if isinstance(a, torch.Tensor) and a.requires_grad]
        g_actual = torch.autograd.grad(sum((t * (k + 1)).sum() for k, t in enumerate(actual)), leaves)
        g_expected = torch.autograd.grad(sum((t * (k + 1)).sum() for k, t in enumerate(expected)), leaves)
        torch.testing.assert_close(g_actual, g_expected, atol=1e-12, rtol=1e-10)


def test_inference_saves_nothing():
    args = lstm_args(False, False, True, False, requires_grad=False)
    _, _, _, gates, cells = torch.ops.gatedrnn.lstm_forward(*args, False)
    assert gates.numel() == 0 and cells.numel() == 0
    _, _, saved = torch.ops.gatedrnn.gru_forward(*gru_args(False, False, True, requires_grad=False), False)
    assert saved.numel() == 0


def test_backward_without_saved_activations_is_refused():
    args = lstm_args(False, False, True, False)
    out, *_ = torch.ops.gatedrnn.lstm_forward(*args, False)
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        out.sum().backward()


MASKS = [[True, True, True], [False, True, True], [True, False, False], [False, False, True]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_backward_output_mask(mask, device):
    """Gradients not asked for are not computed (empty); the ones asked for match the full computation."""
    args = lstm_args(False, True, True, True, device, requires_grad=False)
    x, batch_sizes, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, reverse = args
    out, hy, cy, gates, cells = torch.ops.gatedrnn.lstm_forward(*args, True)
    grads = (torch.randn_like(out), torch.randn_like(hy), torch.randn_like(cy))
    common = (*grads, x, batch_sizes, h, c, w_ih, w_hh, w_hr, out, gates, cells, reverse)
    full = torch.ops.gatedrnn.lstm_backward(*common, [True, True, True])
    partial = torch.ops.gatedrnn.lstm_backward(*common, mask)
    wanted = [mask[0], True, True, mask[1], mask[1], mask[2], mask[1]]
    for k, (want, f, p) in enumerate(zip(wanted, full, partial)):
        if want:
            torch.testing.assert_close(p, f, atol=0, rtol=0)
        else:
            assert p.numel() == 0, k

    x, batch_sizes, h, w_ih, w_hh, b_ih, b_hh, reverse = gru_args(True, False, True, device, requires_grad=False)
    out, hy, saved = torch.ops.gatedrnn.gru_forward(x, batch_sizes, h, w_ih, w_hh, b_ih, b_hh, reverse, True)
    common = (torch.randn_like(out), torch.randn_like(hy), x, batch_sizes, h, w_ih, w_hh, out, saved, reverse)
    full = torch.ops.gatedrnn.gru_backward(*common, [True, True, True])
    partial = torch.ops.gatedrnn.gru_backward(*common, mask)
    for want, f, p in zip([mask[0], True, mask[1], mask[1], mask[2], mask[2]], full, partial):
        if want:
            torch.testing.assert_close(p, f, atol=0, rtol=0)
        else:
            assert p.numel() == 0


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_frozen_parts_get_no_gradient(mode):
    """Input without grad and frozen first-layer weights: the rest still matches torch.nn."""
    from utils import twins

    reference, ours = twins(mode, I, H, num_layers=2)
    for module in (reference, ours):
        module.weight_ih_l0.requires_grad_(False)
        module.weight_hh_l0.requires_grad_(False)
    x = torch.randn(5, 2, I, dtype=torch.float64)
    for module in (reference, ours):
        module(x)[0].square().sum().backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), reference.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode,kwargs,packed", [
    ("LSTM", dict(num_layers=2, bidirectional=True), False),
    ("LSTM", dict(proj_size=2), True),
    ("GRU", dict(num_layers=2, bidirectional=True), True),
    ("GRU", dict(bias=False), False),
])
def test_double_backward_matches_torch_nn(mode, kwargs, packed):
    """A gradient penalty: the gradient (create_graph=True) and the gradient of its norm match torch.nn; the
    differentiable path announces itself."""
    from utils import make_input, twins

    reference, ours = twins(mode, I, H, **kwargs)
    results = []
    for module in (reference, ours):
        x, leaf = make_input(5, 3, I, packed="unsorted" if packed else None, lengths=[5, 2, 4] if packed else None)
        out = module(x)[0]
        out = out.data if packed else out
        announced = pytest.warns(UserWarning, match="runs the layer's pure-PyTorch reference")
        with announced if module is ours else contextlib.nullcontext():
            grad = torch.autograd.grad(out.sin().sum(), leaf, create_graph=True)[0]
            results.append([grad, *torch.autograd.grad(grad.square().sum(), [leaf] + list(module.parameters()))])
    torch.testing.assert_close(results[1], results[0], atol=1e-12, rtol=1e-10)


@pytest.mark.filterwarnings("ignore:gatedrnn. differentiating through")
@pytest.mark.parametrize("config", [(False, True, True, True), (True, False, True, False)], ids=_id)
def test_gradgradcheck(config):
    packed, reverse, bias, proj = config
    assert torch.autograd.gradgradcheck(lambda *a: _ops.lstm_layer(*a), lstm_args(packed, reverse, bias, proj))
    assert torch.autograd.gradgradcheck(lambda *a: _ops.gru_layer(*a), gru_args(packed, reverse, bias))


def test_raw_backward_op_is_not_differentiable():
    args = lstm_args(False, False, True, False)
    x, batch_sizes, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, reverse = args
    out, hy, cy, gates, cells = torch.ops.gatedrnn.lstm_forward(*args, True)
    grads = torch.ops.gatedrnn.lstm_backward(torch.ones_like(out), torch.zeros_like(hy), torch.zeros_like(cy), x,
                                             batch_sizes, h, c, w_ih, w_hh, w_hr, out, gates, cells, reverse,
                                             [True, True, True])
    with pytest.raises(RuntimeError, match="backward ops .* are not differentiable"):
        grads[0].sum().backward()


def test_inference_scratch_reuse_across_calls_and_sizes():
    """Inference calls reuse one per-thread gate buffer: alternating sizes, layers and ops must not leak one
    call's values into another's results."""
    expected = {}
    shapes = [(7, 3), (2, 1), (11, 5)]
    for T_, B_ in shapes:
        args = lstm_args(False, False, True, False, requires_grad=False)
        x = torch.randn(T_, B_, I, dtype=torch.float64)
        h, c = torch.randn(B_, H, dtype=torch.float64), torch.randn(B_, H, dtype=torch.float64)
        call = (x, None, h, c, *args[4:])
        expected[(T_, B_)] = (call, reference.lstm_layer(*call))
    for _ in range(2):
        for key, (call, want) in expected.items():
            out = torch.ops.gatedrnn.lstm_forward(*call, False)[:3]
            torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
            gru = gru_args(False, False, True, requires_grad=False)
            torch.ops.gatedrnn.gru_forward(*gru, False)  # another op using the scratch in between
