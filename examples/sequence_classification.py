"""Sequence classification with an Elman RNN (rnnfused.RNN).

Task: each sequence holds 20 values drawn uniformly from [0, 1); its label is 1 when the mean of
the 20 values is above 0.5 and 0 otherwise. The classes are balanced, and many sequences lie
close to the boundary (the mean has a standard deviation of about 0.065), so the network has to
add up its inputs accurately, one step at a time.

Model: a one-layer tanh RNN over the (centered) values, then a linear layer on the last hidden
state. The same model is built on torch.nn.RNN and on rnnfused.RNN with the same initial weights,
trained the same way (same seed, same batches), and evaluated on 1,000 held-out sequences.

    python examples/sequence_classification.py            # 4,000 training sequences
    python examples/sequence_classification.py --quick    # a short smoke run

The script exits with status 1 when rnnfused's test accuracy is not above the target (95%,
unless --quick or --target says otherwise).
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

STEPS = 20


def make_data(count, generator):
    values = torch.rand(count, STEPS, 1, generator=generator)
    labels = (values.mean(dim=(1, 2)) > 0.5).float()
    return values, labels


class MeanClassifier(nn.Module):
    def __init__(self, lib, hidden_size):
        super().__init__()
        self.rnn = lib.RNN(1, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, values):
        _, h_n = self.rnn(values - 0.5)  # h_n: [1, B, H], the state after the last step
        return self.head(h_n[-1]).squeeze(-1)


def main():
    parser = common.base_parser(__doc__, epochs=30, batch_size=32, lr=3e-3)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--target", type=float, default=None, help="required test accuracy (default 0.95)")
    args = parser.parse_args()
    if args.quick:
        args.epochs = min(args.epochs, 4)
    target = args.target if args.target is not None else (0.0 if args.quick else 0.95)
    device = common.pick_device(args.device)

    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_y = make_data(args.train_size, generator)
    test_x, test_y = make_data(1000, generator)
    train = (train_x.to(device), train_y.to(device))
    test_x, test_y = test_x.to(device), test_y.to(device)

    common.print_header(
        "Elman RNN: is the mean of 20 uniform values above 0.5?",
        device,
        [
            f"data: {args.train_size} training / {len(test_y)} test sequences of {STEPS} steps",
            f"model: RNN(1, {args.hidden}, tanh) -> Linear({args.hidden}, 1); "
            f"Adam lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs",
        ],
    )

    def loss_of_batch(model, x, y):
        return F.binary_cross_entropy_with_logits(model(x), y)

    models = common.twin_models(lambda lib: MeanClassifier(lib, args.hidden), device, args.seed)
    times = common.train_side_by_side(
        models, train, loss_of_batch, args.epochs, args.batch_size, args.lr, args.seed, device, log_every=10
    )
    accuracy = {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            accuracy[name] = ((model(test_x) > 0).float() == test_y).float().mean().item()

    common.print_comparison([("test accuracy", {n: f"{100 * a:.2f}%" for n, a in accuracy.items()})], times)
    if accuracy["rnnfused"] <= target:
        print(f"FAILED: rnnfused test accuracy {100 * accuracy['rnnfused']:.2f}% is not above {100 * target:.0f}%")
        return 1
    print(f"OK: rnnfused test accuracy {100 * accuracy['rnnfused']:.2f}% > {100 * target:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
