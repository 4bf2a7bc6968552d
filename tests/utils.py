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

