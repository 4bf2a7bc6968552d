"""Sine-wave forecasting with an LSTM and a GRU: each learns to predict the next value of noisy sine waves of
random frequency and phase, then forecasts 60 steps on its own (its predictions fed back in). The figure
plots both forecasts against the truth.

    python examples/sine_forecasting.py [--epochs N] [--tiny] [--out DIR]
"""
import math

import torch
from torch import nn

from common import epoch_of, gatedrnn, parse_args, pyplot, save_figure, side_by_side

STEPS, FUTURE, HIDDEN = 80, 60, 48


def waves(count, steps, generator):
    t = torch.arange(steps + 1, dtype=torch.float32)
    freq = 0.1 + 0.15 * torch.rand(count, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(count, 1, generator=generator)
    clean = torch.sin(freq * t + phase)
    return (clean + 0.05 * torch.randn(clean.shape, generator=generator)).unsqueeze(-1), clean.unsqueeze(-1)


class Forecaster(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.rnn = getattr(gatedrnn, mode)(1, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x, state=None):
        out, state = self.rnn(x, state)
        return self.head(out), state

    @torch.no_grad()
    def forecast(self, history, steps):
        prediction, state = self(history)
        value, values = prediction[:, -1:], []
        for _ in range(steps):
            values.append(value)
            prediction, state = self(value, state)
            value = prediction
        return torch.cat(values, dim=1)


def main():
    args = parse_args(__doc__.splitlines()[0], epochs=25)
    batches, batch = (2, 16) if args.tiny else (16, 64)
    models = {}
    for mode in ("LSTM", "GRU"):
        print(f"--- {mode}")

        def run_epoch(model, optimizer, epoch):
            generator = torch.Generator().manual_seed(epoch)

            def loss_of(model):
                noisy, _ = waves(batch, STEPS, generator)
                return nn.functional.mse_loss(model(noisy[:, :-1])[0], noisy[:, 1:])

            return epoch_of(model, optimizer, batches, loss_of)

        models[mode], _, _ = side_by_side(lambda: Forecaster(mode), run_epoch, args.epochs)

    noisy, clean = waves(1, STEPS + FUTURE, torch.Generator().manual_seed(12345))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(range(STEPS + FUTURE + 1), clean[0, :, 0], color="black", label="truth")
    ax.plot(range(STEPS), noisy[0, :STEPS, 0], ".", color="gray", markersize=3, label="observed (noisy)")
    for mode, model in models.items():
        forecast = model.forecast(noisy[:, :STEPS], FUTURE)
        ax.plot(range(STEPS, STEPS + FUTURE), forecast[0, :, 0], label=f"{mode} forecast")
    ax.axvline(STEPS - 0.5, color="gray", linewidth=0.8)
    ax.set_xlabel("time step")
    ax.set_title("Sine-wave forecasting: 60 steps past the observed window")
    ax.legend(fontsize=8)
    save_figure(fig, args.out, "sine_forecasting")


if __name__ == "__main__":
    main()
