"""Benchmarks of training and decoding speed: `python benchmarks/run.py --help`."""
