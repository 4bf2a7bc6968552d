"""The variant cases (layers beyond torch.nn: zoneout, recurrent dropout, the GRU with reset_after=False, the
LayerNorm LSTM and GRU): what gatedrnn is compared with there.

torch.nn has no such layers, so the oracle to beat is what users write today: a per-step Python loop over the
torch.nn cell with the variant written out around it. Each variant case times three implementations: gatedrnn
with the variant, that loop (the speed-up's baseline), and gatedrnn's plain layer (what the variant costs).
The loop makes the same random draws as gatedrnn (same generator, same order), so that the two agree exactly
when both start from the same seed.
"""
import torch
import torch.nn.functional as F
from torch import nn

LOOP = "torch.nn loop"
PLAIN = "gatedrnn plain"

# variant name -> {mode: constructor arguments for gatedrnn}, for the modes the variant applies to
ZONEOUT_P = 0.1
RECURRENT_DROPOUT_P = 0.25
VARIANTS = {
    "zoneout": {"LSTM": dict(zoneout=ZONEOUT_P, zoneout_cell=ZONEOUT_P), "GRU": dict(zoneout=ZONEOUT_P)},
    "recurrent_dropout": {"LSTM": dict(recurrent_dropout=RECURRENT_DROPOUT_P),
                          "GRU": dict(recurrent_dropout=RECURRENT_DROPOUT_P)},
    "reset_after=False": {"GRU": dict(reset_after=False)},
    "layer_norm": {"LSTM": dict(layer_norm=True), "GRU": dict(layer_norm=True)},
}


def gatedrnn_kwargs(case):
    return VARIANTS[case.variant][case.mode] if case.variant else {}


