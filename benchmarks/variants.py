"""The variant cases (layers beyond torch.nn: zoneout, ...): what gatedrnn is compared with there.

torch.nn has no such layers, so the oracle to beat is what users write today: a per-step Python loop over the
torch.nn cell with the variant written out around it. Each variant case times three implementations: gatedrnn
with the variant, that loop (the speed-up's baseline), and gatedrnn's plain layer (what the variant costs).
The loop makes the same random draws as gatedrnn (same generator, same order), so that the two agree exactly
when both start from the same seed.
"""
import torch
from torch import nn

LOOP = "torch.nn loop"
PLAIN = "gatedrnn plain"

# variant name -> (constructor arguments for gatedrnn, probabilities drawn per state: h, then c for an LSTM)
ZONEOUT_P = 0.1
VARIANTS = {
    "zoneout": {"LSTM": dict(zoneout=ZONEOUT_P, zoneout_cell=ZONEOUT_P), "GRU": dict(zoneout=ZONEOUT_P)},
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

    def _keeps(self, T, B, like):
        """Zoneout draws as gatedrnn makes them (1 where rand < p), each state's [T * B, H] at once (h's, then
        c's); in evaluation p itself."""
        kwargs = VARIANTS["zoneout"][self.case.mode]
        ps = [kwargs["zoneout"]] + ([kwargs["zoneout_cell"]] if self.case.mode == "LSTM" else [])
        if not self.training:
            return [torch.full((T, B, self.case.H), p, dtype=like.dtype, device=like.device) for p in ps]
        return [torch.rand(T * B, self.case.H, dtype=like.dtype, device=like.device).lt_(p).view(T, B, self.case.H)
                for p in ps]

    def forward(self, x):
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
