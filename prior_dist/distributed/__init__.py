"""Process-group helpers applied from outside the model (gathers, later: sync BN, checkpoints)."""

from prior_dist.distributed.gather import AllGather

__all__ = ["AllGather"]
