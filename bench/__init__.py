"""Benchmarks: `make bench` (python -m bench); figures and ratios, never timing assertions."""
