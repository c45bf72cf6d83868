"""The benchmark suite run by ``make bench``: ``python -m benchmarks [NAME ...]``; results go to docs/benchmarks.md."""
