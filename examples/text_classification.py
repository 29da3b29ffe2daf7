"""Sentiment-style text classification with a bidirectional LSTM and a bidirectional GRU
(rnnfused.LSTM, rnnfused.GRU) over packed variable-length batches.

Data (generated here, nothing is downloaded): "reviews" of 8 to 40 words drawn from a vocabulary
of neutral filler words, positive words ("good", "superb", ...), negative words ("dull",
"awful", ...) and the negation "not". Each review holds 1, 3 or 5 sentiment words; a "not" just
before a sentiment word flips it. The label is positive when the (negation-aware) positive words
outnumber the negative ones. Word order matters (only the word right after "not" is flipped),
and the reviews have different lengths.

Model: nn.Embedding (padding index 0) -> bidirectional LSTM or GRU over a PackedSequence made with
pack_padded_sequence(..., enforce_sorted=False) -> the final states of both directions ->
Linear. Training clips the gradient norm (clip_grad_norm_). Each variant is built on torch.nn and
on rnnfused with the same initial weights and trained the same way.

    python examples/text_classification.py
    python examples/text_classification.py --variants gru --epochs 5
    python examples/text_classification.py --quick
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

import common

PAD, NOT = "<pad>", "not"
POSITIVE = (
    "good great excellent wonderful superb enjoyable brilliant delightful fantastic charming clever moving"
).split()
NEGATIVE = "bad awful boring terrible dull poor weak tedious bland messy clumsy annoying".split()
NEUTRAL = """
the a an this that it its and or but so as at by for from in into of on to with about after before
movie film plot story script scene scenes actor actress cast director camera music score sound ending
opening pace dialogue character characters set light color screen hour minute year time night day
was is were are be been has had have does did will would could should might can just also then
than very quite rather really fairly somewhat mostly often sometimes again still even only almost
city house road car train town family friend mother father brother sister child war love life world
first second last next other another same new old long short young big small few many more most
""".split()
VOCAB = [PAD, NOT] + POSITIVE + NEGATIVE + NEUTRAL
INDEX = {word: i for i, word in enumerate(VOCAB)}
MIN_LENGTH, MAX_LENGTH = 8, 40


def make_reviews(count, generator):
    """Token ids [count, MAX_LENGTH] (padded with 0), lengths [count] (int64, CPU), labels [count]."""

    def randint(low, high):
        return int(torch.randint(low, high, (1,), generator=generator))

    tokens = torch.zeros(count, MAX_LENGTH, dtype=torch.int64)
    lengths = torch.empty(count, dtype=torch.int64)
    labels = torch.empty(count)
    for n in range(count):
        length = randint(MIN_LENGTH, MAX_LENGTH + 1)
        words = [NEUTRAL[randint(0, len(NEUTRAL))] for _ in range(length)]
        sentiment_count = (1, 3, 5)[randint(0, 3)]
        # Distinct positions with room for a "not" before each sentiment word.
        positions = sorted(torch.randperm(length // 2, generator=generator)[:sentiment_count].tolist())
        score = 0
        for p in positions:
            position = 2 * p + 1
            polarity = 1 if randint(0, 2) else -1
            words[position] = (POSITIVE if polarity > 0 else NEGATIVE)[randint(0, len(POSITIVE))]
            if randint(0, 4) == 0:  # negated
                words[position - 1] = NOT
                polarity = -polarity
            score += polarity
        tokens[n, :length] = torch.tensor([INDEX[w] for w in words])
        lengths[n] = length
        labels[n] = float(score > 0)
    return tokens, lengths, labels


def decode(tokens, length):
    return " ".join(VOCAB[i] for i in tokens[:length].tolist())


class Classifier(nn.Module):
    def __init__(self, lib, kind, embedding_dim, hidden_size):
        super().__init__()
        self.embedding = nn.Embedding(len(VOCAB), embedding_dim, padding_idx=0)
        self.rnn = getattr(lib, kind.upper())(embedding_dim, hidden_size, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden_size, 1)

    def forward(self, tokens, lengths):
        embedded = self.embedding(tokens)  # [B, T, E], padded
        packed = pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, state = self.rnn(packed)
        h_n = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n)
        # h_n: [2, B, H], in the caller's batch order: the forward direction's state after each
        # review's last word, and the backward direction's after its first.
        return self.head(torch.cat([h_n[0], h_n[1]], dim=1)).squeeze(-1)


def main():
    parser = common.base_parser(__doc__, epochs=6, batch_size=64, lr=5e-3)
    parser.add_argument("--variants", default="lstm,gru", help="comma-separated: lstm, gru (default both)")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--embedding", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm (clip_grad_norm_)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_size = min(args.epochs, 2), min(args.train_size, 1000)
    device = common.pick_device(args.device)

    generator = torch.Generator().manual_seed(args.seed)
    train_tokens, train_lengths, train_labels = make_reviews(args.train_size, generator)
    test_tokens, test_lengths, test_labels = make_reviews(1000, generator)
    train = (train_tokens.to(device), train_lengths, train_labels.to(device))
    test_tokens, test_labels = test_tokens.to(device), test_labels.to(device)

    common.print_header(
        "Bidirectional LSTM / GRU: synthetic sentiment classification",
        device,
        [
            f"data: {args.train_size} training / {len(test_labels)} test reviews of {MIN_LENGTH}-{MAX_LENGTH} words, "
            f"vocabulary {len(VOCAB)}, {100 * train_labels.mean():.1f}% positive",
            f"example: \"{decode(train_tokens[0], int(train_lengths[0]))}\" -> "
            f"{'positive' if train_labels[0] else 'negative'}",
            f"model: Embedding({len(VOCAB)}, {args.embedding}) -> bidirectional LSTM/GRU({args.embedding}, "
            f"{args.hidden}) on packed batches -> Linear({2 * args.hidden}, 1)",
            f"training: Adam lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs, "
            f"clip_grad_norm_ {args.clip}",
        ],
    )

    def loss_of_batch(model, tokens, lengths, labels):
        return F.binary_cross_entropy_with_logits(model(tokens, lengths), labels)

    for kind in [v.strip() for v in args.variants.split(",") if v.strip()]:
        print(f"\n-- {kind.upper()} --")
        models = common.twin_models(
            lambda lib: Classifier(lib, kind, args.embedding, args.hidden), device, args.seed
        )
        times = common.train_side_by_side(
            models, train, loss_of_batch, args.epochs, args.batch_size, args.lr, args.seed, device,
            clip=args.clip, log_every=5,
        )
        accuracy = {}
        for name, model in models.items():
            model.eval()
            with torch.no_grad():
                logits = model(test_tokens, test_lengths)
            accuracy[name] = ((logits > 0).float() == test_labels).float().mean().item()
        common.print_comparison(
            [(f"{kind.upper()} test accuracy", {n: f"{100 * a:.2f}%" for n, a in accuracy.items()})], times
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
