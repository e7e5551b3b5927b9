"""Triton kernels of TokenFlow's hot operations (importable as `tokenflow.kernels`)."""
