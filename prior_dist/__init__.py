"""prior_dist: distributed pretraining of PRIOR medical vision-language models."""

__version__ = "0.1.0"
