"""What ran and what was built: the fused ops really run (not torch.nn, not the reference), and
backend_info() tells the truth about registered kernels."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gatedrnn
from utils import DEVICES


class OpLog(TorchDispatchMode):
    """Records every op that reaches the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,op", [("LSTM", "gatedrnn.lstm"), ("GRU", "gatedrnn.gru"),
                                     ("LSTMCell", "gatedrnn.lstm"), ("GRUCell", "gatedrnn.gru")])
def test_fused_ops_run_forward_and_backward(mode, op, device):
    module = getattr(gatedrnn, mode)(4, 5, **({} if "Cell" in mode else {"num_layers": 2})).to(device)
    x = torch.randn(3, 2, 4, device=device, requires_grad=True)
    if "Cell" in mode:
        x = x[0]
    with OpLog() as log:
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    calls = [o for o in log.ops if o.startswith("gatedrnn.")]
    layers = 1 if "Cell" in mode else 2
    assert calls.count(f"{op}_forward.default") == layers, log.ops
    assert calls.count(f"{op}_backward.default") == layers, log.ops
    # nothing of torch.nn's RNN machinery ran
    assert not [o for o in log.ops if any(k in o for k in ("lstm", "gru")) and not o.startswith("gatedrnn.")]


def test_ops_have_only_device_kernels():
    """No composite (Python-visible decomposition) kernel could run instead of ours."""
    for op in ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward"):
        name = f"gatedrnn::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd")


def test_backend_info():
    info = gatedrnn.backend_info()
    assert info["cpu"] is True
    assert info["torch"] == torch.__version__
    assert info["library"].endswith(".so") or info["library"].endswith(".pyd")
    if info["cuda_compiled"]:
        assert info["cuda_archs"] and info["cuda_runtime"] > 0
        assert info["cuda"] is True  # a CUDA build registers a CUDA kernel for every op
    else:
        assert info["cuda"] is False and info["cuda_archs"] == ""
    # CUDA kernels are registered exactly when they are reported.
    registered = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"gatedrnn::{op}", "CUDA")
                     for op in ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward"))
    assert info["cuda"] == registered


@pytest.mark.parametrize("op", gatedrnn._extension.OPS)
def test_every_op_has_a_cuda_kernel_in_a_cuda_build(op):
    """Checked on the CPU: the dispatcher holds a CUDA kernel for each op of a CUDA build (and none
    otherwise), so CUDA tensors never reach a missing or composite implementation."""
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"gatedrnn::{op}", "CUDA")
    assert has_cuda == gatedrnn.backend_info()["cuda_compiled"]


def test_device_without_kernels_is_refused_clearly(monkeypatch):
    """A device with no fused kernel raises (naming the device) instead of running something else."""
    from gatedrnn import _ops

    monkeypatch.setattr(_ops, "_KERNEL_DEVICES", {"meta"})
    with pytest.raises(NotImplementedError, match="no fused kernels for cpu tensors"):
        gatedrnn.LSTM(3, 4)(torch.randn(2, 1, 3))
    with pytest.raises(NotImplementedError, match="no fused kernels for cpu tensors"):
        gatedrnn.GRUCell(3, 4)(torch.randn(1, 3))


def test_meta_tensors_propagate_shapes():
    module = gatedrnn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, device="meta")
    out, (h, c) = module(torch.empty(5, 7, 3, device="meta"))
    assert out.shape == (5, 7, 4) and h.shape == (4, 7, 2) and c.shape == (4, 7, 4)
