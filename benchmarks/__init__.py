"""Benchmarks: not part of the library or CI (the emulated-cluster harness has a quick test)."""
