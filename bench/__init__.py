"""Benchmarks: scripts that print figures (never asserted in tests). `python -m bench` runs them all."""
