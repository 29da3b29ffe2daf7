"""rnnfused's benchmark suite (run it with `python -m benchmarks`, or `make bench`)."""
