"""Tensor work: numeric checks now; merge, extract and resize build on the same helpers."""
