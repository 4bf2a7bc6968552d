"""Pure-PyTorch specification of gatedrnn's ops: the second test oracle, written to be read.

The layer functions take and return exactly what the compiled ops do (see gatedrnn._ops.lstm_layer and
gru_layer): time-major dense input [T, B, I], or packed data [N, I] with batch_sizes; the initial state of
every batch row; weights as torch.nn stores them; and `reverse`. They loop over time in Python and let
autograd differentiate them, so they are slow and obviously correct. `lstm` and `gru` run them through
the same layer orchestration as gatedrnn.functional.
"""
import torch
import torch.nn.functional as F

from .functional import gru_over, lstm_over


def _step_sizes(input, batch_sizes):
    if batch_sizes is not None:
        return [int(n) for n in batch_sizes]
    return [input.shape[1]] * input.shape[0]


def _run_steps(input, batch_sizes, states, step_fn, reverse, lengths=None, extras=(), per_sequence=()):
    """Applies step_fn(x_t, extras_t, sequences_t, *states_of_active_rows) -> (output_t, *new_states) over time.

    extras: tensors with one row per input row ([rows, C], e.g. zoneout keep values), sliced like the input;
    per_sequence: tensors with one row per sequence ([B, C], dropout masks), sliced like the states.

    Step t sees only its first batch_sizes[t] rows. Rows that have finished (forward) or not yet started
    (reverse) keep their state, which is how a packed sequence's final state is each sequence's own last one.
    With `lengths` (dense input), every step computes every row and masks: row b is running at step t when
    t < lengths[b]; elsewhere its state is kept and its output is zero.
    """
    if lengths is not None:
        return _run_masked_steps(input, lengths, states, step_fn, reverse, extras, per_sequence)
    sizes = _step_sizes(input, batch_sizes)
    data = input.reshape(-1, input.shape[-1])
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    outputs = [None] * len(sizes)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in order:
        n = sizes[t]
        rows = slice(offsets[t], offsets[t] + n)
        output, *new_states = step_fn(data[rows], [e[rows] for e in extras], [m[:n] for m in per_sequence],
                                      *(s[:n] for s in states))
        states = [torch.cat([new, old[n:]]) for new, old in zip(new_states, states)]
        outputs[t] = output
    output = torch.cat(outputs)
    return output.reshape(*input.shape[:-1], output.shape[-1]), states


def _run_masked_steps(input, lengths, states, step_fn, reverse, extras, per_sequence):
    steps = range(input.shape[0] - 1, -1, -1) if reverse else range(input.shape[0])
    outputs = [None] * input.shape[0]
    lengths = lengths.to(input.device)
    extras = [e.reshape(*input.shape[:2], -1) for e in extras]
    for t in steps:
        running = (lengths > t).unsqueeze(1)
        output, *new_states = step_fn(input[t], [e[t] for e in extras], per_sequence, *states)
        states = [torch.where(running, new, old) for new, old in zip(new_states, states)]
        outputs[t] = torch.where(running, output, torch.zeros_like(output))
    return torch.stack(outputs), states


def _zoneout(keep, previous, updated):
    """Zoneout (Krueger et al. 2016): keep is 1 where a unit keeps its previous value (training) or the
    probability p of that (evaluation); None is no zoneout."""
    return updated if keep is None else keep * previous + (1 - keep) * updated


def _times(t, mask):
    return t if mask is None else t * mask


