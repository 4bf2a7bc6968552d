"""Stateful truncated backpropagation through time over one long series: the series is cut into parallel
streams, each read a window at a time; the LSTM's (h, c) is carried from each window into the next (detached,
so gradients stop at the window edge) and the model predicts the next value throughout. The figure shows the
training loss per window and the predictions over the last windows of a held-out stretch.

    python examples/stateful_tbptt.py [--epochs N] [--tiny] [--out DIR]
"""
import math

import torch
from torch import nn

from common import gatedrnn, parse_args, pyplot, save_figure, side_by_side

STREAMS, WINDOW, HIDDEN = 16, 40, 64


def series(length, generator):
    """A long signal with slow and fast components and noise, as [length]."""
    t = torch.arange(length, dtype=torch.float32)
    slow = torch.sin(2 * math.pi * t / 400) * (1 + 0.5 * torch.sin(2 * math.pi * t / 2300))
    fast = 0.4 * torch.sin(2 * math.pi * t / 37)
    return slow + fast + 0.05 * torch.randn(length, generator=generator)


class Predictor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = gatedrnn.LSTM(1, HIDDEN, num_layers=2, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x, state):
        out, state = self.lstm(x, state)
        return self.head(out), state


def windows(signal):
    """[windows, STREAMS, WINDOW + 1, 1]: the series cut into STREAMS parallel streams, then into windows (each
    window one step longer, for its targets)."""
    per_stream = (signal.numel() - 1) // STREAMS
    per_stream -= per_stream % WINDOW
    streams = torch.stack([signal[k * per_stream:(k + 1) * per_stream + 1] for k in range(STREAMS)])
    return [streams[:, w:w + WINDOW + 1].unsqueeze(-1) for w in range(0, per_stream, WINDOW)]


def main():
    args = parse_args(__doc__.splitlines()[0], epochs=6)
    length = 4000 if args.tiny else 64000
    train = windows(series(length, torch.Generator().manual_seed(0)))
    losses = []

    def run_epoch(model, optimizer, epoch):
        state, total = None, 0.0
        for chunk in train:
            prediction, state = model(chunk[:, :-1], state)
            state = tuple(s.detach() for s in state)  # carry the state, not its gradient
            loss = nn.functional.mse_loss(prediction, chunk[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            if isinstance(model.lstm, gatedrnn.LSTM):
                losses.append(loss.item())
        return total / len(train)

    model, _, _ = side_by_side(Predictor, run_epoch, args.epochs, lr=3e-3)

    held_out = series(STREAMS * 30 * WINDOW + 1, torch.Generator().manual_seed(1))
    state, shown = None, []
    with torch.no_grad():
        for chunk in windows(held_out):
            prediction, state = model(chunk[:, :-1], state)
            shown.append((chunk[0, 1:, 0], prediction[0, :, 0]))
    truth = torch.cat([t for t, _ in shown[-4:]])
    predicted = torch.cat([p for _, p in shown[-4:]])

    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5))
    top.plot(losses, linewidth=0.8)
    top.set_yscale("log")
    top.set_xlabel("training window")
    top.set_ylabel("MSE")
    top.set_title(f"Stateful TBPTT: {STREAMS} streams, windows of {WINDOW} steps, state carried across windows")
    bottom.plot(truth, color="black", label="truth")
    bottom.plot(predicted, label="one-step prediction")
    for edge in range(WINDOW, 4 * WINDOW, WINDOW):
        bottom.axvline(edge - 0.5, color="gray", linewidth=0.6)
    bottom.set_xlabel("time step (last 4 windows of a held-out stream; window edges marked)")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, args.out, "stateful_tbptt")


if __name__ == "__main__":
    main()
