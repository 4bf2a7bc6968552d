"""The copy task: read a sequence of random symbols, wait through a run of blanks, then write the symbols back
after a go signal. The delay is what makes it hard: the memory must hold the whole sequence untouched. An LSTM
(forget-gate bias 1) and a GRU train on sequences of 1 to 10 symbols; the figure plots each one's accuracy
against the length of the sequence, up to lengths longer than any seen in training.

    python examples/copy_task.py [--epochs N] [--tiny] [--out DIR]
"""
import torch
from torch import nn

from common import epoch_of, gatedrnn, parse_args, pyplot, save_figure, side_by_side

SYMBOLS, DELAY, HIDDEN, TRAIN_MAX = 8, 10, 96, 10
BLANK, GO = SYMBOLS, SYMBOLS + 1  # input alphabet: symbols, blank, go


def batch_of(length, count, generator):
    """Inputs [count, 2 * length + DELAY + 1] (symbols, blanks, go, blanks) and the symbols to write back."""
    symbols = torch.randint(0, SYMBOLS, (count, length), generator=generator)
    blanks = torch.full((count, DELAY), BLANK)
    tail = torch.full((count, length), BLANK)
    inputs = torch.cat([symbols, blanks, torch.full((count, 1), GO), tail], dim=1)
    return inputs, symbols


class Copier(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.embed = nn.Embedding(SYMBOLS + 2, 16)
        # forget-gate bias 1 for the LSTM (Jozefowicz et al. 2015)
        extra = {"forget_bias": 1.0} if mode == "LSTM" else {}
        self.rnn = getattr(gatedrnn, mode)(16, HIDDEN, batch_first=True, **extra)
        self.head = nn.Linear(HIDDEN, SYMBOLS)

    def forward(self, inputs, length):
        out, _ = self.rnn(self.embed(inputs))
        return self.head(out[:, -length:])  # the steps after the go signal


def accuracy(model, length, generator):
    with torch.no_grad():
        inputs, symbols = batch_of(length, 256, generator)
        return (model(inputs, length).argmax(-1) == symbols).float().mean().item()


def main():
    args = parse_args(__doc__.splitlines()[0], epochs=40)
    batches, batch = (2, 16) if args.tiny else (40, 64)
    lengths = list(range(1, 16, 1 if not args.tiny else 7))
    curves = {}
    for mode in ("LSTM", "GRU"):
        print(f"--- {mode}")

        def run_epoch(model, optimizer, epoch):
            generator = torch.Generator().manual_seed(epoch)

            def loss_of(model):
                length = int(torch.randint(1, TRAIN_MAX + 1, (1,), generator=generator))
                inputs, symbols = batch_of(length, batch, generator)
                logits = model(inputs, length)
                return nn.functional.cross_entropy(logits.reshape(-1, SYMBOLS), symbols.reshape(-1))

            return epoch_of(model, optimizer, batches, loss_of, clip=1.0)

        model, _, _ = side_by_side(lambda: Copier(mode), run_epoch, args.epochs, lr=3e-3)
        curves[mode] = [accuracy(model, n, torch.Generator().manual_seed(99)) for n in lengths]
        print(f"{mode} accuracy by length: " + " ".join(f"{n}:{a:.2f}" for n, a in zip(lengths, curves[mode])))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for mode, curve in curves.items():
        ax.plot(lengths, curve, marker="o", label=mode)
    ax.axvspan(0.5, TRAIN_MAX + 0.5, color="gray", alpha=0.12, label="lengths seen in training")
    ax.axhline(1 / SYMBOLS, color="gray", linestyle=":", label="chance")
    ax.set_xlabel("sequence length (symbols to copy)")
    ax.set_ylabel("per-symbol accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Copy task with a delay of {DELAY} steps")
    ax.legend(fontsize=8)
    save_figure(fig, args.out, "copy_task")


if __name__ == "__main__":
    main()
