"""Benchmarks and the performance-model tooling behind ``portep bench`` and ``portep model``."""
