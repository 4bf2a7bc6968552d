"""ONNX export (torch.onnx.export(..., dynamo=True)) of models with gatedrnn layers: standard ONNX LSTM and GRU
nodes (one per layer and direction), dynamic batch and sequence length, and ONNX Runtime's outputs equal to
torch.nn's at shapes other than the traced one. What ONNX's nodes cannot express is refused by name."""
import importlib
import subprocess
import sys

import pytest
import torch
from torch.export import Dim

import gatedrnn

onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install onnx)")
pytest.importorskip("onnxscript", reason="ONNX export tests need onnxscript (pip install onnxscript)")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install onnxruntime)")

# (num_layers, bidirectional, batch_first, bias, hx given): every option appears on and off.
CONFIGS = [(1, False, False, True, False), (2, True, True, True, True), (1, True, False, False, True),
           (2, False, True, False, False)]


def _id(config):
    layers, bi, batch_first, bias, hx = config
    return (f"L{layers}{'-bi' if bi else ''}{'-batch_first' if batch_first else ''}{'' if bias else '-nobias'}"
            f"{'-hx' if hx else ''}")


def _twins(mode, layers, bi, batch_first, bias):
    torch.manual_seed(0)
    kwargs = dict(num_layers=layers, bidirectional=bi, batch_first=batch_first, bias=bias)
    reference = getattr(torch.nn, mode)(5, 8, **kwargs).eval()
    ours = getattr(gatedrnn, mode)(5, 8, **kwargs).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _export(model, args, dynamic_shapes, path):
    program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
    program.save(str(path))
    return onnx.load(str(path)), ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_layers_export_as_standard_nodes_that_match_torch_nn(mode, config, tmp_path):
    layers, bi, batch_first, bias, hx_given = config
    reference, ours = _twins(mode, layers, bi, batch_first, bias)
    directions = 2 if bi else 1
    generator = torch.Generator().manual_seed(1)

    def inputs(batch, steps):
        x = torch.randn((batch, steps, 5) if batch_first else (steps, batch, 5), generator=generator)
        states = [torch.randn(layers * directions, batch, 8, generator=generator) for _ in range(2)]
        hx = (tuple(states) if mode == "LSTM" else states[0]) if hx_given else None
        return x, hx

    batch, steps = Dim("batch"), Dim("steps")
    x_dims = {0: batch, 1: steps} if batch_first else {0: steps, 1: batch}
    h_dims = ({1: batch}, {1: batch}) if mode == "LSTM" else {1: batch}
    x, hx = inputs(3, 7)
    args, dynamic = ((x, hx), (x_dims, h_dims)) if hx_given else ((x,), (x_dims,))
    model, session = _export(ours, args, dynamic, tmp_path / "model.onnx")

    nodes = [n for n in model.graph.node if n.op_type in ("LSTM", "GRU", "Loop", "Scan")]
    assert [n.op_type for n in nodes] == [mode] * (layers * directions)
    directions_seen = sorted({a.s.decode() for n in nodes for a in n.attribute if a.name == "direction"})
    assert directions_seen == (["forward", "reverse"] if bi else ["forward"])
    if mode == "GRU":  # torch's GRU applies the reset gate after the recurrent product
        assert all(a.i == 1 for n in nodes for a in n.attribute if a.name == "linear_before_reset")

    for b, t in [(5, 11), (1, 2)]:
        x, hx = inputs(b, t)
        feeds = [x] + ([] if not hx_given else list(hx) if mode == "LSTM" else [hx])
        actual = session.run(None, {i.name: f.numpy() for i, f in zip(session.get_inputs(), feeds)})
        with torch.no_grad():
            out, state = reference(x, hx)
        expected = [out] + (list(state) if mode == "LSTM" else [state])
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(torch.from_numpy(a), e, atol=1e-5, rtol=1e-4)


