"""Benchmarks and the chaos harness, run from the repository root: `python -m benchmarks.run_bench`,
`python -m benchmarks.chaos`, `python -m benchmarks.train_speed`, `python -m benchmarks.gpu_probe`."""
