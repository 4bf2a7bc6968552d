"""Autocast: gatedrnn layers follow torch.nn's policy (output dtypes as torch.nn's), stay accurate, and train
float32 parameters."""
import pytest
import torch

from utils import DEVICES, twins

AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("input_dtype", [torch.float32, "autocast"])
def test_autocast_follows_torch_nn(mode, input_dtype, device):
    reference, ours = twins(mode, 8, 16, num_layers=2, dtype=torch.float32, device=device)
    dtype = AUTOCAST_DTYPE[device]
    x = torch.randn(12, 4, 8, device=device).to(dtype if input_dtype == "autocast" else torch.float32)
    exact, _ = reference.double()(x.double())
    reference.float()
    with torch.autocast(device, dtype=dtype):
        expected, _ = reference(x)
        actual, _ = ours(x)
    assert actual.dtype == expected.dtype
    # Within the autocast dtype's resolution of the float64 answer, and no worse than torch.nn's own error.
    error = (actual.double() - exact).abs().max().item()
    assert error <= max(2 * (expected.double() - exact).abs().max().item(), 2e-2), error


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_autocast_training_updates_float32_parameters(mode):
    _, ours = twins(mode, 8, 16, dtype=torch.float32)
    x = torch.randn(12, 4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours(x)
    out.float().square().sum().backward()
    for name, p in ours.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad.dtype == torch.float32