def _norm(t, layer_norm, start):
    """LayerNorm over t's last dimension (n columns) with the gains and biases in columns [start, start + n) of
    a layer_norm tensor [2, columns] (gains, then biases; the norms' columns one after another)."""
    n = t.shape[-1]
    return F.layer_norm(t, (n,), layer_norm[0, start:start + n], layer_norm[1, start:start + n], eps=1e-5)


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, keep_h=None, keep_c=None, recurrent_mask=None,
              input_mask=None, layer_norm=None):
    """One LSTM step: returns (output, h', c'); output == h' (projected when w_hr is given). With zoneout,
    h' and c' both come from the cell's own update c~ = f * c + i * g. The dropout masks multiply x and h
    where they enter their products. layer_norm [2, 9H] (gains, then biases): LayerNorm on the input
    projection, on the recurrent product and on c~ before the tanh that makes h (Haste's LayerNormLSTM)."""
    from_x, from_h = _times(x, input_mask) @ w_ih.t(), _times(h, recurrent_mask) @ w_hh.t()
    if layer_norm is not None:
        from_x, from_h = _norm(from_x, layer_norm, 0), _norm(from_h, layer_norm, from_x.shape[1])
    gates = from_x + from_h
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new if layer_norm is None else _norm(c_new, layer_norm, 8 * c.shape[1]))
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    h_new, c_new = _zoneout(keep_h, h, h_new), _zoneout(keep_c, c, c_new)
    return h_new, h_new, c_new


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, keep=None, recurrent_mask=None, input_mask=None,
             reset_after=True, layer_norm=None):
    """One GRU step: returns (output, h'); output == h'. The dropout masks multiply x and h where they enter
    their products (h itself, in z * h, stays unmasked, as in Keras). reset_after=False: Cho et al.'s GRU,
    n = tanh(W_in x + b_in + W_hn (r * h) + b_hn). layer_norm [2, 6H] (gains, then biases): LayerNorm on the
    input projection and on the recurrent product, before their biases (reset_after=True only)."""
    gi = _times(x, input_mask) @ w_ih.t()
    h_read = _times(h, recurrent_mask)
    if layer_norm is not None:
        assert reset_after, "layer_norm needs reset_after=True"
        gh = _norm(h_read @ w_hh.t(), layer_norm, gi.shape[1])
        gi = _norm(gi, layer_norm, 0)
        if b_ih is not None:
            gi, gh = gi + b_ih, gh + b_hh
        (i_r, i_z, i_n), (h_r, h_z, h_n) = gi.chunk(3, dim=1), gh.chunk(3, dim=1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = _zoneout(keep, h, (1 - z) * n + z * h)
        return h, h
    w_hr, w_hz, w_hn = w_hh.chunk(3, dim=0)
    gh_rz = h_read @ torch.cat([w_hr, w_hz]).t()
    if b_ih is not None:
        gi = gi + b_ih
        gh_rz = gh_rz + b_hh[:2 * h.shape[-1]]
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z = gh_rz.chunk(2, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    h_n = (h_read if reset_after else r * h_read) @ w_hn.t()
    if b_ih is not None:
        h_n = h_n + b_hh[2 * h.shape[-1]:]
    n = torch.tanh(i_n + (r * h_n if reset_after else h_n))
    h = _zoneout(keep, h, (1 - z) * n + z * h)
    return h, h


def _present(*tensors):
    return [t for t in tensors if t is not None]


def lstm_layer(input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths=None, zoneout=None,
               zoneout_cell=None, weight_hh_mask=None, recurrent_mask=None, input_mask=None, layer_norm=None):
    """Reference for torch.ops.gatedrnn.lstm_forward: returns (output, hy, cy). zoneout, zoneout_cell: keep
    values [rows, H] (see _zoneout), or None; weight_hh_mask: weight dropout's mask, multiplying W_hh for the
    whole call, or None; recurrent_mask [B, R], input_mask [B, I]: variational dropout masks, or None."""
    if weight_hh_mask is not None:
        w_hh = w_hh * weight_hh_mask

    def step(x, extras, sequences, h, c):
        keeps, masks = iter(extras), iter(sequences)
        keep_h = next(keeps) if zoneout is not None else None
        keep_c = next(keeps) if zoneout_cell is not None else None
        h_mask = next(masks) if recurrent_mask is not None else None
        x_mask = next(masks) if input_mask is not None else None
        return lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, keep_h, keep_c, h_mask, x_mask, layer_norm)

    output, (hy, cy) = _run_steps(input, batch_sizes, (hx, cx), step, reverse, lengths,
                                  _present(zoneout, zoneout_cell), _present(recurrent_mask, input_mask))
    return output, hy, cy


def gru_layer(input, batch_sizes, hx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths=None, zoneout=None,
              weight_hh_mask=None, recurrent_mask=None, input_mask=None, reset_after=True, layer_norm=None):
    """Reference for torch.ops.gatedrnn.gru_forward: returns (output, hy). (w_hr must be None.)"""
    assert w_hr is None, "GRU has no projection"
    if weight_hh_mask is not None:
        w_hh = w_hh * weight_hh_mask

    def step(x, extras, sequences, h):
        masks = iter(sequences)
        h_mask = next(masks) if recurrent_mask is not None else None
        x_mask = next(masks) if input_mask is not None else None
        return gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, extras[0] if extras else None, h_mask, x_mask, reset_after,
                        layer_norm)

    output, (hy,) = _run_steps(input, batch_sizes, (hx,), step, reverse, lengths, _present(zoneout),
                               _present(recurrent_mask, input_mask))
    return output, hy


def _lstm_layer(*args, reverse, lengths=None, zoneout=(None, None), **masks):
    return lstm_layer(*args, reverse, lengths=lengths, zoneout=zoneout[0], zoneout_cell=zoneout[1], **masks)


def _gru_layer(*args, reverse, lengths=None, zoneout=(None,), **options):
    return gru_layer(*args, reverse, lengths=lengths, zoneout=zoneout[0], **options)


lstm = lstm_over(_lstm_layer)  # reference for gatedrnn.functional.lstm
gru = gru_over(_gru_layer)  # reference for gatedrnn.functional.gru
