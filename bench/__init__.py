"""Benchmarks: each a script with a ``--quick`` mode (see the README)."""
