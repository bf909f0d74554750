"""implicit-cot: train language models to reason without writing their chain of thought."""

__version__ = "0.2.0"
