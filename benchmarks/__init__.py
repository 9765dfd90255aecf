"""Speed benchmarks (``python -m benchmarks``): generation against a naive baseline measured in
the same run, method edit times at SD v1 scale, and the GPU-hours they project for the paper
tables. See benchmarks/README.md."""
