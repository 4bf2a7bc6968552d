"""What every example shares: its command line, training the same model with gatedrnn's layers and with
torch.nn's side by side (same initial weights, same data), and saving its figure."""
import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not
import gatedrnn  # noqa: E402

OUTPUT = pathlib.Path(__file__).resolve().parent / "output"


def parse_args(description, epochs):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--tiny", action="store_true", help="a few seconds: the smoke test's size")
    parser.add_argument("--out", default=str(OUTPUT), help="where the PNG goes (default: %(default)s)")
    args = parser.parse_args()
    if args.tiny:
        args.epochs = min(args.epochs, 2)
    return args


def side_by_side(make_model, run_epoch, epochs, lr=1e-2, seed=0):
    """Trains make_model() (built with gatedrnn layers) and its torch.nn twin (gatedrnn.convert(to="torch"): the
    same weights), each with its own Adam, for `epochs` epochs of run_epoch(model, optimizer, epoch) -> loss.
    Prints both losses and times per epoch; returns the two models and their epoch times."""
    torch.manual_seed(seed)
    ours = make_model()
    theirs = gatedrnn.convert(ours, to="torch")
    models = {"gatedrnn": ours, "torch.nn": theirs}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in models.items()}
    seconds = {name: [] for name in models}
    print(f"{'epoch':>5} {'gatedrnn s':>11} {'torch.nn s':>11} {'loss (gatedrnn / torch.nn)':>30}")
    for epoch in range(epochs):
        losses = {}
        for name, model in models.items():  # alternately, so that machine noise hits both alike
            start = time.perf_counter()
            losses[name] = run_epoch(model, optimizers[name], epoch)
            seconds[name].append(time.perf_counter() - start)
        print(f"{epoch:>5} {seconds['gatedrnn'][-1]:>11.3f} {seconds['torch.nn'][-1]:>11.3f} "
              f"{losses['gatedrnn']:>14.4f} / {losses['torch.nn']:<14.4f}", flush=True)
    ratio = sum(seconds["torch.nn"]) / sum(seconds["gatedrnn"])
    print(f"time per epoch: gatedrnn {sum(seconds['gatedrnn']) / epochs:.3f} s, torch.nn "
          f"{sum(seconds['torch.nn']) / epochs:.3f} s ({ratio:.2f}x), {torch.get_num_threads()} threads")
    return ours, theirs, seconds


def epoch_of(model, optimizer, batches, loss_of, clip=None):
    """`batches` optimizer steps, each on loss_of(model) (which draws a fresh batch); returns the mean loss.
    clip: the largest gradient norm, or None."""
    total = 0.0
    for _ in range(batches):
        loss = loss_of(model)
        optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        total += loss.item()
    return total / batches


def save_figure(fig, out, name):
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print(f"wrote {path}")
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
