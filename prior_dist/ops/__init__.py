"""Tensor operations with a reference implementation and optional fused kernels."""
