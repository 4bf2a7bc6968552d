"""Property-based tests (hypothesis): random configurations and shapes against torch.nn and the reference.

Bounded: a fixed number of examples drawn deterministically (derandomize), so CI time and results are
stable; raise max_examples or drop derandomize locally to explore further."""
import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gatedrnn  # noqa: E402
from utils import flat_outputs, weighted_sum  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configurations(draw):
    mode = draw(st.sampled_from(["LSTM", "GRU"]))
    H = draw(st.integers(1, 7))
    config = dict(
        mode=mode, I=draw(st.integers(1, 6)), H=H, T=draw(st.integers(1, 8)), B=draw(st.integers(1, 5)),
        layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()),
        bias=draw(st.booleans()), hx=draw(st.booleans()), packed=draw(st.sampled_from([None, "sorted", "unsorted"])),
        proj=draw(st.integers(0, H - 1)) if mode == "LSTM" else 0, seed=draw(st.integers(0, 2**16)))
    if config["packed"]:
        lengths = draw(st.lists(st.integers(1, config["T"]), min_size=config["B"], max_size=config["B"]))
        lengths[draw(st.integers(0, config["B"] - 1))] = config["T"]  # the longest fills T
        config["lengths"] = sorted(lengths, reverse=True) if config["packed"] == "sorted" else lengths
    return config


def _build(c):
    kwargs = dict(num_layers=c["layers"], bidirectional=c["bidirectional"], batch_first=c["batch_first"],
                  bias=c["bias"], **({"proj_size": c["proj"]} if c["proj"] else {}))
    torch.manual_seed(c["seed"])
    reference = getattr(nn, c["mode"])(c["I"], c["H"], **kwargs).double()
    ours = getattr(gatedrnn, c["mode"])(c["I"], c["H"], **kwargs).double()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    shape = (c["B"], c["T"], c["I"]) if c["batch_first"] else (c["T"], c["B"], c["I"])
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    module_input = x
    if c["packed"]:
        module_input = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(c["lengths"]), batch_first=c["batch_first"],
                                                         enforce_sorted=c["packed"] == "sorted")
    leaves, args = [x], (module_input,)
    if c["hx"]:
        d = (2 if c["bidirectional"] else 1) * c["layers"]
        h = torch.randn(d, c["B"], c["proj"] or c["H"], generator=g, dtype=torch.float64, requires_grad=True)
        if c["mode"] == "LSTM":
            cell = torch.randn(d, c["B"], c["H"], generator=g, dtype=torch.float64, requires_grad=True)
            args, leaves = (module_input, (h, cell)), leaves + [h, cell]
        else:
            args, leaves = (module_input, h), leaves + [h]
    return args, leaves


@SETTINGS
@given(configurations())
def test_random_configurations_match_torch_nn(c):
    reference, ours = _build(c)
    results = []
    for module in (reference, ours):
        args, leaves = _inputs(c)
        output, states = flat_outputs(module(*args))
        grads = torch.autograd.grad(weighted_sum([output] + states), leaves + list(module.parameters()))
        results.append(([output] + states, grads))
    torch.testing.assert_close(results[1], results[0], atol=1e-12, rtol=1e-10)


@SETTINGS
@given(configurations())
def test_random_configurations_match_the_reference(c):
    """The op-level oracle, on the same orchestration: gatedrnn.functional vs gatedrnn.reference."""
    _, ours = _build(c)
    args, _ = _inputs(c)
    x = args[0]
    if c["packed"]:
        data, batch_sizes = x.data, x.batch_sizes
    else:
        data, batch_sizes = (x.transpose(0, 1) if c["batch_first"] else x), None
    d = (2 if c["bidirectional"] else 1) * c["layers"]
    B = c["B"]
    states = [torch.zeros(d, B, c["proj"] or c["H"], dtype=torch.float64)]
    if c["mode"] == "LSTM":
        states.append(torch.zeros(d, B, c["H"], dtype=torch.float64))
    kwargs = dict(bias=c["bias"], num_layers=c["layers"], bidirectional=c["bidirectional"])
    if c["mode"] == "LSTM":
        kwargs["proj"] = c["proj"] > 0
    run = getattr(gatedrnn.functional, c["mode"].lower())
    oracle = getattr(gatedrnn.reference, c["mode"].lower())
    torch.testing.assert_close(run(data, batch_sizes, *states, ours._flat_weights, **kwargs),
                               oracle(data, batch_sizes, *states, ours._flat_weights, **kwargs),
                               atol=1e-12, rtol=1e-10)