class _WithLengths(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths):
        output, state = self.rnn(x, lengths=lengths)
        return (output, *state) if isinstance(state, tuple) else (output, state)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_lengths_export_as_sequence_lens(mode, tmp_path):
    """Padded input with lengths= exports as the nodes' sequence_lens; ONNX Runtime then gives torch.nn's
    results on the packed sequence (zero outputs past each length, both directions), at new shapes."""
    reference, ours = _twins(mode, 2, True, True, True)
    batch, steps = Dim("batch"), Dim("steps")
    x = torch.randn(3, 7, 5)
    model, session = _export(_WithLengths(ours).eval(), (x, torch.tensor([7, 2, 5])),
                             ({0: batch, 1: steps}, {0: batch}), tmp_path / "lengths.onnx")
    nodes = [n for n in model.graph.node if n.op_type == mode]
    assert len(nodes) == 4 and all(len(n.input) > 4 and n.input[4] for n in nodes)  # sequence_lens is wired
    for lengths in ([11, 3, 1, 11, 6], [2]):
        x = torch.randn(len(lengths), max(lengths), 5)
        actual = session.run(None, {"x": x.numpy(), "lengths": torch.tensor(lengths).numpy()})
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=True,
                                                         enforce_sorted=False)
        with torch.no_grad():
            out, state = reference(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        expected = [out] + (list(state) if mode == "LSTM" else [state])
        for a, e in zip(actual, expected):
            torch.testing.assert_close(torch.from_numpy(a), e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell"])
def test_cells_export(mode, tmp_path):
    torch.manual_seed(0)
    reference = getattr(torch.nn, mode)(5, 8).eval()
    ours = getattr(gatedrnn, mode)(5, 8).eval()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 5)
    model, session = _export(ours, (x,), ({0: Dim("batch")},), tmp_path / "cell.onnx")
    assert [n.op_type for n in model.graph.node if n.op_type in ("LSTM", "GRU")] == [mode[:-4]]
    x = torch.randn(6, 5)
    actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = reference(x)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(torch.from_numpy(a), e, atol=1e-5, rtol=1e-4)


def test_proj_size_is_refused_by_name(tmp_path):
    model = gatedrnn.LSTM(5, 8, proj_size=3).eval()
    with pytest.raises(Exception, match="ONNX export of an LSTM with proj_size is not supported"):
        torch.onnx.export(model, (torch.randn(4, 2, 5),), dynamo=True, verbose=False)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_layer_norm_is_refused_by_name(mode):
    model = getattr(gatedrnn, mode)(5, 8, layer_norm=True).eval()
    with pytest.raises(Exception, match="ONNX export of layer_norm=True is not supported"):
        torch.onnx.export(model, (torch.randn(4, 2, 5),), dynamo=True, verbose=False)


def test_the_op_itself_refuses_layer_norm():
    """Called directly, with a layer_norm tensor, the op's translation refuses it too."""

    class RawOp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_ih, self.w_hh = torch.nn.Parameter(torch.randn(24, 5)), torch.nn.Parameter(torch.randn(24, 8))
            self.norm = torch.nn.Parameter(torch.ones(2, 48))

        def forward(self, x):
            return torch.ops.gatedrnn.gru_forward(x, None, x.new_zeros(x.size(1), 8), self.w_ih, self.w_hh, None,
                                                  None, False, False, layer_norm=self.norm)[0]

    with pytest.raises(Exception, match="ONNX export of layer_norm=True is not supported"):
        torch.onnx.export(RawOp().eval(), (torch.randn(4, 2, 5),), dynamo=True, verbose=False)


def test_packed_input_is_refused_by_name():
    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = gatedrnn.GRU(5, 8)

        def forward(self, x):
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 2]))
            return self.gru(packed)[1]

    with pytest.raises(Exception, match="ONNX export of PackedSequence input is not supported"):
        torch.onnx.export(Packed().eval(), (torch.randn(4, 2, 5),), dynamo=True, verbose=False)


def test_the_op_itself_refuses_a_projection():
    """Called directly (not through a module), the op's translation still refuses what has no ONNX node."""

    class RawOp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_ih, self.w_hh = torch.nn.Parameter(torch.randn(32, 5)), torch.nn.Parameter(torch.randn(32, 3))
            self.w_hr = torch.nn.Parameter(torch.randn(3, 8))

        def forward(self, x):
            h0, c0 = x.new_zeros(x.size(1), 3), x.new_zeros(x.size(1), 8)
            return torch.ops.gatedrnn.lstm_forward(x, None, h0, c0, self.w_ih, self.w_hh, None, None, self.w_hr,
                                                   False, False)[0]

    with pytest.raises(Exception, match="ONNX export of an LSTM with proj_size is not supported"):
        torch.onnx.export(RawOp().eval(), (torch.randn(4, 2, 5),), dynamo=True, verbose=False)


