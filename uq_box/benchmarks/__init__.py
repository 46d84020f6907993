"""Benchmarks run by ``uq-box benchmark ...``: the UCI regression protocol."""
