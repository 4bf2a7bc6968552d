"""Pure-PyTorch specification of gatedrnn's ops: the second test oracle, written to be read.

The layer functions take and return exactly what the compiled ops do (see gatedrnn._ops.lstm_layer and
gru_layer): time-major dense input [T, B, I], or packed data [N, I] with batch_sizes; the initial state of
every batch row; weights as torch.nn stores them; and `reverse`. They loop over time in Python and let
autograd differentiate them, so they are slow and obviously correct. `lstm` and `gru` run them through
the same layer orchestration as gatedrnn.functional.
"""
import torch

from .functional import gru_over, lstm_over


def _step_sizes(input, batch_sizes):
    if batch_sizes is not None:
        return [int(n) for n in batch_sizes]
    return [input.shape[1]] * input.shape[0]


def _run_steps(input, batch_sizes, states, step_fn, reverse, lengths=None):
    """Applies step_fn(x_t, *states_of_active_rows) -> (output_t, *new_states) over time.

    Step t sees only its first batch_sizes[t] rows. Rows that have finished (forward) or not yet started
    (reverse) keep their state, which is how a packed sequence's final state is each sequence's own last one.
    With `lengths` (dense input), every step computes every row and masks: row b is running at step t when
    t < lengths[b]; elsewhere its state is kept and its output is zero.
    """
    if lengths is not None:
        return _run_masked_steps(input, lengths, states, step_fn, reverse)
    sizes = _step_sizes(input, batch_sizes)
    data = input.reshape(-1, input.shape[-1])
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    outputs = [None] * len(sizes)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in order:
        n = sizes[t]
        x = data[offsets[t]:offsets[t] + n]
        output, *new_states = step_fn(x, *(s[:n] for s in states))
        states = [torch.cat([new, old[n:]]) for new, old in zip(new_states, states)]
        outputs[t] = output
    output = torch.cat(outputs)
    return output.reshape(*input.shape[:-1], output.shape[-1]), states


def _run_masked_steps(input, lengths, states, step_fn, reverse):
    steps = range(input.shape[0] - 1, -1, -1) if reverse else range(input.shape[0])
    outputs = [None] * input.shape[0]
    lengths = lengths.to(input.device)
    for t in steps:
        running = (lengths > t).unsqueeze(1)
        output, *new_states = step_fn(input[t], *states)
        states = [torch.where(running, new, old) for new, old in zip(new_states, states)]
        outputs[t] = torch.where(running, output, torch.zeros_like(output))
    return torch.stack(outputs), states


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
    """One LSTM step: returns (output, h', c'); output == h' (projected when w_hr is given)."""
    gates = x @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if w_hr is not None:
        h = h @ w_hr.t()
    return h, h, c


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """One GRU step: returns (output, h'); output == h'."""
    gi = x @ w_ih.t()
    gh = h @ w_hh.t()
    if b_ih is not None:
        gi = gi + b_ih
        gh = gh + b_hh
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    h = (1 - z) * n + z * h
    return h, h


def lstm_layer(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths=None):
    """Reference for torch.ops.gatedrnn.lstm_forward: returns (output, hy, cy)."""
    output, (hy, cy) = _run_steps(
        input, batch_sizes, (hx, cx), lambda x, h, c: lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr), reverse,
        lengths)
    return output, hy, cy


def gru_layer(input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths=None):
    """Reference for torch.ops.gatedrnn.gru_forward: returns (output, hy). (w_hr must be None.)"""
    assert w_hr is None, "GRU has no projection"
    output, (hy,) = _run_steps(input, batch_sizes, (hx,), lambda x, h: gru_cell(x, h, w_ih, w_hh, b_ih, b_hh),
                               reverse, lengths)
    return output, hy


lstm = lstm_over(lstm_layer)  # reference for gatedrnn.functional.lstm
gru = gru_over(gru_layer)  # reference for gatedrnn.functional.gru
