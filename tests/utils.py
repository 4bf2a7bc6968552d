"""Shared test helpers: device list, twin torch.nn/gatedrnn modules, inputs, and comparisons."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gatedrnn


def _cuda_param():
    if not torch.cuda.is_available():
        return pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA GPU on this machine"))
    if not gatedrnn.backend_info()["cuda"]:
        return pytest.param("cuda", marks=pytest.mark.skip(reason="gatedrnn was built without CUDA kernels"))
    return "cuda"


# Every device test runs on: the CPU always, CUDA where a GPU and CUDA kernels are present.
DEVICES = ["cpu", _cuda_param()]


def twins(mode, *args, dtype=torch.float64, device="cpu", seed=0, **kwargs):
    """A torch.nn module and a gatedrnn module with the same weights."""
    torch.manual_seed(seed)
    reference = getattr(nn, mode)(*args, **kwargs).to(device=device, dtype=dtype)
    ours = getattr(gatedrnn, mode)(*args, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def make_input(T, B, I, *, batch_first=False, packed=None, dtype=torch.float64, device="cpu", lengths=None,
               seed=1):
    """Returns (module input, leaf tensor whose gradient to compare).

    The module input is dense [T, B, I] (or batch-first), or a PackedSequence of it when packed is 'sorted'
    or 'unsorted' (default lengths: T and shorter ones, not sorted for 'unsorted')."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_()
    if packed is None:
        return x, x
    if lengths is None:
        lengths = [T] + [max(1, T - 1 - 2 * k) for k in range(1, B)]
        if packed == "unsorted":
            lengths = lengths[1:] + lengths[:1]
    packed_input = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                        enforce_sorted=packed == "sorted")
    return packed_input, x


def flat_outputs(result):
    """(output tensor, [state tensors]) from an RNN module's result."""
    output, state = result
    if isinstance(output, nn.utils.rnn.PackedSequence):
        output = output.data
    states = list(state) if isinstance(state, tuple) else [state]
    return output, states


def weighted_sum(tensors, seed=2):
    """A scalar loss with a distinct random weight per element, so every gradient path is exercised."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for t in tensors:
        w = torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
        total = total + (t * w).sum()
    return total



# Small layer-op arguments shared by the variant tests (zoneout, dropout): T, B, I, H and packed lengths.
VARIANT_SIZES = (6, 4, 3, 5)
VARIANT_LENGTHS = [6, 3, 5, 1]


def variant_layer_args(mode, layout, generator, device="cpu"):
    """Arguments of _ops.lstm_layer / gru_layer up to the biases (weight_hr, reverse and the options follow),
    float64 leaves that require grad: dense [T, B, I] input, or with layout "packed" the packed rows of
    VARIANT_LENGTHS (any other layout, such as "lengths", is dense)."""
    T, B, I, H = VARIANT_SIZES

    def rand(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(device).requires_grad_()

    gates = 4 if mode == "LSTM" else 3
    batch_sizes = None
    if layout == "packed":
        batch_sizes = torch.tensor([sum(1 for n in VARIANT_LENGTHS if n > t) for t in range(max(VARIANT_LENGTHS))])
        x = rand(int(batch_sizes.sum()), I)
    else:
        x = rand(T, B, I)
    states = [rand(B, H), rand(B, H)] if mode == "LSTM" else [rand(B, H)]
    return [x, batch_sizes, *states, rand(gates * H, I), rand(gates * H, H), rand(gates * H), rand(gates * H)]



def assert_same_results_and_grads(ours, expected, inputs, generator, tol=1e-12):
    """Two implementations' outputs (sequences of tensors) agree, and so do the gradients of `inputs` under the
    same random cotangents."""
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e, atol=tol, rtol=tol)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in ours]
    for a, e in zip(torch.autograd.grad(ours, inputs, cotangents), torch.autograd.grad(expected, inputs, cotangents)):
        torch.testing.assert_close(a, e, atol=tol, rtol=tol)
