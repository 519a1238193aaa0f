"""Benchmarks and the quality evaluation (not part of the installed eqcore package)."""