def test_export_without_the_translations_says_why(monkeypatch):
    """Where the translations could not be registered, the modules' check names the reason (the export then
    fails either way: the exporter finds no function for gatedrnn's ops)."""
    from gatedrnn import _onnx

    importlib.import_module(_onnx._REGISTRY_MODULE)  # what an export imports first: the translations register
    _onnx.check_export()
    monkeypatch.setattr(_onnx, "_unavailable", "onnxscript is not installed (pip install onnxscript)")
    with pytest.raises(RuntimeError, match="ONNX export is unavailable: onnxscript is not installed"):
        _onnx.check_export()


IMPORT_ORDER = r"""
import sys, torch
if sys.argv[1] == "registry_first":
    import onnxscript.function_libs.torch_lib.registration
import gatedrnn
print("onnxscript" in sys.modules, gatedrnn._onnx._unavailable)
program = torch.onnx.export(gatedrnn.GRU(3, 4).eval(), (torch.randn(2, 1, 3),), dynamo=True, verbose=False)
print(gatedrnn._onnx._unavailable, [node.op_type for node in program.model.graph if node.op_type in ("GRU", "LSTM")])
"""


@pytest.mark.parametrize("order", ["gatedrnn_first", "registry_first"])
def test_import_leaves_onnxscript_alone_and_an_export_finds_the_translations(order):
    """`import gatedrnn` does not import onnxscript (that doubled its import time): the translations are
    registered when onnxscript's registry is imported (by the exporter), or at once if it was imported first.
    Fresh processes, so that nothing else has imported onnxscript before."""
    result = subprocess.run([sys.executable, "-c", IMPORT_ORDER, order], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    at_import, after_export = result.stdout.strip().splitlines()[-2:]
    assert at_import == ("True None" if order == "registry_first" else "False not registered yet")
    assert after_export == "None ['GRU']"


def test_dropout_variants_export_in_evaluation_mode_only(tmp_path):
    """In evaluation the dropout variants are off, so the layer exports as the plain node and ONNX Runtime gives
    the plain layer's results; in training their masks have no ONNX equivalent and the export is refused."""
    torch.manual_seed(0)
    ours = gatedrnn.GRU(5, 8, weight_dropout=0.3, recurrent_dropout=0.3, input_dropout=0.3).eval()
    reference = torch.nn.GRU(5, 8).eval()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, 5)
    _, session = _export(ours, (x,), ({0: Dim("steps"), 1: Dim("batch")},), tmp_path / "gru.onnx")
    x = torch.randn(4, 2, 5)
    actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = reference(x)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(torch.from_numpy(a), e, atol=1e-5, rtol=1e-4)
    with pytest.raises(Exception, match="dropout masks"):
        torch.onnx.export(ours.train(), (x,), dynamo=True)


def test_gru_reset_before_exports_with_linear_before_reset_0(tmp_path):
    """GRU(reset_after=False) exports as GRU nodes with linear_before_reset=0, ONNX's own formulation of Cho et
    al.'s cell: ONNX Runtime is an independent implementation of it, checked here against the fused kernels
    (bidirectional, two layers, padded input with lengths) at shapes other than the traced one."""
    torch.manual_seed(0)
    ours = gatedrnn.GRU(5, 8, num_layers=2, bidirectional=True, batch_first=True, reset_after=False).eval()
    batch, steps = Dim("batch"), Dim("steps")
    model, session = _export(_WithLengths(ours), (torch.randn(3, 7, 5), torch.tensor([7, 2, 5])),
                             ({0: batch, 1: steps}, {0: batch}), tmp_path / "reset_before.onnx")
    nodes = [n for n in model.graph.node if n.op_type == "GRU"]
    assert len(nodes) == 4
    assert all(a.i == 0 for n in nodes for a in n.attribute if a.name == "linear_before_reset")
    for lengths in ([11, 3, 1, 11, 6], [2]):
        x = torch.randn(len(lengths), max(lengths), 5)
        actual = session.run(None, {"x": x.numpy(), "lengths": torch.tensor(lengths).numpy()})
        with torch.no_grad():
            expected = _WithLengths(ours)(x, torch.tensor(lengths))
            plain = gatedrnn.GRU(5, 8, num_layers=2, bidirectional=True, batch_first=True).eval()
            plain.load_state_dict(ours.state_dict())
            assert not torch.allclose(plain(x, lengths=torch.tensor(lengths))[0], expected[0], atol=1e-3)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(torch.from_numpy(a), e, atol=1e-5, rtol=1e-4)