class CellLoop(nn.Module):
    """A one-layer variant model as a Python loop over torch.nn's LSTMCell/GRUCell (time-major input)."""

    def __init__(self, case, reference):
        super().__init__()
        self.case = case
        self.cell = getattr(nn, f"{case.mode}Cell")(case.I, case.H).to(reference.weight_ih_l0)
        self.cell.load_state_dict({name[:-3]: value for name, value in reference.state_dict().items()})
        if case.variant == "layer_norm":  # torch.nn.LayerNorm's initialisation, as gatedrnn's norms have it
            gates = {"LSTM": 4, "GRU": 3}[case.mode] * case.H
            self.norm_ih = nn.LayerNorm(gates).to(reference.weight_ih_l0)
            self.norm_hh = nn.LayerNorm(gates).to(reference.weight_ih_l0)
            if case.mode == "LSTM":
                self.norm_cell = nn.LayerNorm(case.H).to(reference.weight_ih_l0)

    def _keeps(self, T, B, like):
        """Zoneout draws as gatedrnn makes them (1 where rand < p), each state's [T * B, H] at once (h's, then
        c's); in evaluation p itself."""
        kwargs = VARIANTS["zoneout"][self.case.mode]
        ps = [kwargs["zoneout"]] + ([kwargs["zoneout_cell"]] if self.case.mode == "LSTM" else [])
        if not self.training:
            return [torch.full((T, B, self.case.H), p, dtype=like.dtype, device=like.device) for p in ps]
        return [torch.rand(T * B, self.case.H, dtype=like.dtype, device=like.device).lt_(p).view(T, B, self.case.H)
                for p in ps]

    def _recurrent_mask(self, B, like):
        """The recurrent dropout mask as gatedrnn draws it: one per sequence and unit, kept with probability
        1 - p and scaled by 1 / (1 - p)."""
        p = RECURRENT_DROPOUT_P
        if not self.training:
            return torch.ones(B, self.case.H, dtype=like.dtype, device=like.device)
        return torch.rand(B, self.case.H, dtype=like.dtype, device=like.device).ge_(p).div_(1 - p)

    def _gru_step(self, x, h, mask=None, reset_after=True):
        """A GRU step that torch.nn.GRUCell cannot express, written out with its parameters: the recurrent
        products read h * mask while z * h keeps h (Keras' recurrent_dropout), or the reset gate multiplies h
        before W_hn (reset_after=False, two dependent products)."""
        cell, H = self.cell, self.case.H
        h_read = h if mask is None else h * mask
        i_r, i_z, i_n = F.linear(x, cell.weight_ih, cell.bias_ih).chunk(3, 1)
        if reset_after:
            h_r, h_z, h_n = F.linear(h_read, cell.weight_hh, cell.bias_hh).chunk(3, 1)
        else:
            h_r, h_z = F.linear(h_read, cell.weight_hh[:2 * H], cell.bias_hh[:2 * H]).chunk(2, 1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        if reset_after:
            n = torch.tanh(i_n + r * h_n)
        else:
            n = torch.tanh(i_n + F.linear(r * h_read, cell.weight_hh[2 * H:], cell.bias_hh[2 * H:]))
        return (1 - z) * n + z * h

    def _layer_norm_step(self, x, h, c):
        """A LayerNorm cell step written out with torch.nn.LayerNorm: each product normalised before the biases,
        and the LSTM's c before the tanh of h."""
        cell = self.cell
        gi = self.norm_ih(F.linear(x, cell.weight_ih)) + cell.bias_ih
        gh = self.norm_hh(F.linear(h, cell.weight_hh)) + cell.bias_hh
        if self.case.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(self.norm_cell(c)), c
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, c

    def _forward_layer_norm(self, x):
        h = x.new_zeros(x.shape[1], self.case.H)
        c = x.new_zeros(x.shape[1], self.case.H)
        outputs = []
        for t in range(x.shape[0]):
            h, c = self._layer_norm_step(x[t], h, c)
            outputs.append(h)
        state = (h.unsqueeze(0), c.unsqueeze(0)) if self.case.mode == "LSTM" else h.unsqueeze(0)
        return torch.stack(outputs), state

    def forward(self, x):
        if self.case.variant == "layer_norm":
            return self._forward_layer_norm(x)
        if self.case.variant == "recurrent_dropout":
            return self._forward_recurrent_dropout(x)
        if self.case.variant == "reset_after=False":
            h = x.new_zeros(x.shape[1], self.case.H)
            outputs = []
            for t in range(x.shape[0]):
                h = self._gru_step(x[t], h, reset_after=False)
                outputs.append(h)
            return torch.stack(outputs), h.unsqueeze(0)
        T, B = x.shape[:2]
        h = x.new_zeros(B, self.case.H)
        c = x.new_zeros(B, self.case.H)
        keeps = self._keeps(T, B, x)
        outputs = []
        for t in range(T):
            if self.case.mode == "LSTM":
                h_new, c_new = self.cell(x[t], (h, c))
                h = keeps[0][t] * h + (1 - keeps[0][t]) * h_new
                c = keeps[1][t] * c + (1 - keeps[1][t]) * c_new
            else:
                h = keeps[0][t] * h + (1 - keeps[0][t]) * self.cell(x[t], h)
            outputs.append(h)
        state = (h.unsqueeze(0), c.unsqueeze(0)) if self.case.mode == "LSTM" else h.unsqueeze(0)
        return torch.stack(outputs), state

    def _forward_recurrent_dropout(self, x):
        T, B = x.shape[:2]
        h = x.new_zeros(B, self.case.H)
        c = x.new_zeros(B, self.case.H)
        mask = self._recurrent_mask(B, x)
        outputs = []
        for t in range(T):
            if self.case.mode == "LSTM":  # h enters an LSTM cell only through W_hh
                h, c = self.cell(x[t], (h * mask, c))
            else:
                h = self._gru_step(x[t], h, mask)
            outputs.append(h)
        state = (h.unsqueeze(0), c.unsqueeze(0)) if self.case.mode == "LSTM" else h.unsqueeze(0)
        return torch.stack(outputs), state
