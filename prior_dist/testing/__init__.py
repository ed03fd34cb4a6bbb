"""Helpers shared by tests and benchmarks (slow reference implementations)."""
