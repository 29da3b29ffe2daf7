"""A stacked 3-layer recurrent network (rnnfused.GRU or rnnfused.LSTM, num_layers=3) used two ways:
on its full output sequence (one prediction per step, "return_sequences=True" in Keras terms) and
on its last state only (one prediction per sequence).

Data: sequences of 25 values drawn from N(0, 1); s_t denotes the running sum x_1 + ... + x_t.

* Per-step task (sequence tagging): at every step t, is s_t > 0? The model reads ``output``,
  the top layer's state at every step ([B, T, H]), through a linear layer applied per step.
* Sequence-level task: did the running sum ever exceed 3 (max_t s_t > 3)? The model reads
  ``h_n[-1]``, the top layer's state after the last step ([B, H]). For a unidirectional stack
  this is the same tensor as ``output[:, -1]``; the script checks it.

Each model is built on torch.nn and on rnnfused with the same initial weights and trained the same
way.

    python examples/stacked_sequences.py
    python examples/stacked_sequences.py --cell lstm
    python examples/stacked_sequences.py --quick
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

STEPS = 25
THRESHOLD = 3.0


def make_data(count, generator):
    values = torch.randn(count, STEPS, generator=generator)
    running = values.cumsum(dim=1)
    per_step = (running > 0).float()  # [N, T]
    sequence = (running.max(dim=1).values > THRESHOLD).float()  # [N]
    return values.unsqueeze(-1), per_step, sequence


class StackedRNN(nn.Module):
    """A 3-layer recurrent stack with a linear head on every step or on the last state."""

    def __init__(self, lib, cell, hidden_size, per_step):
        super().__init__()
        self.rnn = getattr(lib, cell.upper())(1, hidden_size, num_layers=3, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        self.per_step = per_step

    def forward(self, values):
        output, state = self.rnn(values)  # output: [B, T, H], the top layer at every step
        if self.per_step:
            return self.head(output).squeeze(-1)  # [B, T]: one logit per step
        h_n = state[0] if isinstance(state, tuple) else state  # [num_layers, B, H]
        return self.head(h_n[-1]).squeeze(-1)  # [B]: one logit per sequence


def main():
    parser = common.base_parser(__doc__, epochs=8, batch_size=64, lr=5e-3)
    parser.add_argument("--cell", choices=["gru", "lstm"], default="gru")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=2000)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_size = min(args.epochs, 2), min(args.train_size, 500)
    device = common.pick_device(args.device)

    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_steps, train_seq = make_data(args.train_size, generator)
    test_x, test_steps, test_seq = make_data(1000, generator)
    test_x, test_steps, test_seq = test_x.to(device), test_steps.to(device), test_seq.to(device)
    cell = args.cell.upper()

    common.print_header(
        f"Stacked 3-layer {cell}: full output sequence vs last state",
        device,
        [
            f"data: {args.train_size} training / {len(test_seq)} test sequences of {STEPS} values from N(0, 1)",
            f"per-step task: running sum > 0 at each step ({100 * train_steps.mean():.1f}% positive steps)",
            f"sequence task: running sum ever > {THRESHOLD:g} ({100 * train_seq.mean():.1f}% positive sequences)",
            f"model: {cell}(1, {args.hidden}, num_layers=3) -> Linear({args.hidden}, 1); "
            f"Adam lr {args.lr} (cosine decay), batch {args.batch_size}, {args.epochs} epochs",
        ],
    )

    def loss_of_batch(model, x, y):
        return F.binary_cross_entropy_with_logits(model(x), y)

    tasks = [
        ("per-step (output[:, t])", True, train_steps, test_steps),
        ("sequence (h_n[-1])", False, train_seq, test_seq),
    ]
    for title, per_step, train_y, test_y in tasks:
        print(f"\n-- {title} --")
        models = common.twin_models(lambda lib: StackedRNN(lib, args.cell, args.hidden, per_step), device, args.seed)
        train = (train_x.to(device), train_y.to(device))
        times = common.train_side_by_side(
            models, train, loss_of_batch, args.epochs, args.batch_size, args.lr, args.seed, device,
            cosine_lr=True, log_every=4,
        )
        accuracy = {}
        for name, model in models.items():
            model.eval()
            with torch.no_grad():
                accuracy[name] = ((model(test_x) > 0).float() == test_y).float().mean().item()
        rows = [(f"test accuracy, {'per step' if per_step else 'per sequence'}", accuracy)]
        if per_step:
            # Accuracy at the last step only: the per-step model also answers "is the final sum > 0?".
            last = {}
            for name, model in models.items():
                with torch.no_grad():
                    last[name] = ((model(test_x)[:, -1] > 0).float() == test_y[:, -1]).float().mean().item()
            rows.append(("test accuracy, last step", last))
        common.print_comparison([(label, {n: f"{100 * a:.2f}%" for n, a in v.items()}) for label, v in rows], times)

    # The last step of the top layer's output sequence is the top layer's final state.
    with torch.no_grad():
        output, state = models["rnnfused"].rnn(test_x)
        h_n = state[0] if isinstance(state, tuple) else state
    same = torch.equal(output[:, -1], h_n[-1])
    print(f"\nrnnfused: output[:, -1] equals h_n[-1] (top layer, last step): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
