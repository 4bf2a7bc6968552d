"""What every variant (zoneout, weight dropout, recurrent and input dropout) must keep from the plain layers:
the fused step kernels run (one call per step and thread, forward and backward), torch.compile(fullgraph=True)
traces it in training and evaluation, and a PackedSequence gives the reference's results from the same draws."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import gatedrnn
from gatedrnn import reference
from test_cpu_tiles import calls_during
from utils import VARIANT_LENGTHS, VARIANT_SIZES

T, B, I, H = VARIANT_SIZES
VARIANTS = [
    ("LSTM", dict(zoneout=0.3, zoneout_cell=0.3)),
    ("GRU", dict(zoneout=0.3)),
    ("LSTM", dict(weight_dropout=0.3)),
    ("GRU", dict(weight_dropout=0.3)),
    ("LSTM", dict(recurrent_dropout=0.3, input_dropout=0.2)),
    ("GRU", dict(recurrent_dropout=0.3, input_dropout=0.2)),
]
IDS = [f"{mode}-{'-'.join(kwargs)}" for mode, kwargs in VARIANTS]


@pytest.mark.parametrize("mode,kwargs", VARIANTS, ids=IDS)
def test_the_fused_step_kernels_run(mode, kwargs):
    team = gatedrnn.backend_info()["cpu_team_size"]
    module = getattr(gatedrnn, mode)(I, H, **kwargs)
    x = torch.randn(T, B, I, requires_grad=True)
    calls = calls_during(lambda: module(x)[0].sum().backward())
    prefix = mode.lower()
    assert calls[f"{prefix}_forward_step"] == T * team and calls[f"{prefix}_backward_step"] == T * team


@pytest.mark.parametrize("mode,kwargs", VARIANTS, ids=IDS)
def test_compiles_without_a_graph_break(mode, kwargs):
    """fullgraph=True raises on a graph break; from the same seed the random draws agree with eager's."""
    module = getattr(gatedrnn, mode)(I, H, num_layers=2, **kwargs)
    x = torch.randn(T, B, I)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        module.train(training)
        torch.manual_seed(0)
        actual = compiled(x)[0]
        torch.manual_seed(0)
        torch.testing.assert_close(actual, module(x)[0])


@pytest.mark.parametrize("mode,kwargs", VARIANTS, ids=IDS)
def test_packed_input_matches_the_reference(mode, kwargs):
    """A PackedSequence (unsorted lengths) through the module in training equals gatedrnn.reference on its
    packed data with the same options, from the same seed: output rows and final hidden state, float64."""
    torch.manual_seed(0)
    module = getattr(gatedrnn, mode)(I, H, bidirectional=True, dtype=torch.float64, **kwargs)
    packed = pack_padded_sequence(torch.randn(T, B, I, dtype=torch.float64), torch.tensor(VARIANT_LENGTHS),
                                  enforce_sorted=False)
    torch.manual_seed(4)
    output, state = module(packed)
    torch.manual_seed(4)
    zeros = torch.zeros(2, B, H, dtype=torch.float64)
    lstm = mode == "LSTM"
    run = reference.lstm if lstm else reference.gru
    expected, expected_state = run(packed.data, packed.batch_sizes, *((zeros, zeros) if lstm else (zeros,)),
                                   module._flat_weights, bidirectional=True, training=True, **kwargs)
    torch.testing.assert_close(output.data, expected, atol=1e-12, rtol=1e-12)
    h, expected_h = (state[0], expected_state[0]) if lstm else (state, expected_state)
    torch.testing.assert_close(h, expected_h.index_select(1, packed.unsorted_indices), atol=1e-12, rtol=1e-12)
