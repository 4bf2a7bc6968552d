"""`weight_dropout=p`: DropConnect on W_hh (AWD-LSTM's weight dropout), one mask per layer, direction and forward
call in training, applied by the ops (csrc/op_entry.h) to the weight their fused kernels run on.

Oracle: torch.nn's own layer run with W_hh * mask in place of W_hh (torch.func.functional_call), so that autograd
through the multiplication gives the gradient that must reach the unmasked parameter."""
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import gatedrnn
from gatedrnn import _ops, reference
from utils import DEVICES

T, B, I, H = 6, 4, 3, 5
P = 0.4


def _torch_nn_with_masks(ref, p, seed):
    """torch.nn's parameters with every weight_hh multiplied by the mask gatedrnn draws from `seed` (in layer and
    direction order, each kept with probability 1 - p and scaled by 1 / (1 - p))."""
    torch.manual_seed(seed)
    params = dict(ref.named_parameters())
    for name in ref._flat_weights_names:
        if name.startswith("weight_hh"):
            params[name] = params[name] * _ops.weight_dropout_mask(p, True, params[name])
    return params


CASES = [("LSTM", {}), ("LSTM", {"num_layers": 2, "bidirectional": True}), ("LSTM", {"proj_size": 2}),
         ("GRU", {"batch_first": True}), ("GRU", {"num_layers": 2, "bidirectional": True})]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("mode,kwargs", CASES, ids=[f"{m}-{'-'.join(k) or 'plain'}" for m, k in CASES])
def test_matches_torch_nn_with_the_masked_weight(mode, kwargs, packed, device):
    """Outputs, final states and the gradients of the input and of every parameter (the unmasked W_hh's
    included) equal torch.nn's with W_hh * mask, float64."""
    torch.manual_seed(0)
    ref = getattr(nn, mode)(I, H, dtype=torch.float64, device=device, **kwargs)
    ours = getattr(gatedrnn, mode)(I, H, dtype=torch.float64, device=device, weight_dropout=P, **kwargs)
    ours.load_state_dict(ref.state_dict())
    batch_first = kwargs.get("batch_first", False)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64, device=device,
                    requires_grad=True)
    inputs = pack_padded_sequence(x, torch.tensor([6, 2, 4, 5]), batch_first=batch_first,
                                  enforce_sorted=False) if packed else x
    torch.manual_seed(1)
    output, state = ours(inputs)
    expected_output, expected_state = functional_call(ref, _torch_nn_with_masks(ref, P, 1), (inputs,))
    if packed:
        output, expected_output = output.data, expected_output.data
    states = list(state) if isinstance(state, tuple) else [state]
    expected_states = list(expected_state) if isinstance(expected_state, tuple) else [expected_state]
    for a, e in zip([output, *states], [expected_output, *expected_states]):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    loss = lambda outs: sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=device).view_as(o)).pow(2)
                            .sum() for o in outs)  # noqa: E731
    ours_grads = torch.autograd.grad(loss([output, *states]), [x, *ours.parameters()], retain_graph=True)
    ref_grads = torch.autograd.grad(loss([expected_output, *expected_states]), [x, *ref.parameters()])
    for (name, _), a, e in zip([("input", None), *ours.named_parameters()], ours_grads, ref_grads):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


def test_one_mask_per_call_and_none_in_eval():
    lstm = gatedrnn.LSTM(I, H, weight_dropout=0.5)
    plain = gatedrnn.LSTM(I, H)
    plain.load_state_dict(lstm.state_dict())
    x = torch.randn(T, B, I)
    torch.manual_seed(2)
    first = lstm(x)[0]
    torch.manual_seed(2)
    torch.testing.assert_close(lstm(x)[0], first, atol=0, rtol=0)  # the seed reproduces the mask
    assert not torch.equal(lstm(x)[0], first)  # the next call draws another mask
    lstm.eval()
    torch.testing.assert_close(lstm(x)[0], plain(x)[0], atol=0, rtol=0)  # evaluation uses W_hh as it is
    assert torch.equal(lstm.weight_hh_l0, plain.weight_hh_l0)  # the parameter itself is never changed


def test_a_probability_of_one_drops_every_recurrent_weight():
    gru = gatedrnn.GRU(I, H, weight_dropout=1.0)
    cut = gatedrnn.GRU(I, H)
    cut.load_state_dict(gru.state_dict())
    with torch.no_grad():
        cut.weight_hh_l0.zero_()
    x = torch.randn(T, B, I)
    torch.testing.assert_close(gru(x)[0], cut(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_gradcheck_and_opcheck(mode, device):
    g = torch.Generator().manual_seed(3)

    def rand(*shape, grad=True):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_(grad)

    gates = 4 if mode == "LSTM" else 3
    states = [rand(B, H), rand(B, H)] if mode == "LSTM" else [rand(B, H)]
    args = [rand(T, B, I), None, *states, rand(gates * H, I), rand(gates * H, H), rand(gates * H), rand(gates * H)]
    mask = (torch.rand(gates * H, H, generator=g, dtype=torch.float64) >= 0.3).double().div(0.7).to(device)
    if mode == "LSTM":
        fn = lambda *a: _ops.lstm_layer(*a, None, True, None, None, None, mask)  # noqa: E731
        expected = reference.lstm_layer(*args, None, True, weight_hh_mask=mask)
        op, forward_args = torch.ops.gatedrnn.lstm_forward, (*args, None, True, True, None, None, None, mask)
    else:
        fn = lambda *a: _ops.gru_layer(*a, True, None, None, mask)  # noqa: E731
        expected = reference.gru_layer(*args, None, True, weight_hh_mask=mask)
        op, forward_args = torch.ops.gatedrnn.gru_forward, (*args, True, True, None, None, mask)
    for a, e in zip(fn(*args), expected):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(fn, args)
    torch.library.opcheck(op, [a.detach() if isinstance(a, torch.Tensor) else a for a in forward_args])


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="weight_dropout should be a number in range"):
        gatedrnn.GRU(I, H, weight_dropout=-0.5)
    assert "weight_dropout=0.25" in repr(gatedrnn.LSTM(I, H, weight_dropout=0.25))
    x, h, c = torch.randn(T, B, I), torch.zeros(B, H), torch.zeros(B, H)
    w_ih, w_hh = torch.randn(4 * H, I), torch.randn(4 * H, H)
    with pytest.raises(RuntimeError, match=r"expected weight_hh_mask to be like weight_hh \(Float \[20, 5\]"):
        torch.ops.gatedrnn.lstm_forward(x, None, h, c, w_ih, w_hh, None, None, None, False, False, None, None, None,
                                        torch.ones(4 * H, H + 1))
