"""Benchmarks run by ``uq-box benchmark ...``: the UCI regression protocol (``uci``) and the
digits classification table (``digits``).
"""
