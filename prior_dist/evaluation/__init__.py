"""Evaluation of pretrained PRIOR models (zero-shot classification first)."""
