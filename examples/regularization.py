"""The regularization of recurrent models that torch.nn lacks, fused: recurrent dropout, DropConnect
and zoneout on rnnfused.LSTM, and rnnfused.LayerNormLSTM (alone and with recurrent dropout), against
the plain LSTM, on the same data from the same seed.

Data and model as in text_classification.py (synthetic sentiment reviews of 8 to 40 words, packed
batches, Embedding -> bidirectional LSTM -> Linear), on half of its training set (2,000 reviews),
where the plain model overfits (its train loss goes to ~0 while its test loss stops improving).
Every variant starts from the same weights and sees the same batches; each prints its test
accuracy, its train and test loss per epoch (plotted to --plot when matplotlib is installed;
examples/output/regularization.png by default) and its training time per epoch.

    python examples/regularization.py
    python examples/regularization.py --quick --no-plot
"""
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import common
import rnnfused
from text_classification import MAX_LENGTH, MIN_LENGTH, VOCAB, make_reviews

VARIANTS = {
    "plain": {},
    "recurrent_dropout=0.3": {"recurrent_dropout": 0.3},
    "zoneout=0.15": {"zoneout": 0.15, "cell_zoneout": 0.05},
    "dropconnect=0.5": {"dropconnect": 0.5},
    "LayerNormLSTM": {"layer_norm": True},
    "LayerNormLSTM+rec_drop=0.3": {"layer_norm": True, "recurrent_dropout": 0.3},
}


class Classifier(nn.Module):
    def __init__(self, embedding_dim, hidden_size, options):
        super().__init__()
        options = dict(options)
        rnn_class = rnnfused.LayerNormLSTM if options.pop("layer_norm", False) else rnnfused.LSTM
        self.embedding = nn.Embedding(len(VOCAB), embedding_dim, padding_idx=0)
        self.rnn = rnn_class(embedding_dim, hidden_size, batch_first=True, bidirectional=True, **options)
        self.head = nn.Linear(2 * hidden_size, 1)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.embedding(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.rnn(packed)
        return self.head(torch.cat([h_n[0], h_n[1]], dim=1)).squeeze(-1)


def main():
    parser = common.base_parser(__doc__, epochs=15, batch_size=32, lr=5e-3)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--embedding", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output",
                                                      "regularization.png"), help="where to write the loss curves")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_size = min(args.epochs, 2), min(args.train_size, 200)
    device = common.pick_device(args.device)

    generator = torch.Generator().manual_seed(args.seed)
    train_tokens, train_lengths, train_labels = make_reviews(args.train_size, generator)
    test_tokens, test_lengths, test_labels = make_reviews(1000, generator)
    train_tokens, train_labels = train_tokens.to(device), train_labels.to(device)
    test_tokens, test_labels = test_tokens.to(device), test_labels.to(device)
    common.print_header(
        "Recurrent dropout, zoneout, DropConnect and LayerNorm LSTM (rnnfused)",
        device,
        [f"data: {args.train_size} training / 1000 test reviews of {MIN_LENGTH}-{MAX_LENGTH} words",
         f"model: Embedding -> bidirectional rnnfused.LSTM({args.embedding}, {args.hidden}) -> Linear",
         f"training: Adam lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs, same seed for every variant"],
    )

    results = {}
    for name, options in VARIANTS.items():
        torch.manual_seed(args.seed)
        model = Classifier(args.embedding, args.hidden, options).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        shuffle = torch.Generator().manual_seed(args.seed)
        curves = {"train": [], "test": []}
        times = []
        for epoch in range(args.epochs):
            model.train()
            common.synchronize(device)
            start = time.perf_counter()
            total, count = 0.0, 0
            for tokens, lengths, labels in common.batches((train_tokens, train_lengths, train_labels),
                                                          args.batch_size, shuffle):
                optimizer.zero_grad(set_to_none=True)
                loss = F.binary_cross_entropy_with_logits(model(tokens, lengths), labels)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * tokens.shape[0]
                count += tokens.shape[0]
            common.synchronize(device)
            times.append(time.perf_counter() - start)
            model.eval()
            with torch.no_grad():
                logits = model(test_tokens, test_lengths)
            curves["train"].append(total / count)
            curves["test"].append(float(F.binary_cross_entropy_with_logits(logits, test_labels)))
        accuracy = float(((logits > 0).float() == test_labels).float().mean())
        results[name] = dict(curves=curves, times=times, accuracy=accuracy)
        print(f"  {name:<24} test accuracy {100 * accuracy:6.2f}%   train loss {curves['train'][-1]:.4f}   "
              f"test loss {curves['test'][-1]:.4f}   (best {min(curves['test']):.4f})   "
              f"{statistics.median(times):.3f}s / epoch")

    plain_time = statistics.median(results["plain"]["times"])
    print("\ntime per epoch relative to the plain LSTM: " + ", ".join(
        f"{name} {statistics.median(r['times']) / plain_time:.2f}x" for name, r in results.items() if name != "plain"))
    if not args.no_plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
            return 0
        figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for name, r in results.items():
            epochs = range(1, len(r["curves"]["train"]) + 1)
            axes[0].plot(epochs, r["curves"]["train"], label=name)
            axes[1].plot(epochs, r["curves"]["test"], label=name)
        for axis, title in zip(axes, ("train loss", "test loss")):
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
        axes[1].legend()
        figure.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        figure.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
