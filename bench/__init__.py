"""Benchmarks that print figures (`make bench`, i.e. `python -m bench [NAME ...]`).

Invariant: a benchmark measures and prints, it never asserts a timing; every figure comes with a
baseline measured in the same process, so numbers from different machines can be compared as
ratios. Each `bench_<name>.py` module exposes `main()`.
"""
