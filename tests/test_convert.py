"""gatedrnn.convert on models written the way the classic tutorials write them: identical outputs before and
after conversion (float64), identical parameters after a few optimizer steps, the same Parameter objects
(so an optimizer built before still fits), the same state_dict keys, and the fused kernels really running
afterwards. Modules it cannot convert are left alone and named in a warning."""
import copy
import warnings

import pytest
import torch
from torch import nn

import gatedrnn
from gatedrnn import _extension

torch.manual_seed(0)
VOCAB, EMBED, HIDDEN, CLASSES, T, B = 50, 12, 16, 5, 7, 4


class Classifier(nn.Module):
    """Embedding, an LSTM or GRU, the last hidden state into a linear layer."""

    def __init__(self, rnn):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, EMBED)
        self.rnn = rnn(EMBED, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, tokens):
        _, state = self.rnn(self.embedding(tokens))
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])


class Tagger(nn.Module):
    """A bidirectional LSTM tagger: one label per token."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, EMBED)
        self.lstm = nn.LSTM(EMBED, HIDDEN, bidirectional=True, batch_first=True)
        self.tags = nn.Linear(2 * HIDDEN, CLASSES)

    def forward(self, tokens):
        return self.tags(self.lstm(self.embedding(tokens))[0])


class DeepEncoder(nn.Module):
    """Three bidirectional LSTM layers with LayerNorm and dropout between them."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.LSTM(EMBED if k == 0 else 2 * HIDDEN, HIDDEN, bidirectional=True)
                                     for k in range(3)])
        self.norms = nn.ModuleList([nn.LayerNorm(2 * HIDDEN) for _ in range(2)])
        self.dropout = nn.Dropout(0.3)

    def forward(self, x):
        for k, layer in enumerate(self.layers):
            x = layer(x)[0]
            if k < 2:
                x = self.dropout(self.norms[k](x))
        return x.sum(0)


class AttentionPooling(nn.Module):
    """An LSTM whose outputs are pooled by learned attention weights."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(EMBED, HIDDEN, batch_first=True)
        self.score = nn.Linear(HIDDEN, 1)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        out, _ = self.lstm(x)
        weights = torch.softmax(self.score(out), dim=1)
        return self.head((weights * out).sum(1))


class CellLoop(nn.Module):
    """A GRUCell and an LSTMCell unrolled by hand."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRUCell(EMBED, HIDDEN)
        self.lstm = nn.LSTMCell(HIDDEN, HIDDEN)

    def forward(self, x):
        h = torch.zeros(x.size(1), HIDDEN, dtype=x.dtype)
        state = None
        for x_t in x:
            h = self.gru(x_t, h)
            state = self.lstm(h, state)
        return state[0]


def _inputs(name, generator):
    if name in ("classifier-lstm", "classifier-gru", "tagger"):
        return torch.randint(0, VOCAB, (B, T), generator=generator)
    if name == "attention":
        return torch.randn(B, T, EMBED, generator=generator, dtype=torch.float64)
    return torch.randn(T, B, EMBED, generator=generator, dtype=torch.float64)


MODELS = {"classifier-lstm": lambda: Classifier(nn.LSTM), "classifier-gru": lambda: Classifier(nn.GRU),
          "tagger": Tagger, "deep-encoder": DeepEncoder, "attention": AttentionPooling, "cells": CellLoop}


def _build(name):
    torch.manual_seed(1)
    return MODELS[name]().double()


def _outputs(model, x, seed=3):
    torch.manual_seed(seed)  # the same dropout masks on both sides
    return model(x)


def _recurrent_types(model):
    return [type(m) for m in model.modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase, gatedrnn.LSTM,
                                                                gatedrnn.GRU, gatedrnn.LSTMCell, gatedrnn.GRUCell))]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_converted_model_gives_identical_outputs(name, training):
    model = _build(name).train(training)
    converted = gatedrnn.convert(model)
    assert all(t.__module__.startswith("torch.nn") for t in _recurrent_types(model)), "the original was changed"
    assert _recurrent_types(converted) and all(t.__module__ == "gatedrnn.modules" for t in _recurrent_types(converted))
    assert list(converted.state_dict()) == list(model.state_dict())
    assert converted.training == training and all(m.training == training for m in converted.modules())
    x = _inputs(name, torch.Generator().manual_seed(2))
    before = _extension.kernel_calls()
    actual = _outputs(converted, x)
    assert sum(_extension.kernel_calls().values()) > sum(before.values()), "the fused kernels did not run"
    torch.testing.assert_close(actual, _outputs(model, x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", list(MODELS))
def test_identical_parameters_after_optimizer_steps(name):
    reference = _build(name).train()
    converted = gatedrnn.convert(reference)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (reference, converted)]
    generator = torch.Generator().manual_seed(4)
    for step in range(3):
        x = _inputs(name, generator)
        for model, optimizer in zip((reference, converted), optimizers):
            optimizer.zero_grad()
            _outputs(model, x, seed=step).square().mean().backward()
            optimizer.step()
    for (key, a), (_, b) in zip(reference.named_parameters(), converted.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-9, msg=key)


def test_inplace_keeps_the_parameter_objects_so_an_existing_optimizer_still_fits():
    model = _build("tagger")
    model.embedding.weight.requires_grad_(False)  # a frozen layer stays frozen
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    params = dict(model.named_parameters())
    converted = gatedrnn.convert(model, inplace=True)
    assert converted is model and isinstance(model.lstm, gatedrnn.LSTM)
    assert all(p is params[name] for name, p in model.named_parameters())
    assert not model.embedding.weight.requires_grad
    before = model.lstm.weight_hh_l0_reverse.detach().clone()
    model(_inputs("tagger", torch.Generator().manual_seed(0))).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.lstm.weight_hh_l0_reverse)


