"""Benchmark harness for meshguard's admission path (``python -m bench.run``)."""
