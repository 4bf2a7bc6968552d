"""torch.export and AOTInductor: a model with gatedrnn layers exports with gatedrnn's ops as single graph
nodes (one per layer and direction, no decomposition), with a dynamic batch and a dynamic sequence length,
and the exported program matches eager at shapes other than the traced one, forward and backward. AOTInductor
compiles it into a package that runs our ops from C++ (on the CPU here)."""
import os

import pytest
import torch
from torch.export import Dim, export

import gatedrnn


class Encoder(torch.nn.Module):
    def __init__(self, batch_first, proj_size=0):
        super().__init__()
        self.lstm = gatedrnn.LSTM(5, 8, num_layers=2, bidirectional=True, batch_first=batch_first,
                                  proj_size=proj_size)
        self.gru = gatedrnn.GRU(2 * (proj_size or 8), 6, batch_first=batch_first)
        self.cell = gatedrnn.GRUCell(6, 4)

    def forward(self, x, h0):
        y = self.lstm(x)[0]
        y, h = self.gru(y, h0)
        return y, self.cell(h[0])


def _inputs(batch, steps, batch_first, generator):
    shape = (batch, steps, 5) if batch_first else (steps, batch, 5)
    return torch.randn(shape, generator=generator), torch.randn(1, batch, 6, generator=generator)


def _gatedrnn_nodes(program):
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function" and "gatedrnn" in str(n.target)]


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("proj_size", [0, 3], ids=["plain", "proj"])
def test_export_keeps_the_ops_and_matches_eager_at_other_shapes(batch_first, proj_size):
    torch.manual_seed(0)
    model = Encoder(batch_first, proj_size).eval()
    generator = torch.Generator().manual_seed(1)
    batch, steps = Dim("batch", min=1), Dim("steps", min=1)
    time_dim, batch_dim = (1, 0) if batch_first else (0, 1)
    program = export(model, _inputs(3, 7, batch_first, generator),
                     dynamic_shapes={"x": {batch_dim: batch, time_dim: steps}, "h0": {1: batch}})
    # 2 layers x 2 directions of LSTM, one GRU layer, one GRUCell step: each one fused op.
    nodes = _gatedrnn_nodes(program)
    assert nodes.count("gatedrnn.lstm_forward.default") == 4 and nodes.count("gatedrnn.gru_forward.default") == 2
    assert not [n for n in program.graph.nodes if "aten.lstm" in str(n.target) or "aten.gru" in str(n.target)]
    for b, t in [(1, 1), (5, 11), (2, 30)]:
        inputs = _inputs(b, t, batch_first, generator)
        for actual, expected in zip(program.module()(*inputs), model(*inputs)):
            torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_exported_program_trains():
    """The exported module's backward runs through the ops' registered autograd and gives eager's gradients."""
    torch.manual_seed(0)
    model = Encoder(batch_first=False).train()
    generator = torch.Generator().manual_seed(2)
    batch = Dim("batch", min=1)
    program = export(model, _inputs(3, 7, False, generator),
                     dynamic_shapes={"x": {0: Dim("steps", min=1), 1: batch}, "h0": {1: batch}})
    exported = program.module()
    x, h0 = _inputs(4, 9, False, generator)
    grads = []
    for module in (exported, model):
        leaf = x.clone().requires_grad_()
        y, h = module(leaf, h0)
        (y.square().sum() + h.sum()).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_aot_inductor_package_runs_the_ops(tmp_path):
    torch.manual_seed(0)
    model = Encoder(batch_first=True).eval()
    generator = torch.Generator().manual_seed(3)
    batch, steps = Dim("batch", min=1), Dim("steps", min=1)
    program = export(model, _inputs(3, 7, True, generator),
                     dynamic_shapes={"x": {0: batch, 1: steps}, "h0": {1: batch}})
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "encoder.pt2"))
    assert os.path.getsize(package) > 0
    runner = torch._inductor.aoti_load_package(package)
    inputs = _inputs(5, 12, True, generator)
    with torch.no_grad():
        for actual, expected in zip(runner(*inputs), model(*inputs)):
            torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
