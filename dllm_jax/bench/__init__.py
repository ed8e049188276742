"""Benchmarks that print tables: quality against parallelism (quality.py)."""
