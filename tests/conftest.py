"""Test-wide settings."""
import pytest
import torch


@pytest.fixture(autouse=True)
def full_float32_oracles():
    """torch.nn is an oracle on CUDA too: its float32 RNNs (cuDNN, which allows TF32 by default) and GEMMs
    must not use TF32, whose 10-bit mantissa would make the float32 comparisons measure cuDNN's rounding
    instead of ours. Restored after each test."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous
