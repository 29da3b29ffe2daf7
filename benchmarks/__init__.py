"""rnnfused's benchmark suite: rnnfused against torch.nn, side by side (``python -m benchmarks``;
see benchmarks/__main__.py for the usage)."""
