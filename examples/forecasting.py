"""Time-series forecasting with a 2-layer LSTM (rnnfused.LSTM).

Task: a signal made of two sine waves (periods of 40 and 13 steps) plus Gaussian noise of standard
deviation 0.1. From a window of the last 50 noisy values, predict the next noisy value. The noise
of the next value cannot be predicted, so no model can do better on average than its variance,
0.01: that is the noise floor, and a good model's test MSE comes close to it.

Model: LSTM(1, 32, num_layers=2) over the window, then a linear layer on the last output. The
same model is built on torch.nn.LSTM and on rnnfused.LSTM with the same initial weights and
trained the same way. The first 3,000 values give the training windows and the last 1,000 the
test windows. When matplotlib is installed, the script saves a plot of the test predictions
against the truth to examples/output/forecasting.png.

    python examples/forecasting.py
    python examples/forecasting.py --quick
"""
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

WINDOW = 50
NOISE_STD = 0.1


def make_series(length, generator):
    t = torch.arange(length, dtype=torch.float32)
    clean = torch.sin(2 * math.pi * t / 40) + 0.5 * torch.sin(2 * math.pi * t / 13 + 1.0)
    return clean, clean + NOISE_STD * torch.randn(length, generator=generator)


def windows(series, clean):
    """Inputs [N, WINDOW, 1] and next values [N] (noisy, and the clean signal behind them)."""
    inputs = series.unfold(0, WINDOW, 1)[:-1].unsqueeze(-1)
    return inputs.contiguous(), series[WINDOW:], clean[WINDOW:]


class Forecaster(nn.Module):
    def __init__(self, lib, hidden_size):
        super().__init__()
        self.lstm = lib.LSTM(1, hidden_size, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, window):
        output, _ = self.lstm(window)  # [B, WINDOW, H]
        return self.head(output[:, -1]).squeeze(-1)


def save_plot(path, target, clean, predictions, count=200):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure, axes = plt.subplots(figsize=(10, 4))
    steps = range(count)
    axes.plot(steps, target[:count].cpu(), ".", color="0.6", markersize=3, label="truth (noisy next value)")
    axes.plot(steps, clean[:count].cpu(), "-", color="0.2", linewidth=1, label="clean signal")
    styles = {"torch.nn": ("tab:blue", "--"), "rnnfused": ("tab:orange", ":")}
    for name, prediction in predictions.items():
        color, style = styles.get(name, (None, "-"))
        axes.plot(steps, prediction[:count].cpu(), style, color=color, linewidth=1.5, label=f"prediction ({name})")
    axes.set_xlabel("test step")
    axes.set_title(f"Next-value forecast from a window of {WINDOW} (2-layer LSTM)")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4, fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"plot saved to {os.path.relpath(path)}")


def main():
    parser = common.base_parser(__doc__, epochs=20, batch_size=64, lr=5e-3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--length", type=int, default=4000, help="length of the series (the last 1,000: test)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.length = min(args.epochs, 2), min(args.length, 2000)
    device = common.pick_device(args.device)

    clean, series = make_series(args.length, torch.Generator().manual_seed(args.seed))
    split = args.length - 1000
    train_x, train_y, _ = windows(series[:split], clean[:split])
    test_x, test_y, test_clean = windows(series[split - WINDOW :], clean[split - WINDOW :])
    train = (train_x.to(device), train_y.to(device))
    test_x, test_y, test_clean = test_x.to(device), test_y.to(device), test_clean.to(device)

    common.print_header(
        "2-layer LSTM: next value of a noisy sine wave",
        device,
        [
            f"data: {len(train_y)} training / {len(test_y)} test windows of {WINDOW} steps, noise std {NOISE_STD}",
            f"model: LSTM(1, {args.hidden}, num_layers=2) -> Linear({args.hidden}, 1); "
            f"Adam lr {args.lr} (cosine decay), batch {args.batch_size}, {args.epochs} epochs",
        ],
    )

    def loss_of_batch(model, x, y):
        return F.mse_loss(model(x), y)

    models = common.twin_models(lambda lib: Forecaster(lib, args.hidden), device, args.seed)
    times = common.train_side_by_side(
        models, train, loss_of_batch, args.epochs, args.batch_size, args.lr, args.seed, device,
        cosine_lr=True, log_every=5,
    )
    mse, clean_mse, predictions = {}, {}, {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            predictions[name] = model(test_x)
        mse[name] = F.mse_loss(predictions[name], test_y).item()
        clean_mse[name] = F.mse_loss(predictions[name], test_clean).item()

    floor = NOISE_STD**2
    empirical_floor = F.mse_loss(test_clean, test_y).item()
    common.print_comparison(
        [
            ("test MSE", {n: f"{v:.5f}" for n, v in mse.items()}),
            ("test MSE / noise floor", {n: f"{v / floor:.3f}" for n, v in mse.items()}),
            ("MSE against clean signal", {n: f"{v:.5f}" for n, v in clean_mse.items()}),
        ],
        times,
    )
    print(
        f"noise floor: noise variance {floor:.5f} (MSE of the clean signal itself on this test set: "
        f"{empirical_floor:.5f})"
    )
    if not args.no_plot:
        save_plot(os.path.join(common.OUTPUT_DIR, "forecasting.png"), test_y, test_clean, predictions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
