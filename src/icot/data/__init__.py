"""Data: the line format, generators, tokenizers and batching."""

from icot.data.format import Example, read_examples, write_examples

__all__ = ["Example", "read_examples", "write_examples"]
