"""Benchmarks: each prints a table and saves a plot; results go to BENCHMARKS.md."""