def test_a_stateful_truncated_bptt_loop_runs_the_same_after_conversion():
    """Carrying (h, c) across batches, detached at each boundary, as TBPTT tutorials do."""
    torch.manual_seed(5)
    reference = nn.LSTM(3, HIDDEN, num_layers=2).double()
    converted = gatedrnn.convert(reference)
    series = torch.randn(40, 2, 3, dtype=torch.float64)
    states = {}
    for model in (reference, converted):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        state, outputs = None, []
        for chunk in series.split(8):
            out, state = model(chunk, state)
            state = tuple(s.detach() for s in state)
            optimizer.zero_grad()
            out.square().mean().backward()
            optimizer.step()
            outputs.append(out.detach())
        states[model] = (torch.cat(outputs), state)
    torch.testing.assert_close(states[converted][0], states[reference][0], atol=1e-11, rtol=1e-9)
    for a, b in zip(states[converted][1], states[reference][1]):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_the_model_itself_may_be_a_recurrent_module():
    lstm = nn.LSTM(3, 8, num_layers=2, bidirectional=True, proj_size=4, batch_first=True, dropout=0.25).double()
    ours = gatedrnn.convert(lstm)
    assert isinstance(ours, gatedrnn.LSTM) and isinstance(lstm, nn.LSTM)
    assert (ours.proj_size, ours.batch_first, ours.dropout, ours.num_layers) == (4, True, 0.25, 2)
    assert all(a is not b and torch.equal(a, b) for a, b in zip(lstm.parameters(), ours.parameters()))


def test_back_to_torch():
    model = _build("deep-encoder").eval()
    there = gatedrnn.convert(model)
    back = gatedrnn.convert(there, to="torch")
    assert all(t is nn.LSTM for t in _recurrent_types(back))
    x = _inputs("deep-encoder", torch.Generator().manual_seed(0))
    torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


def test_converting_twice_changes_nothing_and_warns_nothing():
    converted = gatedrnn.convert(_build("cells"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = gatedrnn.convert(converted, inplace=True)
    assert again is converted


def test_forward_hooks_carry_over():
    model = _build("attention")
    seen = []
    model.lstm.register_forward_hook(lambda module, args, output: seen.append(type(module)))
    converted = gatedrnn.convert(model)
    converted(_inputs("attention", torch.Generator().manual_seed(0)))
    assert seen == [gatedrnn.LSTM]


class MyLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        return super().forward(x * 2, hx)


@pytest.mark.parametrize("make,reason", [
    (lambda: nn.RNN(3, 4), "torch.nn.modules.rnn.RNN has no counterpart"),
    (lambda: nn.RNNCell(3, 4), "RNNCell has no counterpart"),
    (lambda: MyLSTM(3, 4), "subclasses torch.nn.modules.rnn.LSTM"),
    (lambda: nn.utils.parametrizations.weight_norm(nn.GRU(3, 4), "weight_hh_l0"), "parametrized"),
    (lambda: torch.jit.script(nn.LSTMCell(3, 4)), "TorchScript"),
], ids=["rnn", "rnn-cell", "subclass", "weight-norm", "torchscript"])
def test_what_cannot_be_converted_is_left_alone_and_named(make, reason):
    model = nn.Sequential()
    model.add_module("encoder", make())
    model.add_module("head", nn.GRU(4, 2))
    with pytest.warns(UserWarning, match=rf"encoder \(.*{reason}"):
        converted = gatedrnn.convert(model)
    assert type(converted.encoder) is type(model.encoder) and isinstance(converted.head, gatedrnn.GRU)


def test_bad_arguments():
    with pytest.raises(ValueError, match="to must be 'gatedrnn' or 'torch'"):
        gatedrnn.convert(nn.LSTM(2, 3), to="cudnn")
    with pytest.raises(TypeError, match="expects an nn.Module"):
        gatedrnn.convert(copy)


def test_variants_torch_nn_lacks_are_not_converted_back_silently():
    """to="torch" would drop zoneout or dropout variants: such modules are left as they are and named;
    forget_bias only initialises, so it converts."""
    model = nn.Sequential(gatedrnn.LSTM(3, 4, zoneout=0.1), gatedrnn.GRU(4, 4, recurrent_dropout=0.2),
                          gatedrnn.LSTM(4, 4, forget_bias=1.0), gatedrnn.GRU(4, 4, reset_after=False),
                          gatedrnn.GRUCell(4, 4, reset_after=False), gatedrnn.LSTM(4, 4, layer_norm=True),
                          gatedrnn.LSTMCell(4, 4, layer_norm=True))
    with pytest.warns(UserWarning, match=r"0 \(it uses zoneout=0.1.*1 \(it uses recurrent_dropout=0.2.*"
                                         r"3 \(it uses reset_after=False.*4 \(it uses reset_after=False.*"
                                         r"5 \(it uses layer_norm=True.*6 \(it uses layer_norm=True"):
        back = gatedrnn.convert(model, to="torch")
    assert [type(m) for m in back] == [gatedrnn.LSTM, gatedrnn.GRU, nn.LSTM, gatedrnn.GRU, gatedrnn.GRUCell,
                                       gatedrnn.LSTM, gatedrnn.LSTMCell]
