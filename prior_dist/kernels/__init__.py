"""Custom kernels (Triton) with capability detection; the references live in prior_dist.ops."""
