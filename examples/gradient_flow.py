"""Gradient flow through time: how much of a loss read at the last step reaches each earlier input, for an
ungated RNN (nn.RNN, tanh), an LSTM and a GRU. A tanh RNN's gradient shrinks geometrically with distance and it
has no means to change that. A gated cell's decay rate is set by a gate: the LSTM's forget gate and the GRU's
update gate, which initialisation can open (gate biases of 3 below) and training learns to open where the
task needs memory. The figure plots the gradient norm per time step for each model at initialisation, with
default and with opened gates, and for an LSTM and a GRU after training on a task that needs the first input
(its class is written only there).

    python examples/gradient_flow.py [--epochs N] [--tiny] [--out DIR]
"""
import torch
from torch import nn

from common import epoch_of, gatedrnn, parse_args, pyplot, save_figure, side_by_side

MEASURED, TRAINED, FEATURES, HIDDEN = 120, 30, 4, 64


def batch_of(count, steps, generator):
    """Noise on features 1..3; the class (two of them) only in the sign of feature 0 at the first step."""
    labels = torch.randint(0, 2, (count,), generator=generator)
    x = 0.5 * torch.randn(count, steps, FEATURES, generator=generator)
    x[:, :, 0] = 0
    x[:, 0, 0] = 2.0 * labels.float() - 1.0
    return x, labels


class Model(nn.Module):
    def __init__(self, make_rnn, gate_bias=0.0):
        super().__init__()
        self.rnn = make_rnn()
        self.head = nn.Linear(HIDDEN, 2)
        if gate_bias:  # the second gate block: the LSTM's forget gate (i, f, g, o), the GRU's update gate (r, z, n)
            with torch.no_grad():
                self.rnn.bias_ih_l0[HIDDEN:2 * HIDDEN] += gate_bias

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def gradient_per_step(model, steps):
    """|d loss / d x_t| per time step t, averaged over a batch."""
    x, labels = batch_of(64, steps, torch.Generator().manual_seed(3))
    x.requires_grad_(True)
    nn.functional.cross_entropy(model(x), labels).backward()
    return x.grad.norm(dim=2).mean(0)


def main():
    args = parse_args(__doc__.splitlines()[0], epochs=15)
    measured, trained = (20, 10) if args.tiny else (MEASURED, TRAINED)
    batches, batch = (2, 16) if args.tiny else (64, 64)
    kinds = {"RNN (tanh)": lambda: nn.RNN(FEATURES, HIDDEN, batch_first=True),
             "LSTM": lambda: gatedrnn.LSTM(FEATURES, HIDDEN, batch_first=True),
             "GRU": lambda: gatedrnn.GRU(FEATURES, HIDDEN, batch_first=True)}
    curves = {}
    for name, make_rnn in kinds.items():
        for bias in ((0.0,) if name.startswith("RNN") else (0.0, 3.0)):
            torch.manual_seed(0)
            label = f"{name}, initialised" + (f", gate bias {bias:g}" if bias else "")
            curves[label] = gradient_per_step(Model(make_rnn, bias), measured)
        if name.startswith("RNN"):
            continue  # nothing of gatedrnn's to time
        print(f"--- {name}, trained on sequences of {trained} steps")

        def run_epoch(model, optimizer, epoch):
            generator = torch.Generator().manual_seed(epoch)

            def loss_of(model):
                x, labels = batch_of(batch, trained, generator)
                return nn.functional.cross_entropy(model(x), labels)

            return epoch_of(model, optimizer, batches, loss_of, clip=1.0)

        model, _, _ = side_by_side(lambda: Model(make_rnn, 1.0), run_epoch, args.epochs, lr=3e-3)
        curves[f"{name}, trained"] = gradient_per_step(model, measured)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, curve in curves.items():
        style = "-" if "trained" in label else ("--" if "bias" in label else ":")
        ax.plot(range(measured), curve, linestyle=style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("time step t of the input (the loss is read at the last step)")
    ax.set_ylabel("|d loss / d x_t|")
    ax.set_title(f"Gradient flow through {measured} steps")
    ax.legend(fontsize=7)
    save_figure(fig, args.out, "gradient_flow")


if __name__ == "__main__":
    main()
