"""torch.compile(fullgraph=True) traces gatedrnn layers without a graph break (torch.nn's RNNs cannot),
and the compiled model's outputs and gradients match eager mode."""
import pytest
import torch
from torch import nn

import gatedrnn


@pytest.fixture(autouse=True)
def fresh_compile():
    """Each test compiles from scratch: no Dynamo state or Inductor on-disk cache from earlier runs (the
    cache key does not cover our fake kernels, so a stale entry could hide a fake-kernel bug)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False, fx_graph_remote_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


class Tagger(nn.Module):
    def __init__(self, mode, **kwargs):
        super().__init__()
        self.rnn = getattr(gatedrnn, mode)(8, 16, **kwargs)
        directions = 2 if kwargs.get("bidirectional") else 1
        self.head = nn.Linear(directions * kwargs.get("proj_size", 0) or directions * 16, 3)

    def forward(self, x, hx=None):
        out, _ = self.rnn(x, hx)
        return self.head(out)


CASES = [
    ("LSTM", dict(num_layers=2, bidirectional=True, dropout=0.0)),
    ("LSTM", dict(proj_size=4, batch_first=True)),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True)),
]


@pytest.mark.parametrize("mode,kwargs", CASES)
def test_compile_fullgraph_matches_eager(mode, kwargs):
    torch.manual_seed(0)
    model = Tagger(mode, **kwargs)
    x = torch.randn(5, 7, 8, requires_grad=True)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x] + list(model.parameters()))

    compiled = torch.compile(model, fullgraph=True)
    actual = compiled(x)
    actual_grads = torch.autograd.grad(actual.square().sum(), [x] + list(model.parameters()))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual_grads, expected_grads, atol=1e-4, rtol=1e-4)


def test_compiled_graph_calls_gatedrnn_ops():
    """The traced graph holds our custom op (not an inlined decomposition or torch.nn's RNN)."""
    model = gatedrnn.GRU(4, 6)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(torch.randn(3, 2, 4))
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert any("gatedrnn.gru_forward" in t for t in targets), targets
    assert not any("aten.gru" in t or "_VF" in t for t in targets), targets


def test_compiled_training_uses_fused_backward():
    """AOTAutograd traces our backward op into the backward graph (not the differentiable reference path that
    only create_graph=True takes)."""
    import warnings

    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    model = gatedrnn.LSTM(4, 6, num_layers=2)
    graphs = []

    def backend(gm, example_inputs):
        def compiler(graph, inputs):
            graphs.append(graph)
            return make_boxed_func(graph.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, bw_compiler=compiler)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the reference path would warn
        out, _ = torch.compile(model, backend=backend, fullgraph=True)(torch.randn(3, 2, 4, requires_grad=True))
        out.sum().backward()
    targets = [[str(n.target) for n in g.graph.nodes if n.op == "call_function"] for g in graphs]
    assert sum(t.count("gatedrnn.lstm_forward.default") for t in targets) == 2, targets
    assert sum(t.count("gatedrnn.lstm_backward.default") for t in targets) == 2, targets
