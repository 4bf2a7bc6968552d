"""Long-range dependency classification: the class of a sequence is written in its first two steps (the
signs of a marker on a channel that then stays silent), followed by noise on the other channels that carries
no information. The recurrent state must hold the class across all of it. An LSTM (forget-gate bias 1, as
Jozefowicz et al. 2015 advise) and a GRU learn it at two distances; the figure plots their validation accuracy
per epoch.

    python examples/long_range_classification.py [--epochs N] [--tiny] [--out DIR]
"""
import torch
from torch import nn

from common import epoch_of, gatedrnn, parse_args, pyplot, save_figure, side_by_side

CLASSES, MARKER, FEATURES, HIDDEN, NOISE = 4, 2, 4, 64, 0.5


def batch_of(steps, count, generator):
    """Noise [count, steps, FEATURES]; the first MARKER steps of feature 0 spell the class in signs."""
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    x = NOISE * torch.randn(count, steps, FEATURES, generator=generator)
    for bit in range(MARKER):
        x[:, bit, 0] = 2.0 * ((labels >> bit) & 1).float() - 1.0
    x[:, :MARKER, 1:] = 0
    x[:, MARKER:, 0] = 0  # the marker's channel is silent after it: the noise lives in the other features
    return x, labels


class Classifier(nn.Module):
    def __init__(self, mode):
        super().__init__()
        # forget-gate bias 1 for the LSTM (Jozefowicz et al. 2015)
        extra = {"forget_bias": 1.0} if mode == "LSTM" else {}
        self.rnn = getattr(gatedrnn, mode)(FEATURES, HIDDEN, batch_first=True, **extra)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])


def main():
    args = parse_args(__doc__.splitlines()[0], epochs=20)
    batches, batch = (2, 16) if args.tiny else (64, 64)
    distances = [10] if args.tiny else [20, 30]
    curves = {}
    for steps in distances:
        for mode in ("LSTM", "GRU"):
            print(f"--- {mode}, class written {steps} steps before the end")
            validation = batch_of(steps, 512, torch.Generator().manual_seed(7))
            history = []

            def run_epoch(model, optimizer, epoch):
                generator = torch.Generator().manual_seed(epoch)

                def loss_of(model):
                    x, labels = batch_of(steps, batch, generator)
                    return nn.functional.cross_entropy(model(x), labels)

                loss = epoch_of(model, optimizer, batches, loss_of, clip=1.0)
                if isinstance(model.rnn, (gatedrnn.LSTM, gatedrnn.GRU)):  # one curve: the gatedrnn model's
                    with torch.no_grad():
                        history.append((model(validation[0]).argmax(-1) == validation[1]).float().mean().item())
                return loss

            side_by_side(lambda: Classifier(mode), run_epoch, args.epochs, lr=3e-3)
            curves[(mode, steps)] = history
            print(f"validation accuracy after the last epoch: {history[-1]:.3f}")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for (mode, steps), history in curves.items():
        ax.plot(range(1, len(history) + 1), history, marker=".", label=f"{mode}, {steps} steps")
    ax.axhline(1 / CLASSES, color="gray", linestyle=":", label="chance")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Long-range dependency: the class is written only at the start")
    ax.legend(fontsize=8)
    save_figure(fig, args.out, "long_range_classification")


if __name__ == "__main__":
    main()
