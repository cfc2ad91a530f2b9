"""Benchmark entry points; each prints its figures and saves them under results/."""
